"""Command line: the same engine as the UI, for scripts and terminals.

    python -m studio train --preset presets/tiny-demo.yaml [--data FILE] [--set key=value ...]
    python -m studio prefer --run RUN [--votes FILE] [--method dpo|orpo|kto] [--checkpoint N] [--preset NAME]
                            [--set key=value ...]
    python -m studio runs | stop RUN | resume RUN
    python -m studio generate --run RUN --prompt TEXT [--base] [--checkpoint N]
    python -m studio evaluate --run RUN [--limit N]
    python -m studio export --run RUN [--zip] [--merge] [--gguf f16|q8_0|q4_k_m] [--no-check]
                            [--push owner/name [--public]]
    python -m studio estimate --preset NAME
    python -m studio build-tiny

``--data FILE`` trains on your file with its columns detected afresh (a preset's ``data.mapping`` names its
own dataset's columns) unless ``--set data.mapping=...`` says otherwise.
``--set KEY=VALUE`` takes a text field's VALUE exactly as typed (write newlines with bash's ``$'...'``);
other fields read VALUE as YAML (numbers, true/false, ``[a, b]``, ``{instruction: user}``).

``prefer`` trains a preference stage (DPO, ORPO or KTO) on top of RUN's adapter, on ``--votes FILE`` or on the
studio's own Playground votes for RUN, as a new run; ``--set prefer.beta=0.2`` and the like tune it.
``train`` launches the training worker (as the UI does) and follows its events with a progress
bar; Ctrl+C asks the worker to stop at the next step.  Every error prints one line naming the field
or file, and exits with status 2; no traceback reaches the user.
"""

from __future__ import annotations

import argparse
import sys
import time

from studio.config import ConfigError


def _parse_set(items: list[str]) -> dict:
    """``--set key=value`` pairs.  A text field takes the value exactly as typed (YAML would read a template
    starting with ``###`` as a comment, ``yes`` as true, ``{instruction}`` as a mapping); numbers, switches,
    lists and the mapping are read as YAML, then checked against the field like any preset value."""
    import yaml

    from studio.config import field_specs, field_type

    specs = field_specs()
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(item, "--set takes key=value, e.g. train.learning_rate=1e-4.")
        k, v = item.split("=", 1)
        k = k.strip()
        try:
            typ = field_type(k)
        except (KeyError, TypeError, AttributeError):
            typ = None  # an unknown key: RunConfig names it with the known ones
        if typ is str:
            # A choice (data.template = qa) is a word; free text keeps its spaces.
            out[k] = v.strip() if k in specs and "choices" in specs[k].metadata else v
            continue
        try:
            out[k] = yaml.safe_load(v) if v.strip() else None  # empty: {} for the mapping, an error for a number
        except yaml.YAMLError as e:
            raise ConfigError(k, f"could not read {v!r} ({str(e).splitlines()[0]}).") from None
    return out


def _config(args):
    from studio.presets import load_preset

    cfg = load_preset(args.preset)
    overrides = _parse_set(args.set)
    if getattr(args, "data", None):
        overrides["data.path"] = args.data
        # The preset's column mapping names its own dataset's columns (the fast recipe's user/system/assistant);
        # a file of your own is detected afresh unless --set data.mapping says otherwise.
        overrides.setdefault("data.mapping", {})
    if getattr(args, "name", None):
        overrides["output.run_name"] = args.name
    return cfg.replace(overrides) if overrides else cfg


