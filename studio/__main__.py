"""``qlora-studio`` and ``python -m studio``: one command for the studio and its command line.

    qlora-studio [--host H] [--port N] [--share] [--auth user:password]   # serve the studio (app.py's flags)
    qlora-studio serve [...]                                                # the same, spelled out
    qlora-studio train|runs|stop|resume|generate|evaluate|export|estimate|build-tiny ...  # studio.cli

The studio is served by ``app.py``, found through ``studio.paths`` (the repo's own in a clone, the wheel's
copy when installed), so both ways run the very same launcher with the same security checks.
"""

from __future__ import annotations

import importlib.util
import sys

SERVE_HELP = ("\nWithout a command (or with `serve`), the browser studio is served: "
              "qlora-studio [serve] [--host H] [--port N] [--share] [--auth user:password]; "
              "`qlora-studio serve --help` lists its options.")


def load_app():
    """``app.py`` as the module ``app`` (what ``python app.py`` and the tests import)."""
    from studio.paths import app_file

    if "app" in sys.modules and getattr(sys.modules["app"], "__file__", None) == str(app_file()):
        return sys.modules["app"]
    spec = importlib.util.spec_from_file_location("app", app_file())
    module = importlib.util.module_from_spec(spec)
    sys.modules["app"] = module
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> int:
    from studio import cli

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv in (["-h"], ["--help"]):
        cli.parser().print_help()
        print(SERVE_HELP)
        return 0
    if argv[:1] == ["serve"]:
        argv = argv[1:]
    elif argv and not argv[0].startswith("-"):
        return cli.main(argv)
    load_app().main(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
