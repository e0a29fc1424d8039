"""The package people install: ``pip install .`` gives ``qlora-studio``, which serves the studio and runs the CLI
from wherever it is installed, writing only under the studio home (issue 18)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
import urllib.request
import zipfile
from pathlib import Path

from e2e_helpers import free_port, serve_command
from install_helpers import ROOT, build_wheel, checkout_copy, fresh_venv, pip_install

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def pins(path: Path) -> dict[str, str]:
    return {name.lower().replace("_", "-"): version for name, version in
            re.findall(r"^([A-Za-z0-9_.-]+)==([^\s#]+)", path.read_text(), re.M)}


def test_the_package_depends_on_requirements_txt_pins_and_keeps_an_environments_torch():
    deps = {}
    for spec in PYPROJECT["project"]["dependencies"]:
        name, rest = re.match(r"([A-Za-z0-9_.-]+)(.*)", spec).groups()
        deps[name.lower().replace("_", "-")] = rest
    req = pins(ROOT / "requirements.txt")
    assert set(deps) == set(req)
    assert {n: v for n, v in deps.items() if n != "torch"} == {n: f"=={v}" for n, v in req.items() if n != "torch"}
    # A range that holds the tested torch, so pip keeps Colab's own CUDA build instead of replacing it.
    low, high = re.fullmatch(r">=([\d.]+),<(\d+)", deps["torch"]).groups()
    tested = tuple(int(x) for x in req["torch"].split("."))
    assert tuple(int(x) for x in low.split(".")) <= tested < (int(high),)
    gpu = dict(spec.split("==") for spec in PYPROJECT["project"]["optional-dependencies"]["gpu"])
    assert gpu == {k: v for k, v in pins(ROOT / "requirements-gpu.txt").items() if k not in req}
    assert PYPROJECT["project"]["scripts"] == {"qlora-studio": "studio.__main__:main"}


def test_from_a_clone_the_shipped_files_are_the_repos_and_the_studio_home_is_studio_home():
    code = ("from studio import paths; print(paths.installed(), paths.shipped_root(), paths.studio_home(), "
            "paths.tiny_model_dir(), sep='\\n')")
    env = {k: v for k, v in os.environ.items() if k not in ("STUDIO_HOME", "STUDIO_TINY_MODEL_DIR")}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[:4] == ["False", str(ROOT), str(ROOT / "studio_home"),
                                          str(ROOT / "models" / "tiny-mistral")]


def test_the_wheel_installs_into_a_fresh_venv_and_qlora_studio_trains_and_serves_the_offline_demo(tmp_path,
                                                                                                  tiny_model_dir):
    wheel = build_wheel(checkout_copy(tmp_path / "src"), tmp_path / "dist")
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {str(p.relative_to(ROOT)) for p in (ROOT / "studio").rglob("*.py") if "__pycache__" not in p.parts}
    assert modules <= names, f"modules missing from the wheel: {sorted(modules - names)}"
    shipped = {f"studio/shipped/{p.relative_to(ROOT)}" for d in ("presets", "samples") for p in (ROOT / d).rglob("*")
               if p.is_file() and "__pycache__" not in p.parts}  # every shipped file, the stage presets' folder too
    assert shipped | {"studio/shipped/app.py"} <= names
    assert not [n for n in names if n.startswith(("tests/", "bench/", "scripts/"))]

    bin_dir = fresh_venv(tmp_path / "venv")
    pip_install(bin_dir, "--no-deps", str(wheel))
    # A user's machine: no STUDIO_HOME, a home folder, and a working directory that must stay untouched.
    home, cwd = tmp_path / "home", tmp_path / "somewhere"
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("STUDIO_HOME", "STUDIO_TINY_MODEL_DIR", "PYTHONPATH")}
    env.update(HOME=str(home), PYTHONUNBUFFERED="1")

    def installed(*code: str) -> list[str]:
        out = subprocess.run([str(bin_dir / "python"), "-c", "\n".join(code)], cwd=cwd, env=env,
                             capture_output=True, text=True, check=True)
        return out.stdout.splitlines()

    site = Path(installed("import studio; print(studio.__file__)")[0]).parent
    assert site.is_relative_to(tmp_path / "venv"), f"studio imported from {site}, not the fresh venv"
    before = {p for p in site.rglob("*") if "__pycache__" not in p.parts}
    assert installed("from studio import paths; print(paths.studio_home(), paths.tiny_model_dir(), "
                     "paths.shipped_file('samples/finance_alpaca.jsonl'), sep='\\n')") == [
        str(home / ".qlora-studio"), str(home / ".qlora-studio" / "models" / "tiny-mistral"),
        str(site / "shipped" / "samples" / "finance_alpaca.jsonl")]
    cfg = installed("from studio.presets import list_presets, load_preset",
                    "print(sorted(list_presets())); print(load_preset('tiny-demo').data.path)")
    assert cfg == [str(sorted(p.stem for p in (ROOT / "presets").glob("*.yaml"))), "samples/finance_alpaca.jsonl"]

    # The tiny model CI built already (a fresh home would build its own, ~25 s, into home/.qlora-studio/models).
    demo_env = dict(env, STUDIO_TINY_MODEL_DIR=str(tiny_model_dir), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    # The shipped preset's relative data path (samples/...) is found in the package, from any folder.
    train = subprocess.run([str(bin_dir / "qlora-studio"), "train", "--preset", "tiny-demo", "--name", "installed",
                            "--set", "train.epochs=1"], cwd=cwd, env=demo_env, capture_output=True, text=True,
                           timeout=600)
    assert train.returncode == 0 and "run installed: completed" in train.stdout, train.stdout + train.stderr
    run_dir = home / ".qlora-studio" / "runs" / "installed"
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert f"path: {site / 'shipped' / 'samples' / 'finance_alpaca.jsonl'}" in (run_dir / "config.yaml").read_text()
    runs = subprocess.run([str(bin_dir / "qlora-studio"), "runs"], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)
    assert runs.returncode == 0 and "installed" in runs.stdout, runs.stderr
    helped = subprocess.run([str(bin_dir / "qlora-studio"), "--help"], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=300)
    assert helped.returncode == 0 and "train" in helped.stdout and "serve" in helped.stdout

    port = free_port()
    with serve_command([str(bin_dir / "qlora-studio"), "--port", str(port)], port, demo_env, cwd,
                       tmp_path / "serve.log") as url:
        with urllib.request.urlopen(url, timeout=60) as r:
            assert r.status == 200
            assert '"title":"QLoRA Studio"' in r.read().decode()
    assert not list(cwd.iterdir()), "the studio wrote into the current directory"
    assert {p for p in site.rglob("*") if "__pycache__" not in p.parts} == before, "the studio wrote into its package"
    assert (home / ".qlora-studio" / "runs").is_dir()