def follow(run, out=sys.stdout) -> str:
    """Print a progress bar from the run's events until the worker exits."""
    from tqdm import tqdm

    from studio import worker
    from studio.runs import TERMINAL

    offset, bar = 0, None
    try:
        while True:
            evs, offset = run.events(offset)
            for e in evs:
                t = e.get("type")
                if t == "metric":
                    if bar is None:
                        bar = tqdm(total=e.get("max_steps") or None, unit="step", file=out, dynamic_ncols=True)
                    bar.n = e["step"]
                    post = {"loss": f"{e['loss']:.4f}" if isinstance(e.get("loss"), float) else e.get("loss"),
                            "tok_s": e.get("tokens_per_s")}
                    if isinstance(e.get("reward_margin"), float):  # a preference stage
                        post.update(margin=f"{e['reward_margin']:.3f}", acc=e.get("reward_accuracy"))
                    bar.set_postfix(**post)
                    bar.refresh()
                elif t == "eval":
                    el = e["eval_loss"]  # "nan" arrives as a string (JSON has no NaN)
                    tqdm.write(f"step {e['step']}: eval loss {el:.4f}" if isinstance(el, float) else
                               f"step {e['step']}: eval loss {el}", file=out)
                elif t == "sample":
                    tqdm.write(f"step {e['step']} sample: {e['prompt'][:60]!r} -> {e['answer'][:80]!r}", file=out)
                elif t == "plan":
                    from studio.speed.plan import event_text

                    tqdm.write(event_text(e), file=out)
                elif t == "data":
                    tqdm.write(f"data: {e['train']} train / {e['validation']} validation; {e['stats']['summary']}",
                               file=out)
                elif t == "status":
                    msg = e.get("message", "")
                    tqdm.write(f"[{e['status']}] {msg}" + (f" — {e['remedy']}" if e.get("remedy") else ""), file=out)
            st = run.last_status()["status"]
            if st in TERMINAL or not run.worker_alive():
                if not run.worker_alive() and st not in TERMINAL:
                    time.sleep(0.5)
                    evs, offset = run.events(offset)
                    if run.last_status()["status"] not in TERMINAL:
                        return run.status
                    continue
                return st
            time.sleep(0.5)
    except KeyboardInterrupt:
        print("\nstopping at the next step (Ctrl+C again to end it now)...", file=out)
        try:
            return worker.stop(run, grace=60)
        except KeyboardInterrupt:
            return worker.stop(run, grace=0)
    finally:
        if bar is not None:
            bar.close()


def cmd_train(args) -> int:
    from studio import worker
    from studio.runs import RunStore

    cfg = _config(args)
    if not cfg.data.path and not cfg.data.hub_dataset:
        raise ConfigError("data.path", "no data: pass --data FILE or set data.hub_dataset.")
    from studio.data.files import DataError, check_size
    from studio.modeling import preflight
    from studio.paths import shipped_file

    for key in ("path", "val_path"):  # refuse now rather than start a run that fails a second later
        value = getattr(cfg.data, key)
        if value:
            path = shipped_file(value)  # a preset's samples/... is found wherever the studio is installed
            if not path.is_file():
                raise DataError(f"data.{key}: {value}: no such file.")
            check_size(path)
    preflight(cfg)
    run = worker.start(RunStore(), cfg)
    print(f"run {run.id} in {run.dir}")
    st = follow(run)
    print(f"run {run.id}: {st}")
    if st == "completed":
        print(f"adapter: {run.adapter_dir}")
    return 0 if st in ("completed", "stopped") else 1


def cmd_prefer(args) -> int:
    from studio import votes

    parent = _run(args)
    run = votes.start_stage(parent, method=args.method or "", checkpoint=args.checkpoint or 0,
                            votes=args.votes or "", preset=args.preset or "", overrides=_parse_set(args.set),
                            name=args.name or "")
    p = run.config().prefer
    print(f"run {run.id} in {run.dir}: {p.method} on {p.votes or p.hub_dataset or 'the studio votes'} from "
          f"{parent.id}/{'checkpoint-' + str(p.parent_checkpoint) if p.parent_checkpoint else 'adapter'}")
    st = follow(run)
    print(f"run {run.id}: {st}")
    if st == "completed":
        last = [e for e in run.all_events() if e.get("type") in ("metric", "eval") and "reward_margin" in e]
        if last:
            print(f"reward margin {last[-1]['reward_margin']:.4f}, reward accuracy {last[-1].get('reward_accuracy')}"
                  f" ({last[-1]['type']} at step {last[-1]['step']})")
        print(f"adapter: {run.adapter_dir}")
    return 0 if st in ("completed", "stopped") else 1


def _run(args):
    from studio.runs import RunStore

    try:
        return RunStore().get(args.run)
    except KeyError:
        raise ConfigError("--run", f"no run named {args.run!r}; see `python -m studio runs`.") from None


