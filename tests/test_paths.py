"""Nothing lost: every path a user names stays inside the studio's folders (or ones the operator allowed), and
the studio never deletes or overwrites a folder it did not create.

Attacks arrive as a user's request: ``/start`` calls to the served app (``app.main([...], block=False)``, the
code ``python app.py`` runs), a YAML loaded in the Presets tab, and the command line.  A victim folder with a
file in it stands outside the studio home; after every attempt it must be untouched, and the refusal must name
the field.  A real tiny run through ``/start`` shows the seed recipe's relative ``adapter_dir`` landing under
``studio_home/outputs/`` and being replaced by the next run of the same name.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import ROOT
from e2e_helpers import free_port

from studio.config import ConfigError
from studio.presets import load_preset, parse_yaml
from studio.security import MARKER, PathRefused, output_dir, readable_path, replace_output


def _victim(root: Path) -> Path:
    v = root / "victim"
    (v / "keep").mkdir(parents=True)
    (v / "keep" / "precious.txt").write_text("do not delete")
    return v


def _intact(v: Path) -> bool:
    return (v / "keep" / "precious.txt").read_text() == "do not delete" and not (v / MARKER).exists()


def _bad_values(home: Path, victim: Path) -> list[str]:
    return [str(victim), str(victim / "keep"), "../../victim", "../" * 12 + str(victim).lstrip("/"), str(home),
            str(home / "runs"), str(home / "runs" / "x"), str(home / "uploads"), str(home / "presets" / "p"),
            str(home / "outputs"), str(home / "gradio_tmp" / "x"), "/", "~", "~/x", str(victim.parent), "/etc",
            "/tmp", "outputs/../../victim", f"{home}/outputs/../runs", "./", ".", "..", "x\x00y"]


def test_the_seed_recipes_relative_output_lands_in_the_studio_outputs(studio_home):
    cfg = load_preset("mistral-7b-finance-fast")
    assert cfg.output.adapter_dir == "./mistral-lora-finance-adapter-fast"
    assert output_dir(cfg.output.adapter_dir) == (studio_home / "outputs" / "mistral-lora-finance-adapter-fast").resolve()
    assert output_dir("a/b") == (studio_home / "outputs" / "a" / "b").resolve()


def test_outside_paths_are_refused_naming_the_field(studio_home, tmp_path):
    victim = _victim(tmp_path)
    base = load_preset("tiny-demo").to_dict()
    for value in _bad_values(studio_home, victim):
        with pytest.raises((PathRefused, ConfigError)) as e:
            output_dir(value)
        assert "output.adapter_dir" in str(e.value), value
        base["output"]["adapter_dir"] = value
        with pytest.raises(ConfigError) as e:
            parse_yaml(yaml.safe_dump(base), "uploaded.yaml")  # a preset or a YAML loaded in the Presets tab
        assert e.value.key == "output.adapter_dir" and "uploaded.yaml" in str(e.value), value
    assert _intact(victim)


def test_an_allowed_folder_is_writable_and_its_root_never_replaced(studio_home, tmp_path, monkeypatch):
    allowed = tmp_path / "shared"
    allowed.mkdir()
    monkeypatch.setenv("STUDIO_ALLOWED_PATHS", str(allowed))
    assert output_dir(str(allowed / "a")) == (allowed / "a").resolve()
    for value in (str(allowed), str(tmp_path), str(tmp_path / "other")):
        with pytest.raises(PathRefused):
            output_dir(value)
    assert readable_path(str(allowed / "f.jsonl"), "data.path", "data") == (allowed / "f.jsonl").resolve()
    with pytest.raises(PathRefused, match="data.path"):
        readable_path("/etc/passwd", "data.path", "data")


def test_only_folders_the_studio_made_are_replaced(studio_home, tmp_path):
    src = tmp_path / "adapter"
    src.mkdir()
    (src / "adapter_model.safetensors").write_bytes(b"v1")
    dest = output_dir("mine")
    replace_output(src, dest)
    assert (dest / "adapter_model.safetensors").read_bytes() == b"v1" and (dest / MARKER).is_file()
    (src / "adapter_model.safetensors").write_bytes(b"v2")
    replace_output(src, dest)  # the studio's own folder: replaced whole
    assert (dest / "adapter_model.safetensors").read_bytes() == b"v2"
    foreign = _victim(studio_home / "outputs")  # someone's folder inside outputs, without the marker
    link = studio_home / "outputs" / "link"
    link.symlink_to(_victim(tmp_path), target_is_directory=True)
    with pytest.raises(PathRefused, match="output.adapter_dir: .* was not created by the studio"):
        replace_output(src, output_dir(foreign.name))
    with pytest.raises(PathRefused, match="output.adapter_dir: 'link' is outside"):  # resolved through the link
        replace_output(src, output_dir(link.name))
    with pytest.raises(PathRefused, match="was not created by the studio"):  # named after resolving elsewhere
        replace_output(src, link)
    assert _intact(foreign) and _intact(tmp_path / "victim")
    assert not [p for p in (studio_home / "outputs").iterdir() if ".partial" in p.name or ".old" in p.name]


@pytest.fixture()
def served(tmp_path, tiny_model_dir):
    import app

    home = tmp_path / "home"
    port = free_port()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STUDIO_HOME", str(home))
        mp.setenv("STUDIO_CONFINE_PATHS", "1")  # app.main sets it; the context restores it afterwards
        mp.setenv("GRADIO_TEMP_DIR", str(home / "gradio_tmp"))
        mp.delenv("STUDIO_PASSWORD", raising=False)
        demo = app.main(["--port", str(port)], block=False)
        try:
            yield {"url": f"http://127.0.0.1:{port}/", "home": home}
        finally:
            demo.close()
            from studio import worker
            from studio.runs import RunStore

            for run in RunStore(home / "runs").list():
                if run.worker_alive():
                    worker.stop(run, grace=5)


def _start(client, adapter_dir: str, **extra):
    """/start with the fields named by config key (``train__max_steps``); the rest keep the page's defaults."""
    kw = {"output__adapter_dir": adapter_dir, "train__max_steps": 2, "train__eval_steps": 0, "train__save_steps": 0,
          "train__sample_prompts": 0, "data__val_samples": 8, **extra}
    return client.predict(**kw, api_name="/start")


