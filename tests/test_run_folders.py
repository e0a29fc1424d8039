"""Run listings and every tab survive any content in any run folder (issue 21, item 5).

A seeded generator (no hypothesis in the venv) plants one piece of garbage per case beside a healthy run
and a run being damaged: bad lines in ``events.jsonl`` (random bytes, invalid UTF-8, non-objects, known types
with missing or mistyped fields, NaN literals, deep nesting, torn lines), a garbled ``config.yaml``, stray
files, folders that are not runs, symlinks, FIFOs, folders where files belong, odd pid files.  Each case is
read the ways a user reads it: the store's listing and summaries, the Train tab's handlers (history, the run
shown, its status), the Playground, Evaluate and Export handlers and the run pickers.  Reading must neither
raise nor block; a bad line must be skipped and reported, never change what the good lines say.  Then the
pile of every case is listed by ``studio runs`` and served by ``app.py``, whose tabs a headless browser opens.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from studio.presets import load_preset
from studio.runs import Run, RunStore, check_event, parse_event, write_new

ROOT = Path(__file__).resolve().parent.parent
CASES = int(os.environ.get("STUDIO_FUZZ_CASES", 400))
SEED = 21


class Hang(Exception):
    pass


@contextlib.contextmanager
def deadline(seconds: int, what: str):
    def on_alarm(*_):
        raise Hang(f"{what} blocked for {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def healthy(store: RunStore, name: str) -> Run:
    """A finished run as the worker writes one (through the same writer), without training."""
    cfg = load_preset("tiny-demo").replace({"train.max_steps": 4})
    run = store.create(cfg, name)
    run.emit("status", status="queued", pid=12345, resume=False)
    run.emit("status", status="starting", device="cpu", gpu=None)
    run.emit("data", train=40, validation=4, schema="alpaca", skipped=0, skipped_first=[], dropped=0,
             stats={"count": 40, "summary": "40 examples"})
    run.emit("status", status="running", step=0, max_steps=4, epochs=1.0)
    for s in range(1, 5):
        run.emit("metric", step=s, max_steps=4, epoch=s / 4, loss=2.0 - s / 10, learning_rate=1e-3, grad_norm=0.5,
                 tokens_per_s=100.0, tokens_seen=100 * s, elapsed=float(s),
                 memory={"device": "cpu", "rss": 2**30, "used": 2**32, "total": 2**34})
    run.emit("checkpoint", step=4, path="checkpoints/checkpoint-4")
    run.emit("eval", step=4, eval_loss=1.7, perplexity=5.47)
    run.emit("sample", step=4, prompt="What is a bond?", input="", reference="A loan.", answer="A loan.")
    run.finish("completed", step=4, final={"train_loss": 1.6, "eval_loss": 1.7, "step": 4})
    return run


# ---- the garbage ----------------------------------------------------------------------------------------

WRONG = [None, "x", "", -1, 1.5, True, False, [], {}, [1, [2]], {"a": {}}, 10**30, -10**30, "nan", "\u202e"]


def _wrong_for(test, rng):
    """A value ``test`` refuses (None when every candidate passes)."""
    for v in rng.sample(WRONG, len(WRONG)):
        if not test(v):
            return v
    return None


def bad_line(rng: random.Random) -> tuple[bytes, bool]:
    """(a line, whether it is certainly not a sound event)."""
    from studio.runs import EVENT_FIELDS

    kind = rng.randrange(12)
    if kind == 0:  # random bytes with an invalid UTF-8 sequence
        b = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 120))).replace(b"\n", b"")
        return b + b"\xff\xc3(", True
    if kind == 1:  # JSON that is not an object
        return json.dumps(rng.choice([1, "s", [1, 2], None, True, 2.5, [{"t": 1, "type": "log"}]])).encode(), True
    if kind == 2:  # no time or no type
        ev = rng.choice([{"type": "metric", "step": 1, "loss": 1.0}, {"t": 1.0}, {"t": "1", "type": "log", "message": "m"},
                         {"t": True, "type": "log", "message": "m"}, {"t": 1.0, "type": 7}])
        return json.dumps(ev).encode(), True
    if kind == 3:  # a known type with a required field missing
        typ = rng.choice([t for t, f in EVENT_FIELDS.items() if any(r for _, r in f.values())])
        fields = {k: 1 for k, (_, r) in EVENT_FIELDS[typ].items() if r}
        fields.pop(rng.choice(list(fields)))
        return json.dumps({"t": 1.0, "type": typ, **fields}).encode(), True
    if kind == 4:  # a known type with one field of the wrong type
        typ = rng.choice(list(EVENT_FIELDS))
        name, (test, _) = rng.choice(list(EVENT_FIELDS[typ].items()))
        v = _wrong_for(test, rng)
        if v is None:
            return b"{", True
        ev = {"t": 5.0, "type": typ, "step": 1, "status": "running", name: v}
        return json.dumps(ev).encode(), check_event(ev) is not None
    if kind == 5:  # NaN / Infinity literals
        return rng.choice([b'{"t": NaN, "type": "log", "message": "m"}',
                           b'{"t": 1, "type": "metric", "step": 1, "loss": Infinity, "memory": {"peak": NaN}}']), True
    if kind == 6:  # deep nesting
        d = rng.choice([1000, 100_000])
        return rng.choice([b"[" * d + b"]" * d, b'{"t": 1, "type": "log", "message": ' + b"[" * d]), True
    if kind == 7:  # a torn line in the middle of the file
        return b'{"t": 1, "type": "metric", "step": 3, "lo', True
    if kind == 8:  # an unpaired surrogate, which no page can show
        return b'{"t": 1.0, "type": "log", "message": "\\udc80"}', True
    if kind == 9:  # a mistyped step on an unknown type
        return json.dumps({"t": 1.0, "type": "future_kind", "step": rng.choice(["3", -2, 1.5, None, [3]])}).encode(), True
    if kind == 10:  # a status nobody knows, or a huge message of the wrong kind
        return rng.choice([b'{"t": 1, "type": "status", "status": "exploded"}',
                           b'{"t": 1, "type": "status", "status": "failed", "message": ["x"]}']), True
    # very long garbage
    return b"z" * rng.choice([10_000, 1_000_000]), True


def garble_config(rng: random.Random, path: Path, outside: Path) -> None:
    kind = rng.randrange(10)
    path.unlink()
    if kind == 0:
        path.write_bytes(b"")
    elif kind == 1:
        path.write_bytes(bytes(rng.randrange(256) for _ in range(200)))
    elif kind == 2:
        path.write_text("- a\n- b\n")
    elif kind == 3:
        path.write_text("train: {max_steps: lots}\n")
    elif kind == 4:
        path.write_text("[" * 20000)
    elif kind == 5:
        path.symlink_to(outside)
    elif kind == 6:
        os.mkfifo(path)
    elif kind == 7:
        path.mkdir()
    elif kind == 8:
        path.write_bytes(b"name: x\n" + b"#" * (2 * 1024 * 1024))
    else:
        path.symlink_to("/dev/zero")


def plant(rng: random.Random, store: RunStore, run: Run, outside: Path) -> tuple[str, bool]:
    """Damage ``run`` (or its runs root) one way; returns (what, whether events.jsonl got a bad line)."""
    kind = rng.randrange(10)
    if kind <= 3:  # bad lines among the good ones
        lines = run.events_path.read_bytes().split(b"\n")[:-1]
        sure = True
        for _ in range(rng.randrange(1, 4)):
            line, bad = bad_line(rng)
            sure = sure and bad
            lines.insert(rng.randrange(1, len(lines)), line)
        run.events_path.write_bytes(b"\n".join(lines) + b"\n")
        return "bad lines", sure
    if kind == 4:
        garble_config(rng, run.config_path, outside)
        return "config.yaml", False
    if kind == 5:  # events.jsonl that is not a file
        run.events_path.unlink()
        what = rng.choice(["fifo", "dir", "zero", "loop", "dangling", "outside"])
        {"fifo": lambda p: os.mkfifo(p), "dir": lambda p: p.mkdir(), "zero": lambda p: p.symlink_to("/dev/zero"),
         "loop": lambda p: p.symlink_to(p), "dangling": lambda p: p.symlink_to(p.parent / "nowhere"),
         "outside": lambda p: p.symlink_to(outside)}[what](run.events_path)
        return f"events.jsonl {what}", False
    if kind == 6:  # odd pid files
        run.pid_path.unlink(missing_ok=True)
        what = rng.choice(["", "abc", "-1", "0", "1", str(os.getpid()), "9" * 30, "fifo", "dir", "\xff"])
        if what == "fifo":
            os.mkfifo(run.pid_path)
        elif what == "dir":
            run.pid_path.mkdir()
        else:
            run.pid_path.write_text(what, encoding="latin-1")
        return f"worker.pid {what!r}", False
    if kind == 7:  # odd checkpoints, adapter, logs, evaluation
        what = rng.choice(["ck-names", "ck-file", "adapter-file", "log-fifo", "log-link", "eval-garbage",
                           "eval-fifo", "final-garbage", "final-link"])
        if what == "ck-names":
            for n in ("checkpoint-abc", "checkpoint-", "checkpoint-99999999999999999999", "checkpoint-2"):
                (run.checkpoints_dir / n).mkdir(parents=True, exist_ok=True)
                (run.checkpoints_dir / n / "trainer_state.json").write_text("{")
                (run.checkpoints_dir / n / "adapter_model.safetensors").write_bytes(b"")
        elif what == "ck-file":
            run.checkpoints_dir.write_text("not a folder")
        elif what == "adapter-file":
            run.adapter_dir.write_text("not a folder")
        elif what == "log-fifo":
            os.mkfifo(run.log_path)
        elif what == "log-link":
            run.log_path.symlink_to("/dev/zero")
        elif what == "eval-garbage":
            (run.dir / "evaluation.json").write_bytes(rng.choice([b"[" * 100000, b"{\"n\": 1}", b"\xff", b"[]"]))
        elif what == "eval-fifo":
            os.mkfifo(run.dir / "evaluation.json")
        elif what == "final-garbage":
            run.final_path.write_bytes(rng.choice([b"\xff" * 10, b'{"t": 1e999, "type": "status", "status": "failed"}',
                                                   b"[]", b""]))
        else:
            run.final_path.unlink()
            run.final_path.symlink_to(outside)
        return what, False
    if kind == 8:  # things in the runs root that are not runs
        what = rng.choice(["stray-file", "no-config", "bad-name", "link-out", "link-loop", "dangling", "fifo",
                           "pending"])
        p = store.root / f"x{rng.randrange(10**6)}"
        if what == "stray-file":
            p.write_bytes(b"\x00junk")
        elif what == "no-config":
            p.mkdir()
            (p / "events.jsonl").write_text('{"t": 1, "type": "status", "status": "running"}\n')
        elif what == "bad-name":
            q = store.root / f"bad name {rng.randrange(10**6)} \u00e9"
            q.mkdir()
            (q / "config.yaml").write_text(run.config_path.read_text() if run.config_path.is_file() else "")
        elif what == "link-out":
            p.symlink_to(outside.parent)
        elif what == "link-loop":
            p.symlink_to(p)
        elif what == "dangling":
            p.symlink_to(store.root / "gone")
        elif what == "fifo":
            os.mkfifo(p)
        else:
            (store.root / f".creating-{p.name}").mkdir()
        return what, False
    # the last line torn for good (its worker gone): the completed run must stay completed
    data = run.events_path.read_bytes()
    last = data[data.rstrip(b"\n").rfind(b"\n") + 1:]
    legacy = rng.random() < 0.5  # a run written before final.json existed: its torn status line is salvaged,
    keep = last.index(b'"completed"') + len(b'"completed"') if legacy else 1  # if the tear left its status word
    run.events_path.write_bytes(data[: len(data) - len(last) + rng.randrange(keep, len(last) - 1)])
    if legacy:
        run.final_path.unlink()
    return "torn last line", False


# ---- reading it all, as the tabs do ---------------------------------------------------------------------

def read_everything(store: RunStore, ctx) -> dict[str, dict]:
    """Every read a user's page or command makes of the store; returns each run's summary."""
    from studio.ui import evaluate, export, playground, run_picker, train

    out = {}
    for r in store.list():
        out[r.id] = r.summary()
        assert isinstance(r.warnings(), list)
        r.checkpoints()
        r.last_status()
    run_picker.run_choices(store, run_picker.has_adapter)
    run_picker.run_choices(store, run_picker.has_weights)
    train.history_rows(store)
    train.default_run(store)
    store.active()
    for rid in out:
        st = train.run_status(store, rid)
        assert st["id"] == rid and isinstance(st["status"], str)
        shown, _ = train.view(ctx, rid)
        assert isinstance(shown[0], str) and f"`{rid}`" in shown[0]
        train.compare_figure([store.get(rid)])
        playground.run_defaults(store, rid)
        export.snippet(store, rid, False)
        evaluate.show_saved(store, rid)
    return out


def test_any_garbage_in_a_run_folder_is_skipped_reported_and_hides_nothing(tmp_path, tiny_model_dir):
    from studio.follow import Follower
    from studio.ui.context import UIContext

    rng = random.Random(SEED)
    outside = tmp_path / "outside.txt"
    outside.write_text("secret: do not show\n")
    counts: dict[str, int] = {}
    pile = RunStore(tmp_path / "pile" / "runs")
    follower = Follower(interval=3600)
    for i in range(CASES):
        store = RunStore(tmp_path / f"case{i}" / "runs")
        good, victim = healthy(store, "good"), healthy(store, "victim")
        before = {k: v for k, v in victim.summary().items() if k != "warnings"}
        what, sure = plant(rng, store, victim, outside)
        counts[what] = counts.get(what, 0) + 1
        ctx = UIContext(store=store, follower=follower)
        with deadline(60, f"case {i} ({what})"):
            runs = read_everything(store, ctx)
        assert runs["good"]["status"] == "completed" and runs["good"]["step"] == 4, (i, what, runs["good"])
        assert not runs["good"]["warnings"], (i, what, runs["good"])
        if "victim" in runs:
            assert "secret" not in json.dumps(runs["victim"]), (i, what)
        if what in ("bad lines", "torn last line"):
            after = {k: v for k, v in runs["victim"].items() if k != "warnings"}
            assert after == before, (i, what, after, before)  # the good lines still say what they said
        if sure:
            assert runs["victim"]["warnings"] and runs["victim"]["warnings"][0].startswith("events.jsonl: "), (i, what)
        # The victim joins the pile that the command line and the served app read below.
        with contextlib.suppress(OSError):
            os.rename(victim.dir, pile.root / f"case{i}")
    print(f"\n{CASES} cases: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    assert CASES < 400 or len(counts) >= 30  # the generator reached every kind of damage it knows

    healthy(pile, "good")
    env = dict(os.environ, STUDIO_HOME=str(pile.root.parent))
    with deadline(300, "studio runs"):
        out = subprocess.run([sys.executable, "-m", "studio", "runs"], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=240)
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr[-3000:]
    listed = [line.split()[0] for line in out.stdout.splitlines() if not line.startswith(" ")]
    assert "good" in listed and len(listed) >= CASES // 2, out.stdout[-2000:]
    assert "good                                     completed" in out.stdout
    assert "warning: events.jsonl: " in out.stdout
    assert "secret" not in out.stdout


def test_a_torn_final_line_keeps_a_completed_run_completed(tmp_path):
    store = RunStore(tmp_path / "runs")
    run = healthy(store, "done")
    data = run.events_path.read_bytes()
    run.events_path.write_bytes(data[:-20])  # the completed line cut short, as by a crash mid-write
    assert run.status == "completed" and run.last_status()["final"]["train_loss"] == 1.6  # from final.json
    run.final_path.unlink()  # an older run, without final.json: the cut line's status is still read
    fresh = store.get("done")
    assert fresh.status == "completed", fresh.all_events()[-1]
    assert any("cut short" in w for w in fresh.warnings())
    # A writer never glues its line to a torn one.
    run.emit("log", message="after the tear")
    evs = store.get("done").all_events()
    assert evs[-1]["type"] == "log" and evs[-1]["message"] == "after the tear"


@pytest.mark.parametrize("line", [b"\xff\xfe", b"[1]", b'{"t": 1, "type": "metric", "step": "1", "loss": 1}',
                                  b'{"t": 1, "type": "status"}', b'{"type": "log", "message": "m"}'])
def test_each_kind_of_bad_line_from_the_issue_is_skipped_and_reported(tmp_path, line):
    store = RunStore(tmp_path / "runs")
    run = healthy(store, "r")
    with open(run.events_path, "ab") as f:
        f.write(line + b"\n")
    assert parse_event(line)[0] is None
    s = store.get("r").summary()
    assert s["status"] == "completed" and s["train_loss"] == pytest.approx(1.6)
    assert s["warnings"] == [f"events.jsonl: 1 line skipped (byte {len(run.events_path.read_bytes()) - len(line) - 1}:"
                             f" {parse_event(line)[1]})"]


def test_served_app_opens_every_tab_over_a_pile_of_damaged_runs(tmp_path, tiny_model_dir):
    """The app starts, /status answers for each run, and a browser opens every tab without an error."""
    from gradio_client import Client
    from playwright.sync_api import sync_playwright

    from e2e_helpers import CHROMIUM_ARGS, VIEWPORT, chromium_path, serve_app

    rng = random.Random(SEED + 1)
    home = tmp_path / "home"
    store = RunStore(home / "runs")
    outside = tmp_path / "outside.txt"
    outside.write_text("secret\n")
    healthy(store, "good")
    for i in range(40):
        plant(rng, store, healthy(store, f"v{i}"), outside)
    with serve_app(home, tmp_path / "app.log") as url:
        client = Client(url, verbose=False)
        ids = [r.id for r in store.list()]
        for rid in ids:
            st = client.predict(rid, api_name="/status")
            assert st["id"] == rid and isinstance(st["status"], str)
        assert client.predict("good", api_name="/status")["status"] == "completed"
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium_path(), headless=True, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport=VIEWPORT)
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url)
            for tab in ("3 · Train", "4 · Playground", "5 · Evaluate", "6 · Export"):
                page.get_by_role("tab", name=tab).click()
                page.wait_for_timeout(1500)
            page.get_by_role("tab", name="3 · Train").click()
            # The healthy run is listed (the table scrolls: its row may be out of view).
            page.locator("#train-history").get_by_text("good", exact=True).first.wait_for(state="attached",
                                                                                          timeout=60_000)
            toasts = page.locator(".toast-body").all_inner_texts()
            browser.close()
        assert not [t for t in toasts if "rror" in t], toasts
        assert not errors, errors


def test_writers_never_follow_a_link_planted_in_a_run_folder(tmp_path):
    """events.jsonl, final.json and worker.pid replaced by links to a file outside: nothing is written there."""
    store = RunStore(tmp_path / "runs")
    run = healthy(store, "r")
    outside = tmp_path / "precious.txt"
    outside.write_text("keep me\n")
    for p in (run.events_path, run.final_path):
        p.unlink()
        p.symlink_to(outside)
    with pytest.raises(OSError):
        run.emit("log", message="through the link?")
    with pytest.raises(OSError):
        run.finish("failed", message="through the link?")
    with pytest.raises(OSError):
        write_new(run.events_path, b"x")
    assert outside.read_text() == "keep me\n"
    s = store.get("r").summary()
    assert s["status"] == "created" and any("symlink" in w for w in s["warnings"]), s
    run.reserve()  # a resume replaces the link itself with a fresh reservation
    assert not run.final_path.is_symlink() and outside.read_text() == "keep me\n"


def test_files_the_reader_may_not_open_are_reported_not_fatal(tmp_path):
    """Root reads every file, so ``studio runs`` runs here as the user nobody over a home where a run's events,
    config and a whole run folder are mode 000."""
    import shutil
    import tempfile

    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.fail("this case drops to the user nobody with setpriv, as root (CI runs as root)")
    home = Path(tempfile.mkdtemp(prefix="studio-perm-"))
    try:
        os.chmod(home, 0o755)
        store = RunStore(home / "runs")
        healthy(store, "good")
        locked = healthy(store, "locked")
        for p in (locked.events_path, locked.config_path):
            os.chmod(p, 0)
        os.chmod(healthy(store, "sealed").dir, 0)
        for d in (home, store.root, *(p for p in store.root.iterdir() if p.name != "sealed")):
            os.chmod(d, 0o755)
        out = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", sys.executable, "-m",
                              "studio", "runs"], cwd=ROOT, env=dict(os.environ, STUDIO_HOME=str(home)),
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr[-3000:]
        lines = out.stdout.splitlines()
        assert any(line.startswith("good ") and " completed " in line for line in lines), out.stdout
        assert "  warning: events.jsonl: Permission denied" in lines, out.stdout
        assert any(line.startswith("sealed ") for line in lines), out.stdout
        assert "  warning: folder: cannot be read (permission denied)" in lines, out.stdout
    finally:
        for p in home.rglob("*"):
            with contextlib.suppress(OSError):
                os.chmod(p, 0o755)
        shutil.rmtree(home, ignore_errors=True)
