"""Logging set-up both sides share."""

from __future__ import annotations

import os
import warnings


def quiet_ml_logging() -> None:
    """Offline hub mode, and only transformers' errors: its per-load reports (e.g. the 8 unused
    layers of MPNet-4L) and progress bars drown a daemon's own log lines."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
