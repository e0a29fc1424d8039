"""Silence warnings about optional packages the studio does not use, so a run's log starts with the run.

bitsandbytes' CPU backend warns, at import and in every process, that the optional ``kernels`` package
(a faster CPU 4-bit matmul fetched from the Hub) is missing; the studio runs offline without it and loses
nothing it relies on.  ``install()`` drops exactly that record (by logger and message), nothing else; it is
called when ``studio`` is imported, before any module imports bitsandbytes.
"""

from __future__ import annotations

import logging

# (logger name, message start) of records that say only that an optional package is absent.
OPTIONAL = [("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community")]


class _Optional(logging.Filter):
    def __init__(self, start: str):
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.start)


def install() -> None:
    for name, start in OPTIONAL:
        log = logging.getLogger(name)
        if not any(isinstance(f, _Optional) and f.start == start for f in log.filters):
            log.addFilter(_Optional(start))