def cmd_runs(args) -> int:
    """One line per run; a run folder with unreadable parts is listed with a warning line, never hides the rest."""
    from studio.runs import RunStore

    for r in RunStore().list():
        try:
            s = r.summary()
        except Exception as e:  # noqa: BLE001 - a folder the reader has not foreseen: list it, say so
            s = {"id": r.id, "status": "unknown", "step": 0, "train_loss": None, "eval_loss": None,
                 "warnings": [f"unreadable ({type(e).__name__})"]}
        print(f"{s['id']:40s} {s['status']:12s} step {s['step']:>6}  loss {s['train_loss']}  eval {s['eval_loss']}")
        for w in s["warnings"]:
            print("  warning: " + "".join(c if c.isprintable() else "?" for c in w))
    return 0


def cmd_stop(args) -> int:
    from studio import worker

    print(worker.stop(_run(args)))
    return 0


def cmd_resume(args) -> int:
    from studio import worker
    from studio.runs import RunStore

    run = worker.resume(RunStore(), _run(args))
    st = follow(run)
    print(f"run {run.id}: {st}")
    return 0 if st in ("completed", "stopped") else 1


def cmd_generate(args) -> int:
    from studio.data.templates import TemplateSpec
    from studio.generate import Sampling, generate_text
    from studio.modeling import load_for_inference

    run = _run(args)
    cfg = run.config()
    path = run.checkpoints_dir / f"checkpoint-{args.checkpoint}" if args.checkpoint else run.adapter_dir
    model, tok = load_for_inference(cfg, {"tuned": path})
    s = Sampling(args.max_new_tokens, args.temperature, args.top_p, 1.0, args.seed)
    print(generate_text(model, tok, args.prompt, TemplateSpec.from_config(cfg.data),
                        adapter=None if args.base else "tuned", sampling=s))
    return 0


def cmd_evaluate(args) -> int:
    from studio.evaluate import evaluate_run

    ev = evaluate_run(_run(args), limit=args.limit)
    print(f"{'metric':14s} {'base':>10s} {'tuned':>10s}")
    for name, b, t in ev.table():
        print(f"{name:14s} {b:10.4f} {t:10.4f}")
    return 0


def cmd_export(args) -> int:
    from studio import export

    run = _run(args)
    if args.zip:
        print(export.adapter_zip(run))
    if args.merge:
        print(export.merge(run))
    for kind in args.gguf or []:
        from tqdm import tqdm

        with tqdm(total=100, desc=f"GGUF {kind}", unit="%", dynamic_ncols=True) as bar:
            def progress(frac, desc, bar=bar):
                bar.set_postfix_str(desc[:40])
                bar.n = round(frac * 100)
                bar.refresh()

            res = export.export_gguf(run, kind, progress=progress, verify=not args.no_check)
        print(res.path)
        print(res.summary())
        print(f"Ollama: {res.ollama_create}")
        if res.check and not res.check["passed"]:
            print(f"error: the GGUF file does not behave like the merged model: {res.check['first_difference']}",
                  file=sys.stderr)
            return 1
    if args.push:
        print(export.push(run, args.push, None, private=not args.public, merged=args.merge))
    print(export.load_snippet(run, merged=args.merge))
    return 0


def cmd_estimate(args) -> int:
    """The speed plan and memory estimate: in full for this machine (or ``--gpu``), one line per common GPU."""
    from studio.estimate import arch_for
    from studio.hardware import detect
    from studio.speed import plan
    from studio.speed.profiles import PROFILES

    cfg = _config(args)
    arch = arch_for(cfg)
    if args.gpu and args.gpu not in PROFILES:
        raise ConfigError("--gpu", f"{args.gpu!r} is not one of: {', '.join(PROFILES)}.")
    here = PROFILES[args.gpu] if args.gpu else detect()
    mine = plan(cfg, here, arch=arch)
    print(f"{'This machine: ' + here.name if not args.gpu else args.gpu}"
          + (f" ({here.total_bytes / 2**30:.0f} GiB)" if here.device == "cuda" else " (CPU only)"))
    for part, what, why in mine.rows():
        print(f"  {part:26s} {what:22s} {why}")
    for note in mine.notes:
        print(f"  note: {note}")
    if arch is None:
        print("The model's shape is unknown offline: no memory estimate.")
        return 0
    print("\nOn common GPUs (reserved memory the estimate expects):")
    for name, hw in PROFILES.items():
        p = plan(cfg, hw, arch=arch)
        fits = p.estimate_gib is not None and p.estimate_gib <= hw.total_bytes / 2**30 * 0.95
        print(f"  {name:12s} ~{p.estimate_gib:5.1f} GiB {'fits' if fits else 'does not fit'}: {p.summary()}")
    return 0