def test_start_refuses_outside_outputs_and_a_real_run_lands_in_the_studio_outputs(served, tmp_path):
    from gradio_client import Client

    from studio.runs import RunStore

    home = served["home"]
    victim = _victim(tmp_path)
    (home / "outputs" / "someones").mkdir(parents=True)
    (home / "outputs" / "someones" / "notes.txt").write_text("mine")
    (home / "outputs" / "trap").symlink_to(victim, target_is_directory=True)
    client = Client(served["url"], verbose=False)
    for value in _bad_values(home, victim) + ["someones", "trap", "trap/inner"]:
        shown, message = _start(client, value)
        assert "output.adapter_dir" in message and message.startswith("⚠️"), (value, message)
        assert "Traceback" not in message
    assert RunStore(home / "runs").list() == []  # nothing started
    assert _intact(victim) and (home / "outputs" / "someones" / "notes.txt").read_text() == "mine"
    # The seed recipe's kind of value: a relative name, under studio_home/outputs, replaced by the next run.
    for attempt in range(2):
        rid, message = _start(client, "./finance-adapter")
        assert rid and "Started run" in message, message
        deadline = time.time() + 400
        while (status := client.predict(rid, api_name="/status"))["status"] not in ("completed", "failed", "stopped"):
            assert time.time() < deadline, status
            time.sleep(2)
        assert status["status"] == "completed", status
        out = home / "outputs" / "finance-adapter"
        assert (out / "adapter_model.safetensors").is_file() and (out / MARKER).is_file()
        assert rid in (out / MARKER).read_text()
    assert _intact(victim)


def test_the_command_line_refuses_an_outside_output_with_one_line(tmp_path):
    victim = _victim(tmp_path)
    preset = load_preset("tiny-demo").to_dict()
    preset["output"]["adapter_dir"] = str(victim)
    path = tmp_path / "from-a-stranger.yaml"
    path.write_text(yaml.safe_dump(preset))
    for args in (["--preset", str(path)], ["--preset", "tiny-demo", "--set", f"output.adapter_dir={victim}"],
                 ["--preset", "tiny-demo", "--set", "output.adapter_dir=../../../victim"]):
        out = subprocess.run([sys.executable, "-m", "studio", "train", *args], cwd=ROOT, capture_output=True,
                             text=True, timeout=300, env=dict(os.environ), check=False)
        assert out.returncode == 2 and "output.adapter_dir" in out.stderr, (args, out.stderr[-1500:])
        assert "Traceback" not in out.stderr + out.stdout
    assert _intact(victim)
    with contextlib.suppress(FileNotFoundError):
        assert not list((Path(os.environ["STUDIO_HOME"]) / "runs").iterdir())


