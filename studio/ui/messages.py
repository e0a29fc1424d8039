"""How the tabs turn engine errors into text a person reads (never a traceback, never a token)."""

from __future__ import annotations

from studio.security import redact

# Every engine error type derives from one of these (ConfigError, DataError, SecurityError: ValueError;
# PlaygroundError, ModelError, ExportError, Busy, torch OOM: RuntimeError).
USER_ERRORS = (ValueError, KeyError, RuntimeError, OSError)


def scrub(text: str, secret: str | None = None) -> str:
    text = redact(text)
    # redact() knows hf_* tokens and HF_TOKEN; a typed secret of another shape is hidden here too.
    return text.replace(secret, "***") if secret and len(secret) >= 4 else text


def message(e: BaseException, secret: str | None = None) -> str:
    # str(KeyError) wraps the text in quotes; the argument reads better.
    return scrub(str(e.args[0] if isinstance(e, KeyError) and e.args else e), secret)
