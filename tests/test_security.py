"""Nobody in: the studio binds loopback unless a password guards it, serves no file outside its runs root,
accepts only safe names, builds no shell string, loads only safetensors, runs no remote code unless asked,
and never shows the Hub token anywhere.

The real app is served (``python app.py --port P`` with its own ``STUDIO_HOME``) while a full tiny run
trains under that home; attacks are sent with ``http.client``, which sends the path bytes as written
(httpx would normalise ``../`` away before it leaves the machine).  The canary token set by conftest is
then looked for in every file of the home, in the app's output and in what the UI sends to a browser.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from e2e_helpers import answers, free_port
from conftest import CANARY, ROOT, SAMPLES

from studio import worker
from studio.config import RunConfig
from studio.hardware import Hardware
from studio.modeling import (
    ModelError,
    load_base,
    load_tokenizer,
    model_config,
    preflight,
    resolve_base,
)
from studio.presets import list_presets, load_preset, save_preset
from studio.runs import RunStore
from studio.security import SecurityError, check_name, safe_load_kwargs
from studio.training import Recipe

CPU = Hardware("cpu", "CPU", 16 * 2**30, 0, True)
PASSWD = b"root:x:0:0"
TYPED_TOKEN = "s3cret-Typed-Write-Token-42"  # a token pasted in the Export tab, not of the hf_ shape


# ---- launch: loopback by default, a password for anything else ---------------------------------------

def test_launch_binds_loopback_and_refuses_exposure_without_a_password():
    import app

    kw = app.launch_kwargs("127.0.0.1", 7860, False, None)
    assert kw["server_name"] == "127.0.0.1" and kw["share"] is False and kw["auth"] is None
    assert kw["allowed_paths"] == [str(app.runs_root())] and str(ROOT / ".git") in kw["blocked_paths"]
    assert kw["show_error"] is False  # exceptions are not sent to the browser
    for host in ("localhost", "127.0.0.1", "::1", "127.0.0.2"):
        assert app.is_loopback(host), host
        app.launch_kwargs(host, 7860, False, None)
    for host, share in (("0.0.0.0", False), ("192.168.1.20", False), ("::", False), ("studio.example.com", False),
                        ("127.0.0.1", True)):
        assert share or not app.is_loopback(host)
        with pytest.raises(app.LaunchError, match="without a password"):
            app.launch_kwargs(host, 7860, share, None)
        with pytest.raises(app.LaunchError, match="at least 8 characters"):
            app.launch_kwargs(host, 7860, share, ("admin", "short"))
        kw = app.launch_kwargs(host, 7860, share, ("admin", "long-enough-pw"))
        assert kw["auth"] == ("admin", "long-enough-pw") and kw["server_name"] == host and kw["share"] is share


def test_auth_comes_from_the_flag_or_the_environment(monkeypatch):
    import app

    monkeypatch.delenv("STUDIO_USERNAME", raising=False)
    monkeypatch.delenv("STUDIO_PASSWORD", raising=False)
    assert app.auth_from(None) is None
    assert app.auth_from("ana:pass:with:colons") == ("ana", "pass:with:colons")
    with pytest.raises(app.LaunchError, match="user:password"):
        app.auth_from("no-colon")
    monkeypatch.setenv("STUDIO_PASSWORD", "from-the-env-123")
    assert app.auth_from(None) == ("admin", "from-the-env-123")


@pytest.mark.parametrize("args,env,match", [
    (["--host", "0.0.0.0"], {}, "refusing to serve on 0.0.0.0 without a password"),
    (["--share"], {}, "refusing to serve on a share link without a password"),
    ([], {"SPACE_ID": "someone/studio"}, "refusing to serve on 0.0.0.0"),  # a Space binds 0.0.0.0
    (["--host", "0.0.0.0", "--auth", "admin:short"], {}, "at least 8 characters"),
])
def test_the_command_line_refuses_exposure_before_serving(args, env, match):
    clean = {k: v for k, v in os.environ.items() if k not in ("STUDIO_PASSWORD", "STUDIO_USERNAME", "SPACE_ID")}
    out = subprocess.run([sys.executable, "app.py", "--port", str(free_port()), *args], cwd=ROOT,
                         env={**clean, **env}, capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 2 and match in out.stderr, (out.returncode, out.stderr[-2000:])


# ---- the served app -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model_dir):
    """The real app on a free port, with a full tiny run (samples, evaluation, checkpoints, adapter) trained
    under its home meanwhile, plus a run that failed on an unknown hub id."""
    home = tmp_path_factory.mktemp("served_home")
    log = home.parent / f"{home.name}-app.log"
    store = RunStore(home / "runs")
    cfg = load_preset("tiny-demo").replace({
        "train.max_steps": 4, "train.save_steps": 2, "train.eval_steps": 0, "train.logging_steps": 1,
        "train.sample_prompts": 1, "train.sample_max_new_tokens": 8, "train.batch_size": 4})
    run = worker.start(store, cfg, "canary-run")
    port = free_port()
    env = dict(os.environ, STUDIO_HOME=str(home), STUDIO_MAX_UPLOAD_MB="1", PYTHONUNBUFFERED="1")
    with open(log, "wb") as f:
        proc = subprocess.Popen([sys.executable, "app.py", "--port", str(port)], cwd=ROOT, env=env, stdout=f,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        end = time.time() + 180
        while not answers(port):
            assert proc.poll() is None and time.time() < end, log.read_text()[-3000:]
            time.sleep(0.5)
        assert worker.wait(run, timeout=400) == "completed", run.last_status()
        failed = store.create(cfg.replace({"model.base_model": "nobody-here/no-such-model-7b"}), "hub-miss")
        assert Recipe(failed, token=CANARY).execute() == "failed"
        yield {"port": port, "url": f"http://127.0.0.1:{port}/", "home": home, "run": run, "proc": proc, "log": log}
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
                time.sleep(1)
        if run.worker_alive():
            worker.stop(run, grace=5)


def _get(port: int, raw_path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", raw_path)  # sent byte for byte: no client-side normalisation
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def test_the_served_app_listens_on_loopback_only(served):
    import psutil

    listening = [c.laddr for c in psutil.Process(served["proc"].pid).net_connections("inet")
                 if c.status == psutil.CONN_LISTEN]
    assert listening and all(a.ip == "127.0.0.1" for a in listening), listening


def test_no_file_outside_the_runs_root_is_served(served, tmp_path):
    home, runs = served["home"], served["home"] / "runs"
    run_dir = served["run"].dir
    other = tmp_path / "other_home" / "runs" / "theirs"
    other.mkdir(parents=True)
    (other / "config.yaml").write_text("name: someone-elses-run\n")
    (home / "uploads").mkdir(exist_ok=True)
    (home / "uploads" / "data-0123456789.jsonl").write_text('{"instruction": "private", "output": "data"}\n')
    save_preset(load_preset("tiny-demo"), "mine")  # the user's presets folder is blocked
    (run_dir / "planted-link").symlink_to("/etc/passwd")  # a symlink planted inside the runs root
    attacks = [
        "/etc/passwd", "/file=/etc/passwd", "/gradio_api/file=/etc/passwd", "/gradio_api/file=//etc/passwd",
        "/gradio_api/file=%2Fetc%2Fpasswd", "/gradio_api/file=/proc/self/environ",
        "/gradio_api/file=../../../../../../etc/passwd",
        "/gradio_api/file=%2e%2e%2f%2e%2e%2f%2e%2e%2f%2e%2e%2f%2e%2e%2f%2e%2e%2fetc%2fpasswd",
        "/gradio_api/file=%2E%2E%2F%2E%2E%2F%2E%2E%2F%2E%2E%2F%2E%2E%2F%2E%2E%2Fetc%2Fpasswd",
        "/gradio_api/file=%252e%252e%252f%252e%252e%252f%252e%252e%252fetc%252fpasswd",
        "/gradio_api/file=..%2F..%2F..%2F..%2F..%2F..%2Fetc%2Fpasswd",
        "/gradio_api/file=.%2e/.%2E/.%2e/.%2E/.%2e/.%2E/etc/passwd",
        f"/gradio_api/file={runs}/../../../../../../etc/passwd",
        f"/gradio_api/file={runs}/%2e%2e/%2e%2e/%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
        f"/gradio_api/file={runs}/%2E%2e/%2e%2E/%2E%2E/%2e%2e/%2E%2e/%2e%2E/etc/passwd",
        f"/gradio_api/file={runs}/..%5c..%5c..%5c..%5c..%5c..%5cetc%5cpasswd",
        f"/gradio_api/file={runs}/%252e%252e/%252e%252e/%252e%252e/etc/passwd",
        f"/gradio_api/file={str(runs).upper()}/canary-run/config.yaml",
        f"/gradio_api/file={run_dir}/planted-link",
        f"/gradio_api/file={ROOT}/.git/config", f"/gradio_api/file={ROOT}/.git/HEAD",
        f"/gradio_api/file={ROOT}/.git/../app.py", f"/gradio_api/file={ROOT}/app.py",
        f"/gradio_api/file={ROOT}/samples/finance_alpaca.jsonl",
        f"/gradio_api/file={home}/presets/mine.yaml", f"/gradio_api/file={home}/uploads/data-0123456789.jsonl",
        f"/gradio_api/file={other}/config.yaml", f"/gradio_api/file={runs}/../../other_home/runs/theirs/config.yaml",
        "/static/../../../../../../etc/passwd", "/assets/..%2f..%2f..%2f..%2f..%2fetc%2fpasswd",
        "/gradio_api/file=%00/etc/passwd",
    ]
    served_ok = []
    for path in attacks:
        status, body = _get(served["port"], path)
        if not (400 <= status < 500) or PASSWD in body or b"someone-elses-run" in body or b"private" in body:
            served_ok.append((path, status, body[:80]))
    assert not served_ok, served_ok


def test_a_file_inside_the_runs_root_is_served(served):
    from gradio_client import Client

    client = Client(served["url"], verbose=False)
    shown, status = client.predict("canary-run", api_name="/zip")
    assert "Adapter zipped" in status
    zip_path = served["run"].dir / "export" / "canary-run-adapter.zip"
    assert Path(shown).name == zip_path.name
    code, body = _get(served["port"], f"/gradio_api/file={zip_path}")
    assert code == 200 and body.startswith(b"PK") and body == zip_path.read_bytes()


def test_an_upload_over_the_size_limit_is_refused_by_the_server(served):
    import httpx

    two_mb = b'{"instruction": "a", "output": "b"}\n' * (2 * 2**20 // 36 + 1)
    r = httpx.post(served["url"] + "gradio_api/upload", files={"files": ("big.jsonl", two_mb)}, timeout=60)
    assert r.status_code == 413, (r.status_code, r.text[:200])
    kept = [p for p in (served["home"] / "gradio_tmp").rglob("*") if p.is_file() and p.stat().st_size > 2**20]
    assert not kept  # nothing of it stays on disk


# ---- the canary token ---------------------------------------------------------------------------------------

def test_the_hub_token_appears_in_no_file_log_or_ui_payload(served):
    from gradio_client import Client

    client = Client(served["url"], verbose=False)
    responses = [
        client.predict("canary-run", api_name="/status"),
        client.predict("hub-miss", api_name="/status"),
        client.predict("../../etc", api_name="/status"),
        client.predict("canary-run", "someone/repo", True, False, CANARY, api_name="/push"),
        client.predict("canary-run", "someone/repo", True, False, TYPED_TOKEN, api_name="/push"),
        client.predict("canary-run", "someone/repo", True, False, "", api_name="/push"),  # falls back to HF_TOKEN
        client.predict(str(SAMPLES / "finance_alpaca.jsonl"), api_name="/preview"),
    ]
    text = json.dumps(responses, default=str)
    assert "Could not push" in text and "could not be loaded" in text  # the errors did come back, redacted
    assert CANARY not in text and TYPED_TOKEN not in text
    assert responses[2]["status"] == "unknown"
    for path in ("/", "/config", "/gradio_api/info", "/gradio_api/openapi.json", "/gradio_api/startup-events"):
        body = _get(served["port"], path)[1]
        assert CANARY.encode() not in body and TYPED_TOKEN.encode() not in body, path
    assert _get(served["port"], "/")[0] == 200 and _get(served["port"], "/config")[0] == 200
    # Every file of the home after a full run and a failed one: config, events, logs, checkpoints, adapter.
    files = [p for p in served["home"].rglob("*") if p.is_file() and not p.is_symlink()]
    names = {p.name for p in files}
    assert {"config.yaml", "events.jsonl", "worker.log", "adapter_model.safetensors", "trainer_state.json"} <= names
    leaks = [str(p) for p in files + [served["log"]]
             if CANARY.encode() in p.read_bytes() or TYPED_TOKEN.encode() in p.read_bytes()]
    assert not leaks, leaks


def test_the_token_is_redacted_from_failed_hub_loads():
    cfg = RunConfig.from_dict({"model": {"base_model": "private-org/gated-model"}, "train": {"optimizer": "adamw_torch"}})
    with pytest.raises(ModelError) as e:
        preflight(cfg, CPU, token=CANARY)
    assert CANARY not in str(e.value)
    from studio.data.files import DataError, read_hub

    with pytest.raises(DataError) as e:
        read_hub("private-org/gated-dataset", token=CANARY)
    assert CANARY not in str(e.value) and "could not be loaded" in str(e.value)


# ---- names typed by users -------------------------------------------------------------------------------------

BAD_NAMES = ["../x", "..", ".", "a/b", "a\\b", "/abs", ".hidden", "-flag", "x;rm -rf /", "x && y", "$(id)", "`id`",
             "name with spaces", "naïve", "日本語", "emoji-🙂", "a" * 200, "", " ", "x\n", "x\x00y", "..x", "a/../b",
             "~root", "*", "x|y"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_user_typed_names_are_refused(name, studio_home):
    with pytest.raises(SecurityError):
        check_name(name)
    store = RunStore()
    with pytest.raises((SecurityError, ValueError)):
        store.create(load_preset("tiny-demo"), name or " ")
    with pytest.raises((SecurityError, ValueError)):
        save_preset(load_preset("tiny-demo"), name)
    with pytest.raises((SecurityError, KeyError)):
        store.get(name)
    assert store.list() == [] and not list(store.root.iterdir())  # no folder of any name was made
    assert not (studio_home / "presets").exists() or not list((studio_home / "presets").iterdir())


def test_ui_handlers_turn_bad_names_into_messages(studio_home):
    from studio.ui import presets as presets_ui
    from studio.ui import train

    base = load_preset("tiny-demo").to_dict()
    for name in ("../escape", "x;rm -rf /", "a" * 200):
        rid, msg = train.start_run(RunStore(), ["data.path"], base, name, [str(SAMPLES / "finance_alpaca.jsonl")])
        assert rid is None and msg.startswith("⚠️") and "not allowed" in msg
        status, _ = presets_ui.save(base, name, *presets_ui.values_of(load_preset("tiny-demo")))
        assert status.startswith("⚠️") and "not allowed" in status
    assert RunStore().list() == [] and "escape" not in list_presets()
    assert train.run_status(RunStore(), "../../etc")["status"] == "unknown"
    for ok in ("my-run_1.2", "A1"):
        assert check_name(ok) == ok


def _sources() -> list[Path]:
    skip = {".venv", ".git", "studio_home", "artifacts", "node_modules"}
    return [p for p in ROOT.rglob("*.py") if not skip & set(p.relative_to(ROOT).parts) and "tests" not in p.parts]


def test_no_shell_string_and_no_pickle_load_in_the_source():
    files = _sources()
    assert len(files) > 20 and ROOT / "app.py" in files
    shell = re.compile(r"shell\s*=\s*True|os\.system\(|os\.popen\(|commands\.getoutput|subprocess\.getoutput")
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in files for i, line in enumerate(p.read_text().splitlines(), 1)
            if shell.search(line)]
    assert not hits, hits
    loads = re.compile(r"torch\.load\(|pickle\.loads?\(|joblib\.load\(|numpy\.load\(.*allow_pickle=True")
    studio = [p for p in files if "studio" in p.relative_to(ROOT).parts[:1]]
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in studio for i, line in enumerate(p.read_text().splitlines(), 1)
            if loads.search(line)]
    assert not hits, hits


# ---- weights and code that load -----------------------------------------------------------------------------------

class _Evil:
    """Unpickling this creates a marker file: proof that a pickle was (or was not) loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _model_folder(tmp_path, tiny_model_dir, name: str, weights: bool = True) -> Path:
    d = tmp_path / name
    shutil.copytree(tiny_model_dir, d)
    if not weights:
        (d / "model.safetensors").unlink()
    return d


