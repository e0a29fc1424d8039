"""The Train tab: figures and texts from events, the run history, the tick's bookkeeping, and the served
tab driven through its API (start, status, a refused second start, stop) with real worker runs.

Stand-ins for the Data and Presets tabs hold real widgets for a few keys; the runs are the tiny-demo
preset cut to a few steps, so each takes well under a minute on two CPU cores.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass

import gradio as gr
import pytest
from gradio_client import Client

from conftest import CANARY, SAMPLES
from studio.runs import status_of
from studio import worker
from studio.presets import load_preset
from studio.runs import RunStore
from studio.ui import train
from studio.ui.context import UIContext
from studio.ui.widgets import widget

GIB = 2**30
T0 = 1_000_000.0


# ---- synthetic events ----------------------------------------------------------------------------

def _metric(step, t, device="cpu", **kw):
    mem = ({"device": "cpu", "rss": (1 + step / 10) * GIB, "used": 6 * GIB, "total": 16 * GIB} if device == "cpu"
           else {"device": "cuda", "allocated": 3 * GIB, "peak": (4 + step / 10) * GIB, "used": 5 * GIB,
                 "total": 24 * GIB})
    ev = {"t": t, "type": "metric", "step": step, "max_steps": 10, "epoch": step / 10, "loss": 2.0 - 0.1 * step,
          "learning_rate": 1e-3 * (1 - step / 10), "grad_norm": 1.0, "tokens_per_s": 1500.0,
          "tokens_seen": 100 * step, "elapsed": 2.0 * step, "memory": mem}
    ev.update(kw)
    return ev


def _events(device="cpu"):
    evs = [{"t": T0 - 5, "type": "status", "status": "created"},
           {"t": T0 - 4, "type": "status", "status": "queued", "pid": 1},
           {"t": T0 - 3, "type": "status", "status": "starting", "device": device},
           {"t": T0 - 2, "type": "data", "train": 100, "validation": 10, "skipped": 0},
           {"t": T0, "type": "status", "status": "running", "step": 0, "max_steps": 10}]
    for step in range(1, 5):
        evs.append(_metric(step, T0 + 2 * step, device))
        if step % 2 == 0:
            evs.append({"t": T0 + 2 * step, "type": "eval", "step": step, "eval_loss": 2.0 - 0.05 * step})
            evs.append({"t": T0 + 2 * step, "type": "sample", "step": step, "prompt": "What is ROI?", "input": "",
                        "reference": "ROI is gain over cost.", "answer": f"answer at {step}"})
    return evs


def _traces(fig):
    return {t.name: t for t in fig.data}


def test_loss_figure_has_train_eval_and_lr_on_second_axis():
    fig = train.loss_figure(_events())
    tr = _traces(fig)
    assert set(tr) == {"training loss", "validation loss", "learning rate"}
    assert list(tr["training loss"].x) == [1, 2, 3, 4]
    assert list(tr["training loss"].y) == pytest.approx([1.9, 1.8, 1.7, 1.6])
    assert list(tr["validation loss"].x) == [2, 4]
    assert tr["learning rate"].yaxis == "y2" and fig.layout.yaxis2.overlaying == "y"


def test_loss_figure_keeps_last_value_per_step_and_skips_nan():
    evs = _events() + [{"t": T0 + 20, "type": "status", "status": "running", "step": 3, "max_steps": 10},
                       _metric(4, T0 + 22, loss=1.55), _metric(5, T0 + 24, loss="nan")]
    tr = _traces(train.loss_figure(evs))
    assert list(tr["training loss"].x) == [1, 2, 3, 4]  # step 5's NaN is not drawn
    assert tr["training loss"].y[-1] == pytest.approx(1.55)  # the resumed run's value for step 4


def test_progress_text_has_step_epoch_elapsed_eta_and_tokens_per_s():
    text = train.progress_text(_events(), "running", now=T0 + 8)
    assert "<progress value='4' max='10'" in text
    # tokens/s is the run's average (400 tokens in 8 s), not the last interval's 1,500.
    for part in ("step 4 / 10 (40%)", "epoch 0.40", "elapsed 0:00:08", "ETA 0:00:12", "50 tokens/s average",
                 "running"):
        assert part in text, (part, text)


def test_progress_text_counts_earlier_segments_and_ends_with_zero_eta():
    evs = _events() + [{"t": T0 + 100, "type": "status", "status": "running", "step": 4, "max_steps": 10}]
    evs += [_metric(s, T0 + 100 + 3 * (s - 4), elapsed=3.0 * (s - 4)) for s in range(5, 11)]
    evs.append({"t": T0 + 120, "type": "status", "status": "completed", "step": 10})
    text = train.progress_text(evs, "completed")
    assert "step 10 / 10 (100%)" in text and "elapsed 0:00:26" in text and "ETA 0:00:00" in text
    assert "38 tokens/s average" in text  # 1,000 tokens over both segments' 26 s
    waiting = train.progress_text(_events()[:3], "starting")
    assert "waiting for the first training step" in waiting


def test_completed_run_reads_100_percent_though_its_last_metric_was_earlier():
    # logging_steps=2 over 47 steps: the last metric is at step 46, the final status at step 47.
    evs = [{"t": T0, "type": "status", "status": "running", "step": 0, "max_steps": 47}]
    evs += [_metric(s, T0 + s, max_steps=47, elapsed=float(s)) for s in range(2, 47, 2)]
    assert "step 46 / 47 (98%)" in train.progress_text(evs, "running", now=T0 + 46.5)
    evs.append({"t": T0 + 48, "type": "status", "status": "completed", "step": 47, "final": {}})
    text = train.progress_text(evs, "completed")
    assert "step 47 / 47 (100%)" in text and "<progress value='47' max='47'" in text and "ETA 0:00:00" in text
    # A run stopped between two metrics shows the step it stopped at, short of the end.
    stopped = evs[:-2] + [{"t": T0 + 45, "type": "status", "status": "stopped", "step": 45}]
    assert "step 45 / 47 (96%)" in train.progress_text(stopped, "stopped")


def test_memory_gauge_says_ram_on_cpu_and_gpu_on_cuda():
    fig = train.memory_figure(_events("cpu"))
    ind = fig.data[0]
    assert ind.type == "indicator" and "system RAM in use" in ind.title.text and "GPU memory" not in ind.title.text
    assert ind.value == pytest.approx(6.0) and ind.gauge.axis.range[1] == pytest.approx(16.0)
    assert ind.gauge.threshold.value == pytest.approx(1.4)  # the worker's peak RSS over the run
    ind = train.memory_figure(_events("cuda")).data[0]
    assert "GPU memory" in ind.title.text and ind.value == pytest.approx(5.0)
    assert ind.gauge.threshold.value == pytest.approx(4.4)
    empty = train.memory_figure(_events()[:4])
    assert "waiting for the first step" in empty.layout.annotations[0].text


def test_memory_shows_one_bar_per_gpu_when_a_run_spans_several():
    gpus = [{"index": i, "used": (10 + i) * GIB, "total": 80 * GIB} for i in range(4)]
    evs = _events("cuda") + [_metric(5, T0 + 10, "cuda")]
    evs[-1]["memory"]["gpus"] = gpus
    fig = train.memory_figure(evs)
    track, used = fig.data
    assert list(used.y) == ["GPU 0", "GPU 1", "GPU 2", "GPU 3"] and list(track.y) == list(used.y)
    assert list(used.x) == pytest.approx([10, 11, 12, 13]) and list(track.x) == pytest.approx([80] * 4)
    assert used.text[1] == "11.0 / 80 GiB" and "per GPU" in fig.layout.title.text
    # One GPU listed: the single gauge stays.
    evs[-1]["memory"]["gpus"] = gpus[:1]
    assert train.memory_figure(evs).data[0].type == "indicator"


def test_sample_rows_newest_step_first():
    rows = train.sample_rows(_events())
    assert [r[0] for r in rows] == [4, 2]
    assert rows[0][1:] == ["What is ROI?", "ROI is gain over cost.", "answer at 4"]


def test_status_and_notice_for_failed_halted_completed_and_interrupted():
    fail = {"t": T0 + 9, "type": "status", "status": "failed", "step": 4, "message": "out of memory at step 4",
            "remedy": "lower train.batch_size"}
    evs = _events() + [fail]
    md = train.status_text("r1", evs, status_of(evs, alive=False))
    assert "failed" in md and "out of memory at step 4" in md and "lower train.batch_size" in md
    assert "100 training and 10 validation examples" in md
    level, text = train.finish_notice("r1", "failed", fail)
    assert level == "warning" and "out of memory" in text and "lower train.batch_size" in text
    halted = {"status": "halted", "step": 3, "message": "the loss became NaN", "remedy": "lower the learning rate"}
    assert train.finish_notice("r1", "halted", halted)[0] == "warning"
    done = {"status": "completed", "step": 10, "final": {"train_loss": 1.23456, "eval_loss": 1.5}}
    level, text = train.finish_notice("r1", "completed", done)
    assert level == "info" and "1.2346" in text and "1.5000" in text
    assert train.finish_notice("r1", "running", {"status": "running"}) is None
    # A live status whose worker is gone reads as interrupted.
    assert status_of(_events(), alive=False) == "interrupted"
    assert status_of(_events(), alive=True) == "running"
    assert "Resume" in train.status_text("r1", _events(), "interrupted")


def test_status_names_the_plan_the_gpu_got():
    """The plan event of studio.speed (each part the planner switched on, its notes), then what took effect."""
    plan = {"t": T0 + 1, "type": "plan", "device": "NVIDIA L4", "micro_batch": 8, "grad_accum": 1,
            "compute_dtype": "fp16", "gradient_checkpointing": False, "cuda_graphs": True, "weight_cache": True,
            "liger": True, "estimate_gib": 25.43, "notes": ["NVIDIA L4 has no spare RAM."]}
    extra = [plan, {"t": T0 + 2, "type": "weight_cache", "gib": 13.0},
             {"t": T0 + 3, "type": "graphs", "layers": 32, "shape": [8, 128], "seconds": 3.1}]
    md = train.status_text("r1", _events() + extra, "running")
    assert ("Plan on NVIDIA L4: micro-batch 8 × accumulation 1, fp16, 16-bit weight cache, Liger kernels, CUDA "
            "graphs; estimated peak 25.43 GiB. ⚠️ NVIDIA L4 has no spare RAM.") in md
    assert "In effect: CUDA graphs (32 layers) (captured in 3.1 s); 16-bit weight cache (13.0 GiB)." in md
    assert "Plan on" not in train.status_text("r1", _events(), "running")
    # A run of an earlier version (auto_batch's plan event) still reads.
    old = {"t": T0 + 1, "type": "plan", "batch_size": 8, "grad_accum": 1, "cuda_graphs": True,
           "dequantized_cache": True, "estimate_gib": 25.43}
    assert "micro-batch 8 × accumulation 1, CUDA graphs, 16-bit weight cache" in train.status_text(
        "r1", _events() + [old], "running")


def test_status_names_the_lean_switches_that_took_effect():
    extra = [{"t": T0 + 2, "type": "fused_lora", "layers": 224},
             {"t": T0 + 3, "type": "graphs", "layers": 32, "shape": [4, 128], "seconds": 4.5, "checkpointed": True,
              "offload": True}, {"t": T0 + 3, "type": "flat_optimizer", "tensors": 128}]
    md = train.status_text("r1", _events() + extra, "running")
    assert ("In effect: checkpointed layer stack as one CUDA graph, its saved inputs in CPU RAM (captured in "
            "4.5 s); fused 4-bit LoRA in 224 layers; one 8-bit optimizer update for 128 LoRA tensors.") in md
    md = train.status_text("r1", _events() + [{"t": T0 + 2, "type": "checkpoint_offload", "layers": 32}], "running")
    assert "In effect: checkpointed inputs of 32 layers kept in CPU RAM." in md
    kept = {"t": T0 + 2, "type": "checkpoint_offload", "layers": 32, "up_proj": 32, "host_gib": 15.0}
    assert ("checkpointed inputs of 32 layers kept in CPU RAM; MLP up-projections of 32 layers kept in CPU RAM "
            "(15.0 GiB), not recomputed.") in train.status_text("r1", _events() + [kept], "running")
    short = {**kept, "up_proj": 0, "up_proj_note": "needs 19.0 GiB of CPU RAM, 12.0 GiB free: recomputed on the GPU "
             "instead"}
    assert ("MLP up-projections recomputed: offload_up_proj needs 19.0 GiB of CPU RAM, 12.0 GiB free"
            in train.status_text("r1", _events() + [short], "running"))
    assert "In effect" not in train.status_text("r1", _events(), "running")


# ---- run folders without a worker ----------------------------------------------------------------

def _finished_run(store, name, status, losses, **last):
    run = store.create(load_preset("tiny-demo"), name)
    run.emit("status", status="running", step=0, max_steps=len(losses))
    for i, loss in enumerate(losses, 1):
        run.emit("metric", step=i, max_steps=len(losses), loss=loss, learning_rate=1e-3, elapsed=float(i))
    run.emit("eval", step=len(losses), eval_loss=losses[-1] + 0.1)
    run.emit("status", status=status, step=len(losses), **last)
    return run


def test_history_compare_status_and_log_tail_from_run_folders():
    store = RunStore()
    a = _finished_run(store, "run-a", "completed", [2.0, 1.5, 1.25])
    b = _finished_run(store, "run-b", "failed", [2.0, 1.9], message="disk full at step 2", remedy="free disk space")
    rows = {r[0]: r for r in train.history_rows(store)}
    assert rows["run-a"] == ["run-a", "completed", "tiny-demo", 3, "1.2500", "1.3500"]
    assert rows["run-b"][1] == "failed" and rows["run-b"][4] == "1.9000"
    assert train.default_run(store) == "run-b"  # no active run: the most recent one

    fig = train.compare_figure([a, b])
    names = [t.name for t in fig.data]
    assert names == ["run-a train", "run-a validation", "run-b train", "run-b validation"]
    assert list(fig.data[0].y) == [2.0, 1.5, 1.25]

    st = train.run_status(store, "run-b")
    assert st["status"] == "failed" and st["message"] == "disk full at step 2" and st["remedy"] == "free disk space"
    assert train.run_status(store, "../etc")["status"] == "unknown"

    b.log_path.write_text("".join(f"line {i}\n" for i in range(100)) + f"token {CANARY}\n")
    tail = train.log_tail(b)
    assert tail.splitlines()[0] == f"line {101 - train.LOG_LINES}" and len(tail.splitlines()) == train.LOG_LINES
    assert CANARY not in tail and "hf_***" in tail


def test_poll_selects_a_run_and_announces_each_ending_once():
    store = RunStore()
    assert train.poll(store, None, None) == (None, {"live": [], "notified": [], "key": None, "ids": [],
                                                    "listed_at": 0.0, "training": None}, [], False)
    _finished_run(store, "run-b", "failed", [2.0], message="bad file", remedy="fix data.path")
    selected, s, notices, changed = train.poll(store, None, {"live": ["run-b"]})
    assert selected == "run-b" and changed
    assert notices == [("warning", "Run run-b failed: bad file What to do: fix data.path")]
    assert s["live"] == [] and len(s["notified"]) == 1
    # The same ending is never announced twice, even if a stale session still lists the run as live.
    again = train.poll(store, "run-b", {**s, "live": ["run-b"]})
    assert again[2] == []


def test_start_refuses_bad_values_with_messages_and_creates_no_run():
    store = RunStore()
    base = load_preset("tiny-demo").to_dict()
    rid, msg = train.start_run(store, ["train.max_steps"], base, "", [-1])
    assert rid is None and "train.max_steps" in msg
    rid, msg = train.start_run(store, ["data.path"], base, "", [str(SAMPLES / "missing.jsonl")])
    assert rid is None and "missing.jsonl: no such file" in msg
    rid, msg = train.start_run(store, ["data.path"], base, "", ["/etc/passwd.jsonl"])
    assert rid is None and "reads only its samples and uploaded files" in msg
    rid, msg = train.start_run(store, ["data.path"], base, "../escape", [str(SAMPLES / "finance_alpaca.jsonl")])
    assert rid is None and "run name" in msg and "not allowed" in msg
    assert store.list() == []
    assert train.resume_run(store, None)[1] == "⚠️ choose a run to resume."


# ---- the served tab, driven through its API --------------------------------------------------------

@dataclass
class PresetsStandIn:
    base: gr.State
    keys: list
    inputs: list


@dataclass
class DataStandIn:
    keys: list
    inputs: list


SHORT = {"train.max_steps": 6, "train.save_steps": 3, "train.eval_steps": 3, "train.logging_steps": 1,
         "train.batch_size": 4}


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model_dir):
    store = RunStore(tmp_path_factory.mktemp("train_ui_runs"))
    ctx = UIContext(store=store)
    base = load_preset("tiny-demo").replace({"train.sample_prompts": 1, "train.sample_max_new_tokens": 12,
                                             "train.save_total_limit": 5}).to_dict()
    with gr.Blocks() as demo:
        presets_ui = PresetsStandIn(gr.State(base), list(SHORT), [widget(k, v) for k, v in SHORT.items()])
        data_ui = DataStandIn(["data.path"], [widget("data.path", str(SAMPLES / "finance_alpaca.jsonl"))])
        ui = train.build(ctx, data_ui, presets_ui)
    demo.queue().launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=_free_port(), quiet=True)
    client = Client(demo.local_url, verbose=False)
    yield ctx, ui, client
    active = store.active()
    if active is not None:
        worker.stop(active, grace=10)
    demo.close()
    ctx.follower.close()


def _wait_status(client, run_id, done, timeout=300):
    end = time.time() + timeout
    while time.time() < end:
        st = client.predict(run_id, api_name="/status")
        if done(st):
            return st
        assert st["status"] not in ("failed", "halted", "interrupted"), st
        time.sleep(1)
    raise AssertionError(f"run {run_id} did not get there in time: {st}")


@pytest.fixture(scope="module")
def short_run(served):
    """A 6-step run started through the API, a second start tried while it trains, and its final status."""
    _, _, client = served
    started = client.predict(None, "short", api_name="/start")
    # One training at a time: a second start is refused with a message, not a traceback.
    refused = client.predict(None, "second", api_name="/start")
    final = _wait_status(client, "short", lambda s: s["status"] == "completed")
    return started, refused, final


def test_api_start_status_busy_and_history(served, short_run):
    ctx, ui, client = served
    assert {"/start", "/stop", "/resume", "/status"} <= set(client.view_api(return_format="dict")["named_endpoints"])
    assert ui.start.elem_id == "train-start" and ui.stop.elem_id == "train-stop" and ui.resume.elem_id == "train-resume"

    (rid, msg), (other, busy), st = short_run
    assert rid == "short" and "Started run `short`" in msg
    assert other is None and "'short' is training" in busy
    assert st["step"] == 6 and st["max_steps"] == 6 and st["has_adapter"]
    assert isinstance(st["train_loss"], float) and isinstance(st["eval_loss"], float)

    rows = {r[0]: r for r in train.history_rows(ctx.store)}
    assert rows["short"][1:4] == ["completed", "tiny-demo", 6]
    assert rows["short"][4] == f"{st['train_loss']:.4f}" and rows["short"][5] == f"{st['eval_loss']:.4f}"
    assert "second" not in rows

    # The view the timer draws, from the finished run's folder.
    (status_md, progress, loss_fig, mem_fig, samples, log), key = train.view(ctx, "short")
    assert "completed" in status_md and "step 6 / 6" in progress
    assert list(_traces(loss_fig)["validation loss"].x) == [3, 6]
    assert "RAM" in mem_fig.data[0].title.text
    assert list(samples["step"]) == [6, 3] and all(isinstance(a, str) for a in samples["answer"])
    assert log and CANARY not in log
    skipped, same = train.view(ctx, "short", unchanged_since=key)
    assert same == key and all(isinstance(x, dict) and x.get("__type__") == "update" for x in skipped)

    assert "only stopped, failed, halted or interrupted runs resume" in client.predict("short", api_name="/resume")


def _is_skip(x):
    return isinstance(x, dict) and x.get("__type__") == "update" and len(x) == 1


def test_page_load_and_ticks_show_the_run_and_toast_its_end_once(served, short_run, capsys):
    ctx, _, _ = served
    # Page load in a fresh browser: the most recent run, the lists and the full view.
    choice, history, compare, stop, session, status_md, *_ = train.refresh(ctx, None, None, force=True)
    assert choice.value == "short" and ("short", "short") in choice.choices
    assert stop.interactive is False  # nothing trains: Stop is disabled
    assert dict(zip(history["run"], history["status"]))["short"] == "completed"
    assert session["live"] == [] and "completed" in status_md
    # A browser that watched the run live gets one toast when it ends, then nothing new is redrawn.
    out = train.refresh(ctx, "short", {**session, "live": ["short"]})
    assert "Run short completed at step 6" in capsys.readouterr().out
    out = train.refresh(ctx, "short", out[4])
    assert "completed" not in capsys.readouterr().out
    assert all(_is_skip(x) for i, x in enumerate(out) if i != 4)


def test_api_stop_ends_a_long_run_as_stopped(served, capsys):
    ctx, _, client = served
    path = str(SAMPLES / "finance_alpaca.jsonl")
    rid, msg = client.predict(None, "long", 300, 100, 0, 1, 4, path, api_name="/start")
    assert rid == "long", msg
    _wait_status(client, "long", lambda s: s["status"] == "running" and (s["step"] or 0) >= 1)
    # A browser showing an old run follows the run that became active.
    choice, _, _, stop, session, *_ = train.refresh(ctx, "short", {"live": []})
    assert choice.value == "long" and session["live"] == ["long"] and stop.interactive is True
    # While it trains, the history row follows it every few seconds, not only when a run starts or ends.
    _, history, _, stop, session, *_ = train.refresh(ctx, "long", {**session, "key": None, "listed_at": 0.0})
    assert dict(zip(history["run"], history["status"]))["long"] == "running" and _is_skip(stop)
    _, history, *_ = train.refresh(ctx, "long", {**session, "key": None})
    assert _is_skip(history)  # drawn less than HISTORY_EVERY_S ago
    # The browser that pressed Start already counts the run as live; its next tick still lists it.
    choice, history, *_ = train.refresh(ctx, "long", {"live": ["long"], "ids": ["short"]})
    assert ("long", "long") in choice.choices and "long" in list(history["run"])

    msg = client.predict(api_name="/stop")
    assert "Run `long` is stopped" in msg and "checkpoint-" in msg
    st = client.predict("long", api_name="/status")
    assert st["status"] == "stopped" and 1 <= st["step"] < 300
    assert ctx.store.active() is None
    assert client.predict(api_name="/stop") == "No run is training."
    stop = train.refresh(ctx, "long", session)[3]
    assert f"Run long stopped at step {st['step']}" in capsys.readouterr().out
    assert stop.interactive is False


def test_a_preference_stage_charts_its_rewards_and_log_probs_and_says_where_it_started():
    evs = [{"type": "status", "status": "starting", "t": 0, "method": "dpo", "parent_run": "sft",
            "adapter": "checkpoints/checkpoint-4"}]
    for step in (2, 4):
        evs.append({"type": "metric", "step": step, "loss": (7 - step) / 10, "reward_margin": step / 10,
                    "reward_accuracy": step / 4, "logps_chosen": -10.0 + step, "logps_rejected": -10.0 - step})
    evs.append({"type": "eval", "step": 4, "eval_loss": 0.5, "reward_margin": 0.3, "reward_accuracy": 0.75})
    assert train.is_stage(evs) and train.is_stage(evs[:1]) and not train.is_stage(_events())
    tr = _traces(train.loss_figure(evs))
    assert tr["training loss"].y == (0.5, 0.3) and tr["reward margin"].y == (0.2, 0.4)
    assert tr["reward accuracy"].yaxis == "y2" and tr["log-prob chosen"].yaxis == "y3"
    assert tr["log-prob rejected"].y == (-12.0, -14.0) and tr["validation reward accuracy"].x == (4,)
    text = train.status_text("dpo-sft", evs, "running")
    assert "Preference stage: DPO on run `sft` from its checkpoint 4." in text
    assert "Step 4: reward margin 0.4000, reward accuracy 1.0000." in text
