"""Nothing is lost when training goes wrong: OOM, NaN, a killed worker, a killed app, a full disk, a
second browser.

Faults are injected into real worker processes through ``STUDIO_FAULTS`` (see ``studio.faults``); the
runs are the tiny-demo preset cut to 8 steps with a checkpoint every 2.  To keep the file fast on two
cores, one fixture trains four runs roots at the same time (see ``fault_runs``); the app-kill case serves
the real app twice.  The disk-full case mounts a small tmpfs, so the file runs as root (as CI does).

Loss comparisons use the last metric event per step (a resumed run logs again the steps after its
checkpoint) and a tolerance of 1e-4.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from e2e_helpers import answers, free_port
import torch

from studio import worker
from studio.presets import load_preset
from studio.runs import RunStore, pid_alive

ROOT = Path(__file__).resolve().parent.parent
STEPS, SAVE, FAULT_STEP = 8, 2, 5
FAULTS = {"straight": "", "oom": f"oom@{FAULT_STEP}", "nan": f"nan@{FAULT_STEP}", "crash": f"crash@{FAULT_STEP}"}
TOL = 1e-4


def _cfg(**overrides):
    return load_preset("tiny-demo").replace({
        "train.max_steps": STEPS, "train.save_steps": SAVE, "train.eval_steps": 0, "train.logging_steps": 1,
        "train.sample_prompts": 0, "train.batch_size": 4, "train.save_total_limit": 10, **overrides})


def _env(faults: str = "") -> dict:
    env = {k: v for k, v in os.environ.items() if k != "STUDIO_FAULTS"}
    if faults:
        env["STUDIO_FAULTS"] = faults
    return env


def _losses(run) -> dict[int, float]:
    out = {}
    for e in run.all_events():
        if e["type"] == "metric":
            out[e["step"]] = e["loss"]  # the last occurrence per step wins
    return out


def _ck_steps(run) -> list[int]:
    """Steps of every checkpoint folder, complete or not."""
    d = run.checkpoints_dir
    return sorted(int(p.name.split("-")[1]) for p in d.glob("checkpoint-*")) if d.is_dir() else []


def _load_adapter(path):
    """Load a checkpoint with plain peft on the unquantized base; return its LoRA tensors."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from studio.modeling import resolve_base

    base = AutoModelForCausalLM.from_pretrained(resolve_base("studio-tiny-mistral"), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(path))
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def _same_losses(straight, run, after: int, upto: int = STEPS):
    a, b = _losses(straight), _losses(run)
    steps = [s for s in sorted(a) if after < s <= upto]
    assert steps == list(range(after + 1, upto + 1)), (after, sorted(a))
    for s in steps:
        assert abs(a[s] - b[s]) <= TOL, (s, a[s], b[s])


def _wait_for(cond, timeout: float, what: str, poll: float = 0.2):
    end = time.time() + timeout
    while time.time() < end:
        value = cond()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out waiting for {what}")


# ---- OOM, NaN, a killed worker and a full disk, beside a straight run ---------------------------------

@contextlib.contextmanager
def _small_disk(path: Path, size: str = "16m"):
    assert os.geteuid() == 0, "the disk-full case mounts a small tmpfs and needs root (CI runs as root)"
    path.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _fill(disk: Path, leave: int = 64 * 1024) -> None:
    """Fill the disk but ``leave`` bytes: event lines still fit, a checkpoint does not."""
    st = os.statvfs(disk)
    with open(disk / "filler", "wb") as f:
        f.write(b"\0" * (st.f_bavail * st.f_frsize - leave))


@pytest.fixture(scope="module")
def fault_runs(tmp_path_factory, tiny_model_dir):
    """Four runs roots train at once (one training at a time holds per root, as on one machine):
    ``straight`` (the reference), ``nan`` (NaN at step 5), ``crash`` (SIGKILL at step 5, then resumed), and
    a 16 MB disk where an OOM run (at step 5) is followed at once by a run whose disk fills after its first
    checkpoint.  Yields the runs, the statuses each reached, what was seen between the steps, and the disk."""
    with _small_disk(tmp_path_factory.mktemp("disk") / "mnt") as disk:
        roots = {k: RunStore(tmp_path_factory.mktemp(f"faults_{k}")) for k in ("straight", "nan", "crash")}
        roots["disk"] = RunStore(disk / "runs")
        runs = {k: worker.start(roots[k], _cfg(), k, env=_env(FAULTS[k])) for k in ("straight", "nan", "crash")}
        runs["oom"] = worker.start(roots["disk"], _cfg(), "oom", env=_env(FAULTS["oom"]))
        ends, seen, errors = {}, {}, []

        def crash_then_resume():
            ends["crash"] = worker.wait(runs["crash"], timeout=400)
            # As after an app restart: a fresh store over the same folder.
            seen["fresh store"] = {r.id: r.status for r in RunStore(roots["crash"].root).list()}
            seen["resumed from"] = runs["crash"].last_checkpoint()
            worker.resume(roots["crash"], runs["crash"], env=_env())
            ends["resumed"] = worker.wait(runs["crash"], timeout=400)

        def oom_then_full_disk():
            ends["oom"] = worker.wait(runs["oom"], timeout=400)
            # Another run can start right after an OOM: nothing is held, the same root starts the next one.
            seen["active after oom"] = roots["disk"].active()
            full = runs["full"] = worker.start(roots["disk"], _cfg(**{"train.max_steps": 9, "train.save_steps": 3}),
                                               "full", env=_env())
            _wait_for(lambda: any(e["type"] == "checkpoint" for e in full.all_events()) or not full.worker_alive(),
                      400, "checkpoint-3", poll=0.05)
            _fill(disk)
            ends["full"] = worker.wait(full, timeout=300)  # neither dies silently nor hangs

        def catching(fn):
            def run():
                try:
                    fn()
                except BaseException as e:  # noqa: BLE001 - re-raised in the test's thread below
                    errors.append(e)
            return run

        chains = [threading.Thread(target=catching(f)) for f in (crash_then_resume, oom_then_full_disk)]
        try:
            for t in chains:
                t.start()
            for k in ("straight", "nan"):
                ends[k] = worker.wait(runs[k], timeout=400)
            for t in chains:
                t.join(timeout=900)
        finally:
            for r in runs.values():
                if r.worker_alive():
                    worker.stop(r, grace=5)
        if errors:
            raise errors[0]
        yield runs, ends, seen, disk


