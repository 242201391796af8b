"""Silence third-party log lines that say nothing a toolkit user can act on. Called by the CLI and base loading."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings

_NOISY = (
    "torch.utils._pytree",  # torchao (imported by GPTQModel/transformers) warns about enum registration
    "torch.utils.cpp_extension",  # "No CUDA runtime is found" on CPU machines
    "tokenicer",
    "tokenicer.tokenicer",
    "accelerate.utils.modeling",  # "weights are not tied" before GPTQModel ties them (checked in tests)
    "matplotlib.font_manager",  # "generated new fontManager" on first use
)


def quiet_third_party() -> None:
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    # transformers 5.23 renamed it; GPTQModel and peft still ask by the old name on every load
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.* is deprecated", category=FutureWarning)
    for name in _NOISY:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        # GPTQModel's logger (banner, one INFO line per module on every load). Creating it prints a blank line
        # to stdout, which would corrupt output meant for scripts (`info --json`), hence the redirect.
        with contextlib.redirect_stdout(io.StringIO()):
            from logbar import LogBar

            LogBar.shared().setLevel(logging.ERROR)
    except ImportError:
        pass