def cmd_build_tiny(args) -> int:
    from studio.tiny_model import ensure_tiny_model

    print(ensure_tiny_model())
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m studio", description="QLoRA Studio engine")
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train from a preset")
    t.add_argument("--preset", required=True)
    t.add_argument("--data")
    t.add_argument("--name")
    t.add_argument("--set", action="append", metavar="KEY=VALUE")
    t.set_defaults(fn=cmd_train)
    pf = sub.add_parser("prefer", help="preference stage (DPO, ORPO, KTO) on a finished run, from votes")
    pf.add_argument("--run", required=True, help="the finished run whose adapter the stage starts from")
    pf.add_argument("--votes", help="pairs file (prompt/chosen/rejected; kto: prompt/completion/label); "
                    "default: the studio's votes for --run")
    pf.add_argument("--method", choices=["dpo", "orpo", "kto"])
    pf.add_argument("--checkpoint", type=int, help="start from this checkpoint step instead of the final adapter")
    pf.add_argument("--preset", help="a preset whose prefer section to use, e.g. dpo-tiny")
    pf.add_argument("--name")
    pf.add_argument("--set", action="append", metavar="KEY=VALUE")
    pf.set_defaults(fn=cmd_prefer)
    sub.add_parser("runs", help="list runs").set_defaults(fn=cmd_runs)
    for name, fn in (("stop", cmd_stop), ("resume", cmd_resume)):
        s = sub.add_parser(name)
        s.add_argument("run")
        s.set_defaults(fn=fn)
    g = sub.add_parser("generate", help="answer a prompt with a run's adapter (or the base)")
    g.add_argument("--run", required=True)
    g.add_argument("--prompt", required=True)
    g.add_argument("--base", action="store_true")
    g.add_argument("--checkpoint", type=int)
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.set_defaults(fn=cmd_generate)
    ev = sub.add_parser("evaluate", help="base vs tuned on the validation examples")
    ev.add_argument("--run", required=True)
    ev.add_argument("--limit", type=int, default=50)
    ev.set_defaults(fn=cmd_evaluate)
    x = sub.add_parser("export", help="zip, merge, GGUF or push a run's adapter")
    x.add_argument("--run", required=True)
    x.add_argument("--zip", action="store_true")
    x.add_argument("--merge", action="store_true")
    x.add_argument("--gguf", action="append", choices=("f16", "q8_0", "q4_k_m"),
                   help="write a GGUF file (repeat for several), check it in llama.cpp, write a Modelfile")
    x.add_argument("--no-check", action="store_true", help="skip the llama.cpp check of the GGUF file")
    x.add_argument("--push", metavar="OWNER/NAME")
    x.add_argument("--public", action="store_true")
    x.set_defaults(fn=cmd_export)
    es = sub.add_parser("estimate", help="estimate peak GPU memory of a preset")
    es.add_argument("--preset", required=True)
    es.add_argument("--set", action="append", metavar="KEY=VALUE")
    es.add_argument("--gpu", help="plan for this GPU instead of this machine's (T4 16 GB, L4 24 GB, A100 40 GB, "
                    "A100 80 GB, H100 80 GB, H200 141 GB)")
    es.set_defaults(fn=cmd_estimate)
    sub.add_parser("build-tiny", help="build the offline tiny model").set_defaults(fn=cmd_build_tiny)
    return p


def main(argv: list[str] | None = None) -> int:
    from studio.data.files import DataError
    from studio.export import ExportError
    from studio.failures import DiskFull
    from studio.modeling import ModelError
    from studio.security import SecurityError, redact
    from studio.worker import Busy

    args = parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ConfigError, DataError, ModelError, SecurityError, ExportError, Busy, ValueError, DiskFull) as e:
        print(f"error: {redact(str(e))}", file=sys.stderr)
        return 2
