"""fedlora's console is fedlora's: one place silences the libraries' own chatter (deprecation
notices, progress bars, telemetry, per-request logs). Errors still surface as errors."""

from __future__ import annotations

import logging
import os
import sys
import warnings


def quiet_libraries() -> None:
    """Call at an entry point: the environment is read by libraries not yet loaded (and by the
    processes this one starts), the filters and levels act on those already loaded."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    # opacus's RDP accountant: a wider range of orders might give a tighter bound, so the
    # epsilon it reports is an upper bound and the noise it finds is more than needed (safe)
    warnings.filterwarnings("ignore", "Optimal order is the largest alpha", UserWarning, "opacus")
    for name in ("flwr", "uvicorn", "uvicorn.error"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    if "transformers" in sys.modules:  # loaded before: its verbosity was read at import
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
