"""The engine never imports gradio: import every engine module with gradio made unimportable."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_engine_imports_without_gradio():
    modules = sorted(
        "studio." + str(p.relative_to(ROOT / "studio").with_suffix("")).replace("/", ".")
        for p in (ROOT / "studio").rglob("*.py")
        if "ui" not in p.relative_to(ROOT / "studio").parts and p.name not in ("__main__.py",)
    )
    code = (
        "import sys; sys.modules['gradio'] = None\n"
        "import importlib\n"
        f"for m in {modules!r}:\n"
        "    importlib.import_module(m.removesuffix('.__init__'))\n"
        "assert 'gradio' not in [k for k, v in sys.modules.items() if v is not None]\n"
        "print('ok', len(" + repr(modules) + "))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok")