def test_straight_run_completes(fault_runs):
    runs, ends, *_ = fault_runs
    run = runs["straight"]
    assert ends["straight"] == "completed", run.last_status()
    assert sorted(_losses(run)) == list(range(1, STEPS + 1))
    assert (run.adapter_dir / "adapter_model.safetensors").exists()


def test_oom_fails_with_step_message_and_remedy_keeps_checkpoints_and_frees_the_machine(fault_runs):
    runs, ends, seen, _ = fault_runs
    run = runs["oom"]
    assert ends["oom"] == "failed" and not run.worker_alive()
    last = run.last_status()
    assert last["reason"] == "out_of_memory" and last["step"] == FAULT_STEP - 1
    assert last["message"].startswith(f"out of memory at step {FAULT_STEP - 1}")
    for fix in ("speed.micro_batch", "data.max_length", "speed.gradient_checkpointing"):
        assert fix in last["remedy"]
    assert _ck_steps(run) == [2, 4] and [p.name for p in run.checkpoints()] == ["checkpoint-2", "checkpoint-4"]
    assert _load_adapter(run.last_checkpoint())
    _same_losses(runs["straight"], run, after=0, upto=FAULT_STEP - 1)
    # The next run started at once in the same root (the disk-full run below, which trained to its checkpoints).
    assert seen["active after oom"] is None and runs["full"].checkpoints()


def test_nan_halts_at_that_step_and_overwrites_nothing(fault_runs):
    from studio.ui.train import finish_notice

    runs, ends, *_ = fault_runs
    run = runs["nan"]
    assert ends["nan"] == "halted" and not run.worker_alive()
    last = run.last_status()
    assert last["step"] == FAULT_STEP and f"NaN or infinite at step {FAULT_STEP}" in last["message"]
    assert "learning_rate" in last["remedy"]
    level, text = finish_notice(run.id, run.status, last)  # flagged in the UI as a warning toast
    assert level == "warning" and "halted" in text
    assert _losses(run)[FAULT_STEP] == "nan"
    assert max(_losses(run)) == FAULT_STEP  # training stopped at once
    # Nothing at or after the NaN step was written, and no adapter built from NaN weights.
    assert _ck_steps(run) == [2, 4]
    assert not run.adapter_dir.exists() and not run.adapter_dir.with_name("adapter.partial").exists()
    # The last good checkpoint is intact: it loads, its weights are finite and equal the straight run's.
    from safetensors.torch import load_file

    assert _load_adapter(run.last_checkpoint())
    good = load_file(run.last_checkpoint() / "adapter_model.safetensors")
    ref = load_file(runs["straight"].checkpoints_dir / "checkpoint-4" / "adapter_model.safetensors")
    assert good.keys() == ref.keys() and all(torch.isfinite(t).all() for t in good.values())
    for name, t in good.items():
        torch.testing.assert_close(t, ref[name], rtol=0, atol=1e-5)


def test_killed_worker_is_interrupted_and_resumes_to_the_straight_losses(fault_runs):
    runs, ends, seen, _ = fault_runs
    run = runs["crash"]
    # SIGKILL left no final status: the run reads as interrupted, also to a fresh store (an app restart).
    assert ends["crash"] == "interrupted"
    assert seen["fresh store"] == {"crash": "interrupted"}
    assert seen["resumed from"].name == "checkpoint-4"
    assert ends["resumed"] == "completed", run.last_status()
    assert any(e.get("status") == "resuming" and e.get("checkpoint") == "checkpoints/checkpoint-4"
               for e in run.all_events())
    _same_losses(runs["straight"], run, after=4)
    assert (run.adapter_dir / "adapter_model.safetensors").exists()


# ---- disk full while writing a checkpoint --------------------------------------------------------------

