"""Training runs in a worker process: start, stop, resume, and the worker's entry point.

Contract:
- ``start(store, cfg, name)`` creates a run directory and launches
  ``python -m studio.worker <run dir>`` with an argument list (never a shell string), in its own
  process group, output to ``logs/worker.log``.  One training at a time per runs root (one machine's
  GPUs): the check for a training run and the launch happen under an exclusive ``flock`` on
  ``<runs root>/.train.lock``, and the worker inherits that lock and holds it while it lives, so a
  second app process (or thread) sees it at once, and a crashed worker or app never blocks the next run
  (the kernel drops the lock with the last process holding it).  ``resume(run)`` relaunches a stopped,
  failed or interrupted run from its last complete checkpoint, under the same lock.
- ``stop(run)`` is cooperative first (the STOP flag; the worker finishes its step, saves a checkpoint
  and exits), then after ``grace`` seconds ends the whole process group (SIGTERM, then SIGKILL).
- The worker itself (``main``) redacts tokens from everything it prints and always leaves a
  terminal status event with a reason and a remedy (``Run.finish``, which survives a full disk), so the
  app can crash or restart without losing track of a run.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from studio.runs import TERMINAL, Run, RunStore, pid_alive, read_regular


class Busy(RuntimeError):
    """Another run is training on this machine."""


LOCK_NAME = ".train.lock"


def _busy(store: RunStore, run_id: str | None = None, wait: float = 3.0) -> Busy:
    """Busy, naming the training run: given, or read from the holder's record (written by the holder right after
    it created its run; a racing starter may look a moment before that, so it looks again for a few seconds)."""
    end = time.monotonic() + wait
    while run_id is None:
        try:
            rec = json.loads(read_regular(store.root / LOCK_NAME, limit=4096) or b"{}")
            if isinstance(rec.get("run"), str) and isinstance(rec.get("pid"), int) and pid_alive(rec["pid"]):
                run_id = rec["run"]
                break
        except (OSError, ValueError, AttributeError):
            pass
        if time.monotonic() > end:
            break
        time.sleep(0.05)
    who = f"run {run_id!r}" if isinstance(run_id, str) else "another run"
    return Busy(f"{who} is training; stop it or wait for it to finish.")


@contextlib.contextmanager
def launch_lock(store: RunStore):
    """The exclusive lock on the runs root, for the check and the launch; yields its file descriptor,
    which the worker inherits (``_launch``) so that the lock lives exactly as long as the training."""
    from studio.failures import DiskFull, is_disk_full

    try:
        fd = os.open(store.root / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as e:
        if is_disk_full(e):
            raise DiskFull(store.root, "starting a run") from e
        raise
    try:
        end = time.monotonic() + EXIT_WAIT
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                # A worker that wrote its final status is only exiting (freeing memory): wait for it a little
                # rather than call a finished run "training".
                if time.monotonic() > end or not _holder_finished(store):
                    raise _busy(store) from None
                time.sleep(0.1)
        yield fd
    finally:
        os.close(fd)


EXIT_WAIT = 30.0


def _holder_finished(store: RunStore) -> bool:
    try:
        rec = json.loads(read_regular(store.root / LOCK_NAME, limit=4096) or b"{}")
        return store.get(rec["run"]).last_status()["status"] in TERMINAL
    except Exception:  # noqa: BLE001 - no readable record: not known to be finished
        return False


def _record_holder(fd: int, run: Run, pid: int) -> None:
    with contextlib.suppress(OSError):  # only for the message a second starter shows
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"run": run.id, "pid": pid, "t": round(time.time(), 3)}).encode(), 0)


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


def _launch(run: Run, resume: bool, env: dict | None = None, lock_fd: int | None = None) -> int:
    from studio.failures import DiskFull, is_disk_full

    args = worker_command(run, resume)
    run.stop_flag.unlink(missing_ok=True)
    try:
        run.log_path.parent.mkdir(exist_ok=True)
        run.reserve()  # room for the terminal status, claimed before training fills the disk
    except OSError as e:
        if is_disk_full(e):
            raise DiskFull(run.dir, "starting the worker") from e
        raise
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
    if lock_fd is not None:
        e["STUDIO_LOCK_FD"] = str(lock_fd)
    with open(run.log_path, "ab") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env=e, cwd=os.getcwd(),
                                pass_fds=() if lock_fd is None else (lock_fd,))
    try:
        from studio.runs import write_new

        write_new(run.pid_path, str(proc.pid).encode())
        run.emit("status", status="queued", pid=proc.pid, resume=resume)
    except BaseException as err:  # a worker nobody can see must not train: end it
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        if isinstance(err, OSError) and is_disk_full(err):
            raise DiskFull(run.dir, "starting the worker") from err
        raise
    if lock_fd is not None:
        _record_holder(lock_fd, run, proc.pid)
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
    import shutil

    with launch_lock(store) as fd:
        active = store.active()  # a worker started before this lock existed
        if active is not None:
            raise _busy(store, active.id)
        run = store.create(cfg, name)
        _record_holder(fd, run, os.getpid())
        try:
            _launch(run, resume=False, env=env, lock_fd=fd)
        except BaseException:
            shutil.rmtree(run.dir, ignore_errors=True)  # no run is left half-created
            raise
    return run


def _resumable(run: Run) -> None:
    if run.status not in ("stopped", "failed", "interrupted", "halted"):
        raise ValueError(f"run {run.id!r} is {run.status}; only stopped, failed, halted or interrupted runs resume.")
    if run.last_checkpoint() is None:
        raise ValueError(f"run {run.id!r} has no complete checkpoint to resume from.")


def resume(store: RunStore, run: Run, env: dict | None = None) -> Run:
    _resumable(run)  # what the run is decides first: a completed run is never "busy"
    with launch_lock(store) as fd:
        active = store.active()
        if active is not None:
            raise _busy(store, active.id)
        _resumable(run)
        _record_holder(fd, run, os.getpid())
        _launch(run, resume=True, env=env, lock_fd=fd)
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
    from studio.runs import write_new

    with contextlib.suppress(OSError):  # never through a link planted as STOP
        write_new(run.stop_flag, b"")
    pid = run.worker_pid()
    if pid is None:
        return run.status
    end = time.time() + grace
    while time.time() < end:
        if wait(run, timeout=0.5) and not run.worker_alive():
            return run.status
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not run.worker_alive():
            break  # a stale pid file names another program's process (group): never signal it
        try:
            os.killpg(pid, sig)
        except (ProcessLookupError, PermissionError):
            break
        wait(run, timeout=5)
        if not run.worker_alive():
            break
    if run.last_status()["status"] not in TERMINAL:
        ck = run.last_checkpoint()
        run.finish("stopped", forced=True, checkpoint=str(ck.relative_to(run.dir)) if ck else None)
    return run.status


class _Redacting:
    """Wraps stdout/stderr so no token reaches the worker log."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, s):
        from studio.security import redact

        try:
            return self.stream.write(redact(s))
        except OSError:  # a full disk: the run's status says so (Run.finish); the log must not end the run
            return len(s)

    def flush(self):
        with contextlib.suppress(OSError):
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
    fd = os.environ.pop("STUDIO_LOCK_FD", None)
    if fd and fd.isdigit():  # held while this process lives; processes it execs do not inherit it
        with contextlib.suppress(OSError):
            os.set_inheritable(int(fd), False)
    try:
        if "LOCAL_RANK" in os.environ:  # one GPU per process: default allocations go to this process's GPU
            import torch

            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        if "WORLD_SIZE" not in os.environ:  # under accelerate launch the pid file names the launcher (group leader)
            from studio.runs import write_new

            write_new(run.pid_path, str(os.getpid()).encode())
        status = recipe_for(run)(run, token=hub_token()).execute(resume=a.resume)
    except BaseException as e:  # noqa: BLE001 - what execute could not record (a garbled config, a failed start)
        from studio.failures import describe

        if isinstance(e, KeyboardInterrupt):
            run.finish("stopped", reason="interrupted", message="the worker was interrupted",
                       remedy="resume the run from its last checkpoint.")
        else:
            from studio.config import ConfigError

            info = ({"reason": "input", "message": str(e), "remedy": "fix the named field or file and start again."}
                    if isinstance(e, ConfigError) else describe(e, 0, run.dir))
            run.finish("failed", step=0, **info)
        raise
    return 0 if status in ("completed", "stopped") else 1


if __name__ == "__main__":
    sys.exit(main())
