"""Errors of the served app's own routes, in words: a full disk met by Gradio's upload route (it stores every
upload under GRADIO_TEMP_DIR before any handler of ours runs) is answered with HTTP 507 and what to do, not a
bare 500.  ``handlers()`` goes to FastAPI's ``exception_handlers`` (app.py's launch keywords)."""

from __future__ import annotations

import os


async def _os_error(request, exc: OSError):
    from starlette.responses import PlainTextResponse

    from studio.failures import DiskFull, is_disk_full
    from studio.runs import studio_home

    if not is_disk_full(exc):
        raise exc  # any other error stays what it was (Starlette answers 500 and logs it)
    where = os.environ.get("GRADIO_TEMP_DIR") or str(studio_home())
    return PlainTextResponse(str(DiskFull(where, "receiving the upload")), status_code=507)


def handlers() -> dict:
    return {OSError: _os_error}
