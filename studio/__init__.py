"""QLoRA Studio's engine (``studio.ui`` holds the browser tabs)."""

from studio import quiet as _quiet

_quiet.install()  # before anything imports bitsandbytes: its optional-package warning is not a run's first line
