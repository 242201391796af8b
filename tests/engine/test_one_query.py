"""The compiled step's one-query attention kernel (engine/one_query.py) against RowKV.append and SDPA."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from toolkit.engine.kv_cache import KVLayout, RowKV
from toolkit.engine.one_query import MAX_KEYS, OneQuery, fits

HEADS, KV_HEADS, DIM = 4, 2, 64


def _layout(windows: tuple) -> KVLayout:
    return KVLayout(windows, KV_HEADS, DIM, 2)


def _reference(q, k, v, row: RowKV, layer: int, scale: float):
    """The eager lean step's way: RowKV.append, the window it then attends to, SDPA per KV head's group."""
    window = row.layout.windows[layer]
    held = row.held(layer)
    row.append(layer, k[0], v[0])
    keys, values = row.last(layer, held + 1)
    folded = q.reshape(KV_HEADS, HEADS // KV_HEADS, 1, DIM).transpose(1, 2)  # [kv, 1, group, d]
    o = F.scaled_dot_product_attention(folded, keys[:, None], values[:, None], scale=scale)
    assert window is None or keys.shape[1] <= window
    return o.transpose(1, 2).reshape(1, HEADS * DIM)


@pytest.mark.parametrize("window", [None, 8])
def test_each_step_stores_what_append_stores_and_attends_as_sdpa(window):
    """A row from empty through 40 steps (a sliding layer's buffer filled and compacted on the way): each step the
    kernel's row holds the same keys and values as the eager row, and its output is SDPA's within a bfloat16 step."""
    torch.manual_seed(0)
    layout = _layout((window, None))
    one = OneQuery(HEADS, KV_HEADS, DIM, layout.windows, [DIM**-0.5, 0.3])
    ours, theirs = RowKV(layout), RowKV(layout)
    for _ in range(40):
        q = torch.randn(1, HEADS, 1, DIM, dtype=torch.bfloat16)
        k, v = (torch.randn(1, KV_HEADS, 1, DIM, dtype=torch.bfloat16) for _ in range(2))
        for layer, scale in enumerate(one.scales):
            got = one(q, k, v, ours, layer)
            want = _reference(q, k, v, theirs, layer, scale)
            assert got.shape == want.shape == (1, HEADS * DIM)
            torch.testing.assert_close(got.float(), want.float(), rtol=0.01, atol=0.01)
            assert ours.length[layer] == theirs.length[layer]
            for x, y in zip(ours.view(layer), theirs.view(layer), strict=True):
                assert torch.equal(x, y)
    assert ours.held(0) == (40 if window is None else window - 1) and ours.held(1) == 40


def test_a_row_past_max_keys_is_left_to_the_eager_path():
    """A layer that holds MAX_KEYS tokens or more gets None and its storage untouched (the caller's SDPA path
    stores and attends); below that the kernel serves."""
    layout = _layout((None,))
    one = OneQuery(HEADS, KV_HEADS, DIM, layout.windows, [DIM**-0.5])
    row = RowKV(layout)
    row.append(0, *(torch.randn(KV_HEADS, MAX_KEYS, DIM, dtype=torch.bfloat16) for _ in range(2)))
    before = copy.deepcopy(row)
    q = torch.randn(1, HEADS, 1, DIM, dtype=torch.bfloat16)
    k, v = (torch.randn(1, KV_HEADS, 1, DIM, dtype=torch.bfloat16) for _ in range(2))
    assert one(q, k, v, row, 0) is None
    assert row.length == before.length
    assert all(torch.equal(x, y) for x, y in zip(row.view(0), before.view(0), strict=True))
    row.length[0] = MAX_KEYS - 1
    assert one(q, k, v, row, 0) is not None and row.length[0] == MAX_KEYS


def test_shapes_it_serves():
    assert fits(4, 1, 256) and fits(32, 16, 128) and fits(2, 1, 128)
    assert not fits(16, 1, 128)  # a group of 16 query heads per KV head
    assert not fits(4, 1, 80)  # not whole vectors
