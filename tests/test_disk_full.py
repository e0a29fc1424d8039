"""A full disk ends every run with a final status, a reason and a remedy, and leaves nothing half-created
(issue 21, item 6).  Real ENOSPC: each case mounts a small tmpfs (the tests run as root, as CI does) and fills
it to the last byte.

- a worker whose disk fills while it trains fails at the checkpoint it could not write, with ``disk_full``,
  the step, the place and the remedy, in its events, its ``final.json`` and the last lines of its log;
- starting a run on a full disk (the engine, the CLI, the served app's ``/start``) refuses with the same
  words and leaves no run folder;
- a worker that fails before its recipe starts (a garbled config) records a status, a reason and a remedy too;
- an upload to the served app on a full disk is answered with that message, not a bare HTTP 500, and a
  browser shows it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from studio import worker
from studio.presets import load_preset
from studio.runs import RunStore

ROOT = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def small_disk(path: Path, size: str):
    assert os.geteuid() == 0, "the disk-full cases mount a small tmpfs and need root (CI runs as root)"
    path.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(disk: Path, *top_up: Path) -> None:
    """Fill the disk to the last byte, then the slack of the last block of each file in ``top_up`` (spaces)."""
    for path, byte in ((disk / "filler", b"\0"), *((p, b" ") for p in top_up)):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        try:
            for chunk in (1 << 20, 4096, 1):
                with contextlib.suppress(OSError):
                    while True:
                        os.write(fd, byte * chunk)
        finally:
            os.close(fd)
    with pytest.raises(OSError) as e:
        (disk / "probe").write_bytes(b"x")
    assert e.value.errno == errno.ENOSPC


def _cfg(**overrides):
    return load_preset("tiny-demo").replace({"train.eval_steps": 0, "train.sample_prompts": 0, "train.batch_size": 4,
                                              "train.save_total_limit": 10, **overrides})


def _left(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name != worker.LOCK_NAME)


def test_final_status_is_written_on_a_disk_without_one_free_byte(tmp_path):
    with small_disk(tmp_path / "disk", "2m") as disk:
        store = RunStore(disk / "runs")
        run = store.create(_cfg(), "r")
        run.emit("status", status="running", step=0, max_steps=8)
        fill(disk, run.events_path, run.log_path)
        with pytest.raises(OSError):
            run.emit("metric", step=1, loss=1.0)  # an ordinary event does not fit
        run.finish("failed", step=1, reason="disk_full", message="disk full at step 1", remedy="free disk space")
        again = RunStore(disk / "runs").get("r")  # as a restarted app reads it
        last = again.last_status()
        assert again.status == "failed" and last["reason"] == "disk_full" and last["remedy"] == "free disk space"
        assert '"status": "failed"' in again.final_path.read_text()
        # The reservation went back to the disk: the worker's last words fit in its log.
        with open(again.log_path, "a") as log:
            log.write("[failed] disk full at step 1 - free disk space\n")


def test_disk_filling_during_training_fails_at_the_checkpoint_with_reason_remedy_and_log(tmp_path, tiny_model_dir):
    with small_disk(tmp_path / "disk", "24m") as disk:
        store = RunStore(disk / "runs")
        # No metric line between checkpoints: the first write after the disk fills is checkpoint-6.
        run = worker.start(store, _cfg(**{"train.max_steps": 9, "train.save_steps": 3, "train.logging_steps": 50}),
                           "full", env={k: v for k, v in os.environ.items() if k != "STUDIO_FAULTS"})
        try:
            end = time.time() + 400
            while not any(e["type"] == "checkpoint" for e in run.all_events()) and run.worker_alive():
                assert time.time() < end, "no first checkpoint"
                time.sleep(0.05)
            fill(disk, run.events_path, run.log_path)  # not a byte left, not even in the files' last blocks
            status = worker.wait(run, timeout=300)
        finally:
            if run.worker_alive():
                worker.stop(run, grace=5)
        fresh = RunStore(disk / "runs").get("full")
        last = fresh.last_status()
        assert status == "failed" and fresh.status == "failed", last
        assert last["reason"] == "disk_full" and last["message"].startswith("disk full at step 6"), last
        assert "free disk space on" in last["remedy"] and "STUDIO_HOME" in last["remedy"], last
        assert [p.name for p in fresh.checkpoints()] == ["checkpoint-3"]
        # The status is both in the events file and in final.json, and the log ends with the reason.
        assert '"reason": "disk_full"' in fresh.events_path.read_text().splitlines()[-1]
        assert '"reason": "disk_full"' in fresh.final_path.read_text()
        assert "[failed] disk full at step 6" in fresh.log_tail()
        cli = subprocess.run([sys.executable, "-m", "studio", "runs"], cwd=ROOT, capture_output=True, text=True,
                             env=dict(os.environ, STUDIO_HOME=str(disk)), timeout=120)
        assert cli.returncode == 0 and "full" in cli.stdout and "failed" in cli.stdout, cli.stdout + cli.stderr


def test_starting_on_a_full_disk_refuses_with_the_remedy_and_leaves_no_folder(tmp_path, tiny_model_dir):
    with small_disk(tmp_path / "disk", "2m") as disk:
        store = RunStore(disk / "runs")
        (store.root / worker.LOCK_NAME).touch()
        fill(disk)
        with pytest.raises(OSError) as e:
            worker.start(store, _cfg(), "nope")
        assert e.value.errno == errno.ENOSPC
        assert str(e.value).startswith(f"disk full at {store.root}") and "move STUDIO_HOME" in str(e.value)
        assert _left(store.root) == []
        cli = subprocess.run([sys.executable, "-m", "studio", "train", "--preset", "tiny-demo", "--name", "cli",
                              "--data", str(ROOT / "samples" / "finance_alpaca.jsonl")], cwd=ROOT, capture_output=True,
                             text=True, env=dict(os.environ, STUDIO_HOME=str(disk)), timeout=300)
        assert cli.returncode == 2 and "Traceback" not in cli.stderr, cli.stderr[-3000:]
        err = [line for line in cli.stderr.splitlines() if line.startswith("error: ")]
        assert err and err[0].startswith("error: disk full at") and "STUDIO_HOME" in err[0], cli.stderr
        assert _left(store.root) == []


def test_served_app_on_a_full_disk_answers_start_and_upload_with_the_reason(tmp_path, tiny_model_dir):
    import httpx
    from gradio_client import Client
    from playwright.sync_api import sync_playwright

    from e2e_helpers import CHROMIUM_ARGS, VIEWPORT, chromium_path, serve_app

    with small_disk(tmp_path / "disk", "64m") as disk:
        with serve_app(disk, tmp_path / "app.log") as url:
            client = Client(url, verbose=False)
            params = client.view_api(return_format="dict", print_info=False)["named_endpoints"]["/start"]["parameters"]
            args = [p.get("parameter_default") for p in params]
            args[0], args[1] = None, "on-full-disk"
            fill(disk)
            rid, msg = client.predict(*args, api_name="/start")
            assert rid is None and msg.startswith("⚠️") and "disk full at" in msg and "STUDIO_HOME" in msg, msg
            assert _left(disk / "runs") == []
            r = httpx.post(url + "gradio_api/upload", files={"files": ("data.jsonl", b'{"a": 1}\n' * 50_000)},
                           timeout=60)
            assert r.status_code == 507, (r.status_code, r.text[:500])
            assert "disk full at" in r.text and "STUDIO_HOME" in r.text, r.text[:500]
            # What a person sees who drops a file on the Data tab: the same words in the page's error toast.
            own = tmp_path / "mine.jsonl"
            own.write_bytes(b'{"instruction": "q", "output": "a"}\n' * 2000)
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=chromium_path(), headless=True, args=CHROMIUM_ARGS)
                page = browser.new_page(viewport=VIEWPORT)
                page.goto(url)
                page.locator("#data-upload input[type=file]").set_input_files(str(own))
                toast = page.locator(".toast-body").filter(has_text="disk full at")
                toast.first.wait_for(timeout=60_000)
                text = toast.first.inner_text()
                browser.close()
            assert "HTTP 507" in text and "STUDIO_HOME" in text and "Internal Server Error" not in text, text


def test_an_upload_that_fills_the_disk_is_refused_in_words_and_leaves_no_part_file(tmp_path, monkeypatch):
    from studio.ui.data import on_upload

    with small_disk(tmp_path / "disk", "2m") as disk:
        monkeypatch.setenv("STUDIO_HOME", str(disk / "home"))
        received = disk / "gradio_tmp" / "data.jsonl"  # where Gradio put the upload, on the same disk
        received.parent.mkdir()
        received.write_bytes(b'{"instruction": "q", "output": "a"}\n' * 36_000)
        path, _, note, _ = on_upload(str(received), "samples/finance_alpaca.jsonl")
        assert path == "samples/finance_alpaca.jsonl"  # the current data stays chosen
        assert note.startswith("⚠️ Upload refused: disk full at") and "STUDIO_HOME" in note, note
        assert list((disk / "home" / "uploads").iterdir()) == []


def test_a_worker_that_cannot_read_its_config_still_ends_with_reason_and_remedy(tmp_path):
    """A failure before the recipe starts (here a config.yaml garbled after the run was created) is recorded too."""
    store = RunStore(tmp_path / "runs")
    run = store.create(_cfg(), "garbled")
    run.config_path.write_bytes(b"train: [\xff")
    out = subprocess.run([sys.executable, "-m", "studio.worker", str(run.dir)], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode != 0
    last = store.get("garbled").last_status()
    assert last["status"] == "failed" and last["reason"] == "input", last
    assert "garbled/config.yaml" in last["message"] and last["remedy"], last
