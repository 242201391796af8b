"""Silence third-party log lines that say nothing a toolkit user can act on. Called by the CLI and base loading."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings

_NOISY = (
    "torch.utils.cpp_extension",  # "No CUDA runtime is found" on CPU machines
    "tokenicer",
    "tokenicer.tokenicer",
    "accelerate.utils.modeling",  # "weights are not tied" before GPTQModel ties them (checked in tests)
    "matplotlib.font_manager",  # "generated new fontManager" on first use
)


class _MessageFilter(logging.Filter):
    """Drops the records of one logger whose message contains `text`; the logger's other records still show."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


# torchao 0.18 (a GPTQModel requirement, imported by transformers' quantizers whenever installed) decorates two Enums
# (KernelPreference, ScaleCalculationMode) with `register_as_pytree_constant`, which torch 2.14 logs as deprecated:
# two lines at import, from code we do not call. Only that message is dropped, not the logger.
_PYTREE_ENUM = _MessageFilter("Calling register_constant() on Enum subclasses is deprecated")


def quiet_third_party() -> None:
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    # transformers 5.23 renamed it; GPTQModel and peft still ask by the old name on every load
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.* is deprecated", category=FutureWarning)
    for name in _NOISY:
        logging.getLogger(name).setLevel(logging.ERROR)
    pytree = logging.getLogger("torch.utils._pytree")
    if _PYTREE_ENUM not in pytree.filters:  # called once per load: add it once
        pytree.addFilter(_PYTREE_ENUM)
    try:
        # GPTQModel's logger (banner, one INFO line per module on every load). Creating it prints a blank line
        # to stdout, which would corrupt output meant for scripts (`info --json`), hence the redirect.
        with contextlib.redirect_stdout(io.StringIO()):
            from logbar import LogBar

            LogBar.shared().setLevel(logging.ERROR)
    except ImportError:
        pass
