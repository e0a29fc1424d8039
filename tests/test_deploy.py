"""Where users take it: Docker, Hugging Face Space, Colab.  The Dockerfile is linted here and its steps are run
outside a container by test_docker_steps.py (no base image can be pulled on this machine kind); the notebook
runs in a headless kernel in test_colab_notebook.py; the Space and Colab entry points are exercised here through
app.py's launch rules."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_dockerfile_lints_clean():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    assert Path(hadolint).exists(), "hadolint is installed by requirements-dev.txt"
    out = subprocess.run([hadolint, "Dockerfile"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_dockerfile_installs_the_package_with_the_pins_ci_tests():
    docker = (ROOT / "Dockerfile").read_text()
    make = (ROOT / "Makefile").read_text()
    # The image installs requirements.txt's pins (what `make install` and so CI install) and the package.
    assert re.search(r"pip install --no-cache-dir -r requirements\.txt \.", docker)
    assert re.search(r"pip install -q -r requirements\.txt$", make, re.M)
    assert re.search(r"^test: install-dev", make, re.M) and re.search(r"^install-dev: .*\.installed\b", make, re.M)
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^USER 1000$", docker, re.M), "runs as a non-root user"
    assert "EXPOSE 7860" in docker and "STUDIO_HOME=/data/" in docker and "HF_HOME=" in docker


def test_readme_makes_the_repo_a_docker_space():
    readme = (ROOT / "README.md").read_text()
    front = readme.split("---")[1]
    assert re.search(r"^sdk: docker$", front, re.M) and re.search(r"^app_port: 7860$", front, re.M)


def test_space_refuses_to_serve_publicly_without_password(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("STUDIO_PASSWORD", "STUDIO_USERNAME")}
    env.update(SPACE_ID="someone/qlora-studio", STUDIO_HOME=str(tmp_path))
    out = subprocess.run([sys.executable, "app.py", "--port", "0"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2
    assert "without a password" in out.stderr and "Traceback" not in out.stderr


def test_colab_notebook_starts_a_password_protected_share_link():
    import app

    nb = json.loads((ROOT / "notebooks" / "colab.ipynb").read_text())
    code = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
    assert "STUDIO_PASSWORD" in code and "qlora-studio --share" in code and "HF_TOKEN" in code
    with pytest.raises(SystemExit):
        app.launch_kwargs("127.0.0.1", 7860, True, None)
    kw = app.launch_kwargs("127.0.0.1", 7860, True, ("admin", "long-enough-pw"))
    assert kw["share"] and kw["auth"] == ("admin", "long-enough-pw")
