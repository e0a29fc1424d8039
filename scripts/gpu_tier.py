"""Run the GPU test tier on this machine's own Python (the one whose torch sees the GPU), from bare.

    python3 scripts/gpu_tier.py [--wheels DIR] [--order reverse|random[:SEED]] [pytest args ...]
    make test-gpu [WHEELS=DIR] [ORDER=reverse]

What the tier needs beyond the machine's torch is the packages pinned in requirements.txt and
requirements-gpu.txt that the engine imports on a GPU.  Each one missing (or at another version where the
version matters: bitsandbytes, liger-kernel) is installed into ``.gpu-site/`` of the checkout, never into the
machine's Python: from ``--wheels DIR`` (default ``.whl/`` when it exists) with no index, else from the
package registry.  When neither has it (a GPU machine without internet and no wheels), nothing runs: the
script prints exactly which wheels to bring and the ``pip download`` line that fetches them on a machine
with internet, and exits 2.

The tests then run with ``-m gpu``; ``--order`` sets STUDIO_TEST_ORDER (tests/conftest.py) so the tier can be
run reversed or shuffled to show that no test depends on another's leftovers.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SITE = ROOT / ".gpu-site"
# Distribution -> whether its exact pinned version matters (True) or any installed version will do (False):
# the machine's own torch stack is kept; what the studio's GPU code was written against is pinned.
NEEDED = {"bitsandbytes": True, "liger-kernel": True, "transformers": False, "peft": False, "accelerate": False,
          "safetensors": False, "tokenizers": False, "pyyaml": False, "psutil": False, "pandas": False,
          "tensorboard": False, "pytest": False, "trl": True, "datasets": True, "dill": False, "multiprocess": False}


def pins() -> dict[str, str]:
    out = {}
    for f in ("requirements.txt", "requirements-gpu.txt", "requirements-dev.txt"):
        for line in (ROOT / f).read_text().splitlines():
            m = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s;#]+)", line.strip())
            if m:
                out[m.group(1).lower()] = m.group(2)
    return out


def installed(name: str) -> str | None:
    """The version of distribution ``name`` this run would import: ``.gpu-site/`` first, then the machine's."""
    for d in metadata.distributions(path=[str(SITE), *sys.path]):
        if d.metadata["Name"].lower().replace("_", "-") == name:
            return d.version
    return None


def missing(pinned: dict[str, str]) -> list[str]:
    need = []
    for name, exact in NEEDED.items():
        have = installed(name)
        want = pinned.get(name)
        if have is None or (exact and want and have != want):
            need.append(f"{name}=={want}" if want else name)
    return need


def pip_download_line(reqs: list[str]) -> str:
    py = f"{sys.version_info.major}{sys.version_info.minor}"
    plats = " ".join(f"--platform {p}" for p in ("manylinux_2_28_x86_64", "manylinux_2_24_x86_64",
                                                 "manylinux_2_17_x86_64", "manylinux2014_x86_64"))
    return (f"python3 -m pip download --no-deps --only-binary=:all: --python-version {py} --implementation cp "
            f"{plats} -d wheels {' '.join(reqs)}")


def install(reqs: list[str], wheels: Path | None) -> bool:
    SITE.mkdir(exist_ok=True)
    base = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile", "--target", str(SITE),
            "--upgrade"]
    src = ["--no-index", "--find-links", str(wheels)] if wheels else ["--timeout", "15", "--retries", "0"]
    print(f"gpu tier: installing {' '.join(reqs)} into {SITE.relative_to(ROOT)}/ from "
          f"{wheels or 'the package registry'}", flush=True)
    return subprocess.run(base + src + reqs).returncode == 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--wheels", type=Path, default=None, help="a folder of wheels to install from (no index)")
    p.add_argument("--order", default=os.environ.get("STUDIO_TEST_ORDER", ""),
                   help="reverse, or random[:SEED]: run the tests in that order")
    a, rest = p.parse_known_args(argv)
    try:
        import torch
    except ImportError:
        print("gpu tier: this Python has no torch; run it with the Python whose CUDA torch sees the GPU.")
        return 2
    if not torch.cuda.is_available():
        print("gpu tier: torch sees no CUDA GPU here; the GPU tier runs only on a GPU machine.")
        return 2
    sys.path.insert(0, str(SITE))
    pinned = pins()
    need = missing(pinned)
    wheels = a.wheels or (ROOT / ".whl" if (ROOT / ".whl").is_dir() else None)
    if need and not install(need, wheels):
        still = missing(pinned)
        print("\ngpu tier: cannot install " + ", ".join(still) + (f" from {wheels}" if wheels else
              " (no package registry reachable from this machine)") + ".\n"
              "Bring these wheels from a machine with internet, then run `make test-gpu WHEELS=wheels` here:\n  "
              + pip_download_line(still))
        return 2
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SITE), str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    if a.order:
        env["STUDIO_TEST_ORDER"] = a.order
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-s", "tests/gpu", *rest]
    print("gpu tier: " + " ".join(cmd[1:]), flush=True)
    return subprocess.run(cmd, cwd=ROOT, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