def test_files_and_models_a_browser_names_stay_inside_the_studio(served, tmp_path, tiny_model_dir):
    """Data files, validation files and local model folders named through /start, /preview and /estimate."""
    import shutil

    from gradio_client import Client

    from studio.runs import RunStore

    home = served["home"]
    outside_model = tmp_path / "outside-model"
    shutil.copytree(tiny_model_dir, outside_model)  # a real model folder the operator did not offer
    secret = tmp_path / "secret.jsonl"
    secret.write_text('{"instruction": "private", "output": "data"}\n')
    client = Client(served["url"], verbose=False)
    for value in (str(outside_model), f"{outside_model}/", "/etc", "../" * 10 + str(outside_model).lstrip("/"),
                  "~", str(home.parent)):
        _, message = _start(client, "", model__base_model=value)
        assert message.startswith("⚠️") and "model.base_model" in message, (value, message)
        out = client.predict(base_model=value, api_name="/preview")
        assert "tokenized with" not in json.dumps(out, default=str), value
        assert "outside the folders" in json.dumps(out, default=str), (value, out)
    for key in ("data__path", "data__val_path"):
        for value in ("/etc/passwd", str(secret), "../../../../etc/passwd", f"{ROOT}/samples/../app.py"):
            _, message = _start(client, "", **{key: value})
            assert message.startswith("⚠️") and ("reads only" in message or "no such file" in message), message
    for value in ("/etc/passwd", str(secret), f"{ROOT}/samples/../app.py"):
        out = json.dumps(client.predict(path=value, api_name="/preview"), default=str)
        assert "private" not in out and "root:x" not in out and "reads only" in out, out[:300]
    assert RunStore(home / "runs").list() == []


def test_an_allowed_folder_is_readable_by_the_served_app(tmp_path, tiny_model_dir):
    import shutil

    import app
    from gradio_client import Client

    shared = tmp_path / "shared"
    shutil.copytree(tiny_model_dir, shared / "model")
    port = free_port()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STUDIO_HOME", str(tmp_path / "home"))
        mp.setenv("STUDIO_CONFINE_PATHS", "1")
        mp.setenv("STUDIO_ALLOWED_PATHS", "")
        mp.setenv("GRADIO_TEMP_DIR", str(tmp_path / "home" / "gradio_tmp"))
        mp.delenv("STUDIO_PASSWORD", raising=False)
        demo = app.main(["--port", str(port), "--allow-path", str(shared)], block=False)
        with contextlib.closing(demo):
            out = Client(f"http://127.0.0.1:{port}/", verbose=False).predict(base_model=str(shared / "model"),
                                                                             api_name="/preview")
    assert f"tokenized with the {shared / 'model'} tokenizer" in json.dumps(out, default=str)
    with pytest.raises(SystemExit):
        app.main(["--port", str(free_port()), "--allow-path", "relative/dir"], block=False)


def test_a_preset_is_chosen_by_name_never_by_path(studio_home, tmp_path):
    from studio.ui import presets as presets_ui

    elsewhere = tmp_path / "evil.yaml"
    elsewhere.write_text(yaml.safe_dump({"name": "evil", "output": {"adapter_dir": "fine"}}))
    for name in (str(elsewhere), "../../etc/passwd.yaml", "/etc/passwd", f"{ROOT}/presets/tiny-demo.yaml",
                 "tiny-demo.yaml", "../presets/tiny-demo"):
        status = presets_ui.choose_preset(name)[-1]
        assert status.startswith("⚠️") and "Loaded" not in status, (name, status)
    assert presets_ui.choose_preset("tiny-demo")[-1] == "Loaded preset **tiny-demo**."


def test_a_hub_dataset_id_cannot_name_a_local_folder(served, tmp_path):
    """``datasets.load_dataset`` reads a local folder given as the id: the served app holds it to the studio's."""
    from gradio_client import Client

    from studio.runs import RunStore

    private = tmp_path / "private-data"
    private.mkdir()
    (private / "train.jsonl").write_text('{"instruction": "private", "output": "secret answer"}\n' * 20)
    client = Client(served["url"], verbose=False)
    for value in (str(private), f"{private}/", "../" * 10 + str(private).lstrip("/"), f"{private}/train.jsonl"):
        out = json.dumps(client.predict(path="", hub_dataset=value, api_name="/preview"), default=str)
        assert "secret answer" not in out and "outside the folders" in out, (value, out[:300])
        _, message = _start(client, "", data__path="", data__hub_dataset=value)
        assert message.startswith("⚠️") and "data.hub_dataset" in message, (value, message)
    assert RunStore(served["home"] / "runs").list() == []


def test_a_playground_checkpoint_is_a_name_inside_its_run(studio_home, tmp_path):
    from studio.playground import ModelHolder
    from studio.runs import RunStore
    from studio.security import SecurityError

    run = RunStore().create(load_preset("tiny-demo"), "pg-run")
    evil = tmp_path / "evil-adapter"
    evil.mkdir()
    (evil / "adapter_model.safetensors").write_bytes(b"{}")
    for ck in (str(evil), "../../../" + str(evil).lstrip("/"), "../checkpoints/../../pg-run", "checkpoint-1/../../x"):
        with pytest.raises(SecurityError):
            ModelHolder().load(run, [ck])
