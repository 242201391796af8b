"""Shared fixtures: the tiny base is built once per test session (seconds), never downloaded."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub


@pytest.fixture(scope="session")
def tiny_ct(tmp_path_factory) -> Path:
    """The default tiny base in the real checkpoint's format (compressed-tensors), seed 0."""
    from toolkit import tiny_base

    return tiny_base.build(tmp_path_factory.mktemp("bases") / "tiny-ct", seed=0)


@pytest.fixture(scope="session")
def tiny_gptq(tmp_path_factory) -> Path:
    """The same weights written in GPTQ (GPTQModel) layout."""
    from toolkit import tiny_base

    return tiny_base.build(tmp_path_factory.mktemp("bases") / "tiny-gptq", seed=0, fmt="gptq")


@pytest.fixture(scope="session")
def base(tiny_ct):
    """The tiny base loaded for inference on CPU (shared: tests must not modify it)."""
    from toolkit.base import load_base

    return load_base(tiny_ct, device="cpu")


@pytest.fixture(scope="session")
def images(tmp_path_factory) -> dict[str, Path]:
    from toolkit.images import make_square_image

    root = tmp_path_factory.mktemp("images")
    return {c: make_square_image(root / f"{c}.png", color=c) for c in ("red", "blue")}