def test_pickled_weights_are_never_loaded(tmp_path, tiny_model_dir):
    marker = tmp_path / "pickle-ran"
    only_bin = _model_folder(tmp_path, tiny_model_dir, "only-bin", weights=False)
    (only_bin / "pytorch_model.bin").write_bytes(pickle.dumps(_Evil(marker)))
    with pytest.raises(ModelError, match="pickled .bin weights are not loaded"):
        resolve_base(str(only_bin))
    # A decoy .safetensors beside the pickle gets past the folder check; from_pretrained still refuses the .bin.
    decoy = _model_folder(tmp_path, tiny_model_dir, "decoy", weights=False)
    (decoy / "pytorch_model.bin").write_bytes(pickle.dumps(_Evil(marker)))
    (decoy / "notes.safetensors").write_bytes(b"{}")
    cfg = RunConfig.from_dict({"model": {"base_model": str(decoy), "quantization": "none"}})
    with pytest.raises(ModelError, match="could not be loaded"):
        load_base(cfg, load_tokenizer(cfg), CPU)
    assert not marker.exists()
    assert safe_load_kwargs() == {"use_safetensors": True, "trust_remote_code": False}


def _custom_code_folder(tmp_path, tiny_model_dir, model_type: str) -> tuple[Path, Path]:
    d = _model_folder(tmp_path, tiny_model_dir, f"custom-{model_type}")
    marker = tmp_path / f"custom-code-ran-{model_type}"
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(model_type=model_type, auto_map={"AutoConfig": "custom.CustomConfig",
                                                "AutoModelForCausalLM": "custom.CustomModel"})
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "custom.py").write_text(f"open({str(marker)!r}, 'w').close()\n"
                                 "from transformers import MistralConfig as CustomConfig\n"
                                 "from transformers import MistralForCausalLM as CustomModel\n")
    return d, marker


