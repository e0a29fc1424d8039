"""Where a graphed run's peak memory is reached: allocated and peak GiB around each stage of capture and steps.

    python -m bench.memory_trace --preset mistral-7b-finance-fast --model DIR --data FILE [--set K=V]   # on a GPU

Wraps (without changing) the layer-input probe, ``torch.cuda.make_graphed_callables``, each CUDA graph
capture and each optimizer step, resetting the peak between stages, and prints one line per stage.
A diagnostic: the engine's own memory numbers are the ``metric`` events ``bench.train_speed`` reads.
"""

from __future__ import annotations

import argparse


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="mistral-7b-finance-fast")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="as studio train's --set")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    a = p.parse_args()

    import torch
    from transformers import TrainerCallback

    from bench.train_speed import preset_config
    from studio.speed import graphs
    from studio.runs import RunStore
    from studio.training import Recipe

    def line(stage):
        print(f"MEM {stage:28s} allocated {torch.cuda.memory_allocated() / 2**30:6.3f} GiB, "
              f"peak since last {torch.cuda.max_memory_allocated() / 2**30:6.3f} GiB, "
              f"reserved {torch.cuda.memory_reserved() / 2**30:6.3f} GiB", flush=True)
        torch.cuda.reset_peak_memory_stats()

    def traced(name, fn):
        def wrapper(*args, **kw):
            line(f"before {name}")
            out = fn(*args, **kw)
            torch.cuda.synchronize()
            line(f"after {name}")
            return out
        return wrapper

    graphs.layer_inputs = traced("layer_inputs", graphs.layer_inputs)
    torch.cuda.make_graphed_callables = traced("make_graphed_callables", torch.cuda.make_graphed_callables)
    enter, leave = torch.cuda.graph.__enter__, torch.cuda.graph.__exit__

    def graph_enter(self):
        line("capture begins")
        return enter(self)

    def graph_exit(self, *exc):
        out = leave(self, *exc)
        line("capture ends")
        return out

    torch.cuda.graph.__enter__, torch.cuda.graph.__exit__ = graph_enter, graph_exit

    class Steps(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            torch.cuda.synchronize()
            line(f"step {state.global_step}")

    cfg = preset_config(a.preset, a.model, a.data, 6, a.set)
    recipe = Recipe(RunStore().create(cfg, "memory-" + a.preset))
    recipe.setup()
    line("after setup (model loaded)")
    recipe.trainer.add_callback(Steps())
    recipe.train()


if __name__ == "__main__":
    main()
