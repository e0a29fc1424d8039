"""The studio's Trainer counts the tokens each micro-batch trains on without a GPU sync per micro-batch, and
its counts (the Train tab's tokens/s, checkpoints' trainer state) equal what the batches hold."""

import torch

from studio.trainer import studio_trainer_cls


def test_counting_a_micro_batch_reads_nothing_back(monkeypatch):
    trainer = studio_trainer_cls().__new__(studio_trainer_cls())  # the method needs args and model only

    class Args:
        include_num_input_tokens_seen = "non_padding"
        device = torch.device("cpu")

    trainer.args, trainer.model, trainer.processing_class = Args(), torch.nn.Module(), None

    def no_item(self):
        raise AssertionError("a .item() per micro-batch waits for the GPU")

    monkeypatch.setattr(torch.Tensor, "item", no_item)
    trainer._track_num_input_tokens({"input_ids": torch.ones(2, 4, dtype=torch.long),
                                     "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])})
    trainer._track_num_input_tokens({"input_ids": torch.ones(1, 3, dtype=torch.long),
                                     "attention_mask": torch.ones(1, 3, dtype=torch.long)})
    assert int(trainer._pending_tokens) == 8


def test_engine_token_counts_match_the_batches(tmp_path):
    from studio.presets import load_preset
    from studio.runs import RunStore
    from studio.training import Recipe

    cfg = load_preset("tiny-demo").replace({"train.max_steps": 4, "train.logging_steps": 2, "train.eval_steps": 0,
                                            "train.save_steps": 3, "train.grad_accum": 2})
    run = RunStore(tmp_path / "runs").create(cfg)
    recipe = Recipe(run)
    recipe.setup()
    collate, seen = recipe.trainer.data_collator, []

    def counting(rows):
        batch = collate(rows)
        seen.append(int(batch["attention_mask"].sum()))
        return batch

    recipe.trainer.data_collator = counting
    recipe.train()
    assert len(seen) > 8  # 4 steps of 2 micro-batches, then the final validation's batches
    seen = seen[:8]
    metrics = [e for e in run.all_events() if e["type"] == "metric"]
    assert [m["tokens_seen"] for m in metrics] == [sum(seen[:4]), sum(seen[:8])]
    assert recipe.trainer.state.num_input_tokens_seen == sum(seen) and recipe.trainer._pending_tokens is None
    import json

    state = json.loads((run.dir / "checkpoints" / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["num_input_tokens_seen"] == sum(seen[:6])  # flushed before the checkpoint at step 3


def test_bitsandbytes_optimizer_steps_without_its_per_parameter_syncs():
    """The engine's 8-bit optimizer is wrapped so its step skips bitsandbytes' synchronize per parameter (on a GPU,
    on the default stream; tests/gpu checks that no sync happens there and the updates are the same), the wrapped
    step is a bound method an LR scheduler can wrap, and it updates as bitsandbytes does."""
    import bitsandbytes as bnb
    from transformers import get_cosine_schedule_with_warmup

    from studio.trainer import without_param_syncs

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(256, 512)) for _ in range(2)]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    initial = [p.detach().clone() for p in params]
    ours, theirs = bnb.optim.AdamW8bit(params, lr=1e-2), bnb.optim.AdamW8bit(twins, lr=1e-2)
    assert without_param_syncs(ours) and not without_param_syncs(ours)  # once
    assert not without_param_syncs(torch.optim.AdamW(twins))  # other optimizers are left alone
    schedules = [get_cosine_schedule_with_warmup(o, 1, 4) for o in (ours, theirs)]
    for i in range(3):
        for a, b in zip(params, twins):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        ours.step()
        theirs.step()
        for s in schedules:
            s.step()
    assert schedules[0].get_last_lr() == schedules[1].get_last_lr() != [1e-2]
    assert all(torch.equal(a, b) for a, b in zip(params, twins))
    assert not any(torch.equal(a, b) for a, b in zip(params, initial))  # the steps did update


def test_the_flop_count_walks_the_model_once():
    """Trainer's 6 x tokens x parameters per micro-batch, the same number, with the parameters counted once."""
    from transformers import Trainer

    trainer = studio_trainer_cls().__new__(studio_trainer_cls())
    walks = []

    class Model(torch.nn.Module):
        main_input_name = "input_ids"

        def num_parameters(self, exclude_embeddings=False):
            walks.append(exclude_embeddings)
            return 1000

    trainer.model = Model()
    batch = {"input_ids": torch.ones(2, 4, dtype=torch.long)}
    ours = [trainer.floating_point_ops(batch) for _ in range(3)]
    assert walks == [True]
    assert ours == [Trainer.floating_point_ops(trainer, batch)] * 3 == [6 * 8 * 1000] * 3
    assert trainer.floating_point_ops({"pixel_values": torch.ones(1)}) == 0
