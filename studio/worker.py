"""Training runs in a worker process: start, stop, resume, and the worker's entry point.

Contract:
- ``start(store, cfg, name)`` creates a run directory and launches
  ``python -m studio.worker <run dir>`` with an argument list (never a shell string), in its own
  process group, output to ``logs/worker.log``.  It refuses while another run's worker is alive
  (one training at a time on a machine).  ``resume(run)`` relaunches a stopped, failed or
  interrupted run from its last complete checkpoint.
- ``stop(run)`` is cooperative first (the STOP flag; the worker finishes its step, saves a checkpoint
  and exits), then after ``grace`` seconds ends the whole process group (SIGTERM, then SIGKILL).
- The worker itself (``main``) redacts tokens from everything it prints and always leaves a
  terminal status event, so the app can crash or restart without losing track of a run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from studio.runs import Run, RunStore, pid_alive


class Busy(RuntimeError):
    """Another run is training on this machine."""


ALLOC_CONF = "expandable_segments:True"


def worker_command(run: Run, resume: bool) -> list[str]:
    """The worker's argument list; several GPUs go through ``accelerate launch`` (one process per GPU)."""
    tail = ["studio.worker", str(run.dir)] + (["--resume"] if resume else [])
    t = run.config().train
    n = t.num_gpus
    if n > 1:
        mode = ["--multi_gpu"]
        if t.fsdp:
            # QLoRA + FSDP as peft documents it: full sharding per decoder layer, weights loaded once on
            # the CPU and synced, LoRA wrapped on its own (studio.training sets the peft wrap policy).
            mode = ["--use_fsdp", "--fsdp_version", "1", "--fsdp_sharding_strategy", "FULL_SHARD",
                    "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP", "--fsdp_backward_prefetch", "BACKWARD_PRE",
                    "--fsdp_state_dict_type", "SHARDED_STATE_DICT", "--fsdp_cpu_ram_efficient_loading", "true",
                    "--fsdp_sync_module_states", "true", "--fsdp_use_orig_params", "false",
                    "--fsdp_offload_params", "false", "--fsdp_forward_prefetch", "false"]
        return [sys.executable, "-m", "accelerate.commands.launch", *mode, "--num_processes", str(n),
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", *tail]
    return [sys.executable, "-m", *tail]


def _launch(run: Run, resume: bool, env: dict | None = None) -> int:
    args = worker_command(run, resume)
    run.stop_flag.unlink(missing_ok=True)
    run.log_path.parent.mkdir(exist_ok=True)
    e = dict(os.environ if env is None else env)
    e["PYTHONUNBUFFERED"] = "1"
    # Grow allocator segments instead of caching fixed blocks: less fragmentation, a lower reserved peak
    # (Unsloth sets the same).  A user's own setting wins.
    e.setdefault("PYTORCH_ALLOC_CONF", ALLOC_CONF)
    # Exactly the GPUs the run asked for: with more visible, a single process would fall into
    # nn.DataParallel, which mis-scales the loss and wastes the other cards.
    n = run.config().train.num_gpus
    raw = e.get("CUDA_VISIBLE_DEVICES")
    if raw is None or raw.strip():  # an empty value means the user hid every GPU: keep it so
        visible = [d for d in (raw or "").split(",") if d.strip()] or [str(i) for i in range(64)]
        e["CUDA_VISIBLE_DEVICES"] = ",".join(visible[:n])
    e["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent) + os.pathsep + e.get("PYTHONPATH", "")
    with open(run.log_path, "ab") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env=e, cwd=os.getcwd())
    run.pid_path.write_text(str(proc.pid))
    run.emit("status", status="queued", pid=proc.pid, resume=resume)
    _PROCS[proc.pid] = proc
    # A child that exits stays a zombie of the app until someone waits for it; the app never calls wait(),
    # so a daemon thread does, and forgets the process once it is gone.
    threading.Thread(target=_reap, args=(proc,), name=f"reap-{proc.pid}", daemon=True).start()
    return proc.pid


_PROCS: dict[int, subprocess.Popen] = {}  # workers this process started and has not yet reaped


def _reap(proc: subprocess.Popen) -> None:
    proc.wait()
    _PROCS.pop(proc.pid, None)


def start(store: RunStore, cfg, name: str = "", env: dict | None = None) -> Run:
    active = store.active()
    if active is not None:
        raise Busy(f"run {active.id!r} is training; stop it or wait for it to finish.")
    run = store.create(cfg, name)
    _launch(run, resume=False, env=env)
    return run


def resume(store: RunStore, run: Run, env: dict | None = None) -> Run:
    active = store.active()
    if active is not None:
        raise Busy(f"run {active.id!r} is training; stop it or wait for it to finish.")
    if run.status not in ("stopped", "failed", "interrupted", "halted"):
        raise ValueError(f"run {run.id!r} is {run.status}; only stopped, failed, halted or interrupted runs resume.")
    if run.last_checkpoint() is None:
        raise ValueError(f"run {run.id!r} has no complete checkpoint to resume from.")
    _launch(run, resume=True, env=env)
    return run


def wait(run: Run, timeout: float = 600.0, poll: float = 0.2) -> str:
    """Block until the worker exits; return the run's status."""
    pid = run.worker_pid()
    end = time.time() + timeout
    while pid and time.time() < end:
        p = _PROCS.get(pid)
        if p is not None:
            if p.poll() is not None:
                break
        elif not pid_alive(pid):
            break
        time.sleep(poll)
    return run.status


def stop(run: Run, grace: float = 30.0) -> str:
    run.stop_flag.touch()
    pid = run.worker_pid()
    if pid is None:
        return run.status
    end = time.time() + grace
    while time.time() < end:
        if wait(run, timeout=0.5) and not run.worker_alive():
            return run.status
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except (ProcessLookupError, PermissionError):
            break
        wait(run, timeout=5)
        if not run.worker_alive():
            break
    if run.last_status()["status"] not in ("stopped", "completed", "failed", "halted"):
        ck = run.last_checkpoint()
        run.emit("status", status="stopped", forced=True,
                 checkpoint=str(ck.relative_to(run.dir)) if ck else None)
    return run.status


class _Redacting:
    """Wraps stdout/stderr so no token reaches the worker log."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, s):
        from studio.security import redact

        return self.stream.write(redact(s))

    def flush(self):
        self.stream.flush()

    def __getattr__(self, name):
        return getattr(self.stream, name)


def main(argv: list[str] | None = None) -> int:
    import argparse

    from studio.security import hub_token
    from studio.training import recipe_for

    p = argparse.ArgumentParser(prog="python -m studio.worker")
    p.add_argument("run_dir")
    p.add_argument("--resume", action="store_true")
    a = p.parse_args(argv)
    sys.stdout, sys.stderr = _Redacting(sys.stdout), _Redacting(sys.stderr)
    d = Path(a.run_dir).resolve()
    run = Run(d.name, d)
    if "LOCAL_RANK" in os.environ:  # one GPU per process: default allocations go to this process's GPU
        import torch

        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    if "WORLD_SIZE" not in os.environ:  # under accelerate launch the pid file names the launcher (group leader)
        run.pid_path.write_text(str(os.getpid()))
    status = recipe_for(run)(run, token=hub_token()).execute(resume=a.resume)
    return 0 if status in ("completed", "stopped") else 1


if __name__ == "__main__":
    sys.exit(main())