def test_disk_full_during_a_checkpoint_fails_cleanly_and_keeps_the_previous_one(fault_runs):
    runs, ends, _, disk = fault_runs
    run = runs["full"]
    assert not run.worker_alive(), "the worker hangs on a full disk"
    last = run.last_status()
    assert ends["full"] == "failed", last
    assert last.get("reason") == "disk_full", last
    assert last["message"].startswith("disk full at step 6") and "free disk space" in last["remedy"]
    # The previous checkpoint is complete and loadable; the torn one is not listed.
    assert _ck_steps(run) == [3, 6] and [p.name for p in run.checkpoints()] == ["checkpoint-3"]
    (disk / "filler").unlink()
    assert _load_adapter(run.last_checkpoint())


# ---- the app killed with kill -9 while a worker trains; a second browser; stop from the new app -------

def _serve(home: Path, log: Path) -> tuple[subprocess.Popen, str]:
    """``python app.py --port P`` with ``STUDIO_HOME=home``, as a user starts it; returns once it answers."""
    port = free_port()
    env = dict(_env(), STUDIO_HOME=str(home), PYTHONUNBUFFERED="1")
    with open(log, "ab") as f:
        proc = subprocess.Popen([sys.executable, "app.py", "--port", str(port)], cwd=ROOT, env=env, stdout=f,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    end = time.time() + 180
    while not answers(port):
        assert proc.poll() is None, f"app.py exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
        assert time.time() < end, f"app.py did not answer:\n{log.read_text()[-3000:]}"
        time.sleep(0.5)
    return proc, f"http://127.0.0.1:{port}/"


def _end_group(pid: int) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)
            time.sleep(1)


def _start_args(client, name: str, overrides: dict) -> list:
    """The /start endpoint's arguments: every widget at its default, some overridden by their label."""
    params = client.view_api(return_format="dict", print_info=False)["named_endpoints"]["/start"]["parameters"]
    labels = [p["label"] for p in params]
    for label in overrides:
        assert labels.count(label) == 1, (label, labels)
    args = [overrides.get(p["label"], p.get("parameter_default")) for p in params]
    args[0], args[1] = None, name  # the run shown, the run name
    return args


def test_app_killed_mid_run_training_survives_and_the_restarted_app_shows_and_stops_it(tmp_path, tiny_model_dir):
    from gradio_client import Client

    from studio.playground import gpu_busy

    home, log = tmp_path / "home", tmp_path / "app.log"
    store = RunStore(home / "runs")
    app, url = _serve(home, log)
    apps = [app]
    try:
        client = Client(url, verbose=False)
        long_run = {"max steps": 300, "save steps": 2, "eval steps": 0, "logging steps": 1, "sample prompts": 0,
                    "batch size": 4}
        rid, msg = client.predict(*_start_args(client, "survivor", long_run), api_name="/start")
        assert rid == "survivor", msg
        run = store.get("survivor")
        _wait_for(lambda: run.last_checkpoint(), 240, "the first checkpoint")

        os.kill(app.pid, signal.SIGKILL)  # kill -9 the app, not its worker
        app.wait(timeout=30)
        step_at_kill = max(_losses(run))
        assert run.worker_alive(), "the worker died with the app"

        app2, url2 = _serve(home, log)
        apps.append(app2)
        browser_a = Client(url2, verbose=False)
        st = browser_a.predict("survivor", api_name="/status")
        assert st["status"] == "running" and st["step"] > step_at_kill, (st, step_at_kill)  # it kept training

        # A second browser cannot start a second training: a message, not a traceback.
        browser_b = Client(url2, verbose=False)
        other, busy = browser_b.predict(*_start_args(browser_b, "second", long_run), api_name="/start")
        assert other is None and busy.startswith("⚠️") and "'survivor' is training" in busy
        assert [r.id for r in store.list()] == ["survivor"]
        # Loading a second model beside the training is refused only on CUDA; on the CPU it is allowed.
        assert store.active().id == "survivor" and gpu_busy(store) is None

        # Stop from the restarted app: the worker is not its child, yet it ends within seconds.
        pid, t0 = run.worker_pid(), time.time()
        msg = browser_a.predict(api_name="/stop")
        stop_seconds = time.time() - t0
        assert msg.startswith("Run `survivor` is stopped") and "checkpoint-" in msg, msg
        assert stop_seconds < 60, stop_seconds
        assert not pid_alive(pid)  # the process is gone, so is its memory (GPU memory on a GPU)
        st = browser_a.predict("survivor", api_name="/status")
        assert st["status"] == "stopped" and st["step"] > step_at_kill
        ck = run.last_checkpoint()
        assert ck.name in msg and int(ck.name.split("-")[1]) >= step_at_kill
        lora = _load_adapter(ck)  # complete and loadable with plain peft
        assert lora and all(torch.isfinite(t).all() for t in lora.values())
    finally:
        for p in apps:
            _end_group(p.pid)
        with contextlib.suppress(KeyError):
            r = store.get("survivor")
            if r.worker_alive():
                worker.stop(r, grace=5)