def test_custom_model_code_is_refused_unless_trusted_and_never_runs(tmp_path, tiny_model_dir):
    assert RunConfig().model.trust_remote_code is False
    assert all(not load_preset(p).model.trust_remote_code for p in list_presets().values())
    assert safe_load_kwargs(True)["trust_remote_code"] is True and safe_load_kwargs()["trust_remote_code"] is False
    # A model type transformers does not know: only its custom code could load it, so it is refused.
    folder, marker = _custom_code_folder(tmp_path, tiny_model_dir, "studio_custom")
    cfg = RunConfig.from_dict({"model": {"base_model": str(folder), "quantization": "none"},
                               "train": {"optimizer": "adamw_torch"}})
    for attempt in (lambda: preflight(cfg, CPU), lambda: model_config(cfg),
                    lambda: load_base(cfg, load_tokenizer(cfg), CPU)):
        with pytest.raises(ModelError, match="ships custom code; turn on model.trust_remote_code only if you trust"):
            attempt()
    assert not marker.exists()
    # A known model type with an auto_map: the library's own class loads; the shipped code still never runs.
    folder, marker = _custom_code_folder(tmp_path, tiny_model_dir, "mistral")
    cfg = RunConfig.from_dict({"model": {"base_model": str(folder), "quantization": "none"}})
    model = load_base(cfg, load_tokenizer(cfg), CPU)
    assert type(model).__module__.startswith("transformers.models.mistral") and not marker.exists()


def test_gradio_is_pinned_to_the_installed_version():
    import gradio
    import gradio_client

    pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==([^\s#]+)", (ROOT / "requirements.txt").read_text(), re.MULTILINE))
    assert pins.get("gradio") == gradio.__version__
    assert pins.get("gradio_client") == gradio_client.__version__
