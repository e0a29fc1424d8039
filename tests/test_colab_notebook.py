"""The Colab notebook works as shipped (issues 14 and 18): its cells run top to bottom in a headless kernel on
a CPU machine, install the studio with their one pip line from a local copy of this checkout (``STUDIO_SOURCE``,
which a user types into the form field or leaves empty on Colab), keep the environment's torch, and serve the
offline demo behind the password; only the share link is replaced by a local launch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat

from e2e_helpers import free_port, page_behind_password, serve_command
from install_helpers import ROOT, checkout_copy, fresh_venv

NOTEBOOK = ROOT / "notebooks" / "colab.ipynb"
PASSWORD = "notebook-test-password"
# Runs the notebook with nbclient in the interpreter that starts it, so the kernel is the fresh venv's Python.
RUNNER = """import sys, nbformat, nbclient
nb = nbformat.read(sys.argv[1], as_version=4)
nbclient.NotebookClient(nb, timeout=900, kernel_name="python3", allow_errors=False).execute()
"""


def code_cells() -> list[str]:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    return [c.source for c in nb.cells if c.cell_type == "code"]


def test_the_notebook_installs_from_its_source_or_asks_and_serves_behind_the_password():
    install, serve = code_cells()
    assert "YOUR-NAME" not in NOTEBOOK.read_text()
    pip_lines = [line for line in install.splitlines() if "'pip', 'install'" in line]
    assert len(pip_lines) == 1 and "qlora-studio{extras} @ {url}" in pip_lines[0]
    assert "input(" in install and "No source for QLoRA Studio" in install
    assert "STUDIO_PASSWORD" in serve and "HF_TOKEN" in serve
    assert serve.rstrip().endswith("!qlora-studio --share")


def test_without_a_source_the_install_cell_stops_with_a_clear_message(tmp_path):
    install = code_cells()[0]
    env = {k: v for k, v in os.environ.items() if k != "STUDIO_SOURCE"}
    out = subprocess.run([sys.executable, "-c", install], cwd=tmp_path, env=env, stdin=subprocess.DEVNULL,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "No source for QLoRA Studio" in out.stderr
    assert "Traceback" not in out.stderr


def test_the_notebook_runs_headless_and_its_studio_answers_behind_the_password(tmp_path, tiny_model_dir):
    bin_dir = fresh_venv(tmp_path / "venv")
    port = free_port()
    nb = nbformat.read(NOTEBOOK, as_version=4)
    (serve,) = [c for c in nb.cells if c.cell_type == "code" and "qlora-studio --share" in c.source]
    serve.source = serve.source.replace("qlora-studio --share", f"qlora-studio --port {port}")  # no share link
    nb_path = tmp_path / "colab.ipynb"
    nbformat.write(nb, nb_path)

    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if k not in ("STUDIO_HOME", "PYTHONPATH", "VIRTUAL_ENV")}
    env.update(
        STUDIO_SOURCE=str(checkout_copy(tmp_path / "checkout")), STUDIO_PASSWORD=PASSWORD, HOME=str(home),
        PATH=f"{bin_dir}{os.pathsep}{env['PATH']}",  # as an activated venv (Colab: /usr/local/bin)
        # Nothing is downloaded: dependencies come from the test environment, setuptools included
        # (PIP_NO_BUILD_ISOLATION=0 turns isolation off: pip reads "no" options this way round).
        PIP_NO_INDEX="1", PIP_NO_BUILD_ISOLATION="0",
        STUDIO_TINY_MODEL_DIR=str(tiny_model_dir),  # built by CI already; a fresh home would build its own
        PYTHONUNBUFFERED="1",
    )
    runner = tmp_path / "run_notebook.py"
    runner.write_text(RUNNER)
    log = tmp_path / "notebook.log"
    with serve_command([str(bin_dir / "python"), str(runner), str(nb_path)], port, env, tmp_path, log,
                       timeout=600, name="the notebook") as url:
        assert '"title":"QLoRA Studio"' in page_behind_password(url, "admin", PASSWORD)

    # Installed into the fresh venv by the notebook's pip line, beside the environment's own torch.
    code = "import json, studio, torch; print(json.dumps([studio.__file__, torch.__file__, torch.__version__]))"
    studio_file, torch_file, torch_version = json.loads(subprocess.run(
        [str(bin_dir / "python"), "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
        check=True).stdout)
    import torch

    assert Path(studio_file).is_relative_to(tmp_path / "venv")
    assert torch_file == torch.__file__ and torch_version == torch.__version__
    assert (home / ".qlora-studio" / "runs").is_dir()
