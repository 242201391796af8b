"""Shared fixtures: the tiny base is built once per test session (seconds), never downloaded."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub
from helpers import ROOT, LiveServer  # noqa: E402


@pytest.fixture(scope="session")
def tiny_ct(tmp_path_factory) -> Path:
    """The default tiny base in the real checkpoint's format (compressed-tensors), seed 0."""
    from toolkit.base import builder as tiny_base

    return tiny_base.build(tmp_path_factory.mktemp("bases") / "tiny-ct", seed=0)


@pytest.fixture(scope="session")
def tiny_gptq(tmp_path_factory) -> Path:
    """The same weights written in GPTQ (GPTQModel) layout."""
    from toolkit.base import builder as tiny_base

    return tiny_base.build(tmp_path_factory.mktemp("bases") / "tiny-gptq", seed=0, fmt="gptq")


@pytest.fixture(scope="session")
def base(tiny_ct):
    """The tiny base loaded for inference on CPU (shared: tests must not modify it)."""
    from toolkit.base.loader import load_base

    return load_base(tiny_ct, device="cpu")


@pytest.fixture(scope="session")
def images(tmp_path_factory) -> dict[str, Path]:
    from toolkit.data.images import make_square_image

    root = tmp_path_factory.mktemp("images")
    return {c: make_square_image(root / f"{c}.png", color=c) for c in ("red", "blue")}


@pytest.fixture(scope="session")
def trained(tiny_ct, tmp_path_factory):
    """The quickstart adapter trained on the tiny base (the full recipe, about 20 s on 2 cores)."""
    from toolkit.recipe import load_recipe
    from toolkit.train.trainer import train

    out = tmp_path_factory.mktemp("adapters")
    recipe = load_recipe(ROOT / "recipes" / "quickstart.yaml", [f"base.path={tiny_ct}", f"output.dir={out}"])
    result = train(recipe)
    result.model.eval()
    return result


@pytest.fixture(scope="session")
def make_server(tiny_ct, trained):
    """Start servers for the tiny base + the quickstart adapter with any build_state options."""
    from toolkit.serve.app import build_state

    servers = []

    def start(**options):
        options.setdefault("adapters", [f"quickstart={trained.adapter_dir}"])
        servers.append(LiveServer(build_state(base=str(tiny_ct), device="cpu", **options)))
        return servers[-1]

    yield start
    for s in servers:
        s.stop()
