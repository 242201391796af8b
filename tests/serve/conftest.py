"""Fixtures the server tests share: one live server (tiny base + quickstart adapter) and an openai client per module."""

from __future__ import annotations

import openai
import pytest


@pytest.fixture(scope="module")
def server(make_server):
    return make_server()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
