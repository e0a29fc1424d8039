"""One training at a time per runs root, however many starts arrive at once (issue 21, item 4).

Starts race from threads of one process, from separate processes and through two served apps' ``/start``;
each time exactly one worker trains and no other run folder is left.  A crashed holder (an app killed inside
the launch, a worker killed with SIGKILL) and a stale pid file naming another living program block nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from e2e_helpers import serve_app
from studio import worker
from studio.presets import load_preset
from studio.runs import RunStore, pid_alive

ROOT = Path(__file__).resolve().parent.parent
RACERS = 8


def _long():
    return load_preset("tiny-demo").replace({"train.max_steps": 300, "train.save_steps": 0, "train.eval_steps": 0,
                                              "train.sample_prompts": 0})


def _training(store: RunStore) -> list:
    return [r for r in store.list() if r.worker_alive()]


def _stop_all(store: RunStore) -> None:
    for r in store.list():
        if r.worker_alive():
            worker.stop(r, grace=3)


def test_starts_racing_in_threads_launch_one_worker(tmp_path):
    for round_ in range(3):
        store = RunStore(tmp_path / f"round{round_}" / "runs")
        gate = threading.Barrier(RACERS)
        started, busy, other = [], [], []

        def race(i):
            gate.wait()
            try:
                started.append(worker.start(store, _long(), f"t{i}"))
            except worker.Busy as e:
                busy.append(str(e))
            except BaseException as e:  # noqa: BLE001 - reported below
                other.append(repr(e))

        threads = [threading.Thread(target=race, args=(i,)) for i in range(RACERS)]
        try:
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            assert not other, other
            assert len(started) == 1 and len(busy) == RACERS - 1, (started, busy)
            assert all(f"run {started[0].id!r} is training" in b for b in busy), busy
            assert [r.id for r in store.list()] == [started[0].id]  # no half-created folder of a loser
            assert [r.id for r in _training(store)] == [started[0].id]
        finally:
            _stop_all(store)


RACER = """
import json, sys, time
sys.path.insert(0, {root!r})
from studio import worker
from studio.presets import load_preset
from studio.runs import RunStore
store = RunStore({runs!r})
cfg = load_preset("tiny-demo").replace({{"train.max_steps": 300, "train.save_steps": 0, "train.eval_steps": 0,
                                         "train.sample_prompts": 0}})
while time.time() < {go}:
    time.sleep(0.001)
try:
    print(json.dumps({{"started": worker.start(store, cfg, sys.argv[1]).id}}))
except worker.Busy as e:
    print(json.dumps({{"busy": str(e)}}))
"""


def test_starts_racing_in_separate_processes_launch_one_worker(tmp_path):
    for round_ in range(2):
        store = RunStore(tmp_path / f"round{round_}" / "runs")
        go = time.time() + 25  # every racer imports the studio first, then all start at this instant
        code = RACER.format(root=str(ROOT), runs=str(store.root), go=go)
        procs = [subprocess.Popen([sys.executable, "-c", code, f"p{i}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, cwd=ROOT) for i in range(6)]
        try:
            outs = [p.communicate(timeout=120) for p in procs]
            assert all(p.returncode == 0 for p in procs), [e[-2000:] for _, e in outs]
            assert time.time() > go
            results = [json.loads(o.strip().splitlines()[-1]) for o, _ in outs]
            winners = [r["started"] for r in results if "started" in r]
            assert len(winners) == 1, results
            assert all(f"run {winners[0]!r} is training" in r["busy"] for r in results if "busy" in r), results
            assert [r.id for r in store.list()] == winners
            assert [r.id for r in _training(store)] == winners  # its starter exited; the worker holds the lock
        finally:
            _stop_all(store)


def test_a_crashed_holder_or_a_stale_pid_file_blocks_nothing(tmp_path):
    store = RunStore(tmp_path / "runs")
    # An app killed with SIGKILL while it held the lock (between the check and the launch).
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; sys.path.insert(0, %r)\n"
        "from studio import worker\nfrom studio.runs import RunStore\n"
        "with worker.launch_lock(RunStore(%r)):\n    print('held', flush=True); time.sleep(600)\n")
        % (str(ROOT), str(store.root))], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        try:
            worker.start(store, _long(), "blocked")
            raise AssertionError("started while another process held the lock")
        except worker.Busy:
            pass
        assert store.list() == []
    finally:
        holder.kill()
        holder.wait()
    # A worker killed with SIGKILL: the next start needs nobody to clean up.
    first = worker.start(store, _long(), "first")
    pid = first.worker_pid()
    os.killpg(pid, signal.SIGKILL)
    worker.wait(first, timeout=30)
    assert first.status == "interrupted"
    # Its pid file now names another living program (the number was reused): not a worker of this run.
    sleeper = subprocess.Popen(["sleep", "300"])
    try:
        first.pid_path.write_text(str(sleeper.pid))
        assert pid_alive(sleeper.pid) and not first.worker_alive() and store.active() is None
        worker.stop(first, grace=1)  # as `studio stop first` does: the program the stale file names lives on
        assert pid_alive(sleeper.pid)
        second = worker.start(store, _long(), "second")
        try:
            assert second.worker_alive() and [r.id for r in _training(store)] == ["second"]
        finally:
            worker.stop(second, grace=3)
    finally:
        sleeper.kill()
        sleeper.wait()


def _start_args(client, name: str) -> list:
    """The /start endpoint's arguments: every widget at its default, a long run."""
    params = client.view_api(return_format="dict", print_info=False)["named_endpoints"]["/start"]["parameters"]
    long_run = {"max steps": 300, "save steps": 0, "eval steps": 0, "sample prompts": 0}
    args = [long_run.get(p["label"], p.get("parameter_default")) for p in params]
    args[0], args[1] = None, name
    return args


def test_two_served_apps_answer_racing_starts_with_one_run(tmp_path, tiny_model_dir):
    from gradio_client import Client

    home = tmp_path / "home"
    store = RunStore(home / "runs")
    with contextlib.ExitStack() as stack:
        urls = [stack.enter_context(serve_app(home, tmp_path / f"app{i}.log")) for i in range(2)]
        clients = [Client(u, verbose=False) for u in urls for _ in range(2)]  # two browsers on each app
        args = [_start_args(c, f"s{i}") for i, c in enumerate(clients)]
        gate = threading.Barrier(len(clients))
        answers = [None] * len(clients)

        def press(i):
            gate.wait()
            answers[i] = clients[i].predict(*args[i], api_name="/start")

        threads = [threading.Thread(target=press, args=(i,)) for i in range(len(clients))]
        try:
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
            started = [rid for rid, _ in answers if rid]
            assert len(started) == 1, answers
            busy = [msg for rid, msg in answers if not rid]
            assert all(m.startswith("⚠️") and f"'{started[0]}' is training" in m for m in busy), answers
            assert [r.id for r in store.list()] == started and [r.id for r in _training(store)] == started
        finally:
            _stop_all(store)
