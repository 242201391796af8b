"""Per-row KV storage without a model: what a row shows attention and what it holds."""

from __future__ import annotations

import torch

from toolkit.engine.kv_cache import KVLayout, RowKV


def test_rows_keep_their_own_tokens_sliding_layers_the_last_window_and_hold_little_more():
    layout = KVLayout(windows=(8, None), kv_heads=1, head_dim=2, elem_bytes=4)
    row = RowKV(layout, limit=None)
    tokens = torch.arange(300, dtype=torch.float32)
    fed = 0
    for n in [5, 1, 1, 30, 1, 7, 1, 1, 100, 1, 1, 1, 1, 50]:  # chunks and decoding steps, crossing the window
        new = tokens[fed : fed + n].view(1, n, 1).expand(1, n, 2)
        for layer in (0, 1):
            row.append(layer, new, -new)
        fed += n
        row.seen = fed
        sliding, _ = row.view(0)
        full, values = row.view(1)
        assert sliding[0, :, 0].tolist() == tokens[max(0, fed - 7) : fed].tolist()  # window - 1 newest
        assert full[0, :, 0].tolist() == tokens[:fed].tolist() and values[0, :, 0].tolist() == (-tokens[:fed]).tolist()
        if fed > 100:  # growth by 1/8 (full layer), window-1 + 64 slack at most (sliding layer)
            assert row.held_bytes() <= 1.25 * row.needed_bytes() + layout.token_bytes * (7 + 64)


def test_storage_never_grows_past_the_rows_limit_so_the_reservation_holds():
    layout = KVLayout(windows=(1024, None), kv_heads=2, head_dim=4, elem_bytes=2)
    row = RowKV(layout, limit=1000)
    for _ in range(1000):
        k = torch.zeros((2, 1, 4), dtype=torch.bfloat16)
        for layer in (0, 1):
            row.append(layer, k, k)
        row.seen += 1
    assert row.held_bytes() <= layout.reserve_bytes(1000)
    assert row.held_bytes() == layout.needed_bytes(1000)  # a row at its limit holds exactly what it needs


def test_a_sliding_layer_serves_what_new_tokens_attend_to_in_place_across_compactions():
    """After appending a few tokens (decoding steps, small chunks) a sliding layer still holds the window - 1 before
    them, so `last(held + n)` is exactly the old view followed by the new tokens, also when the append compacted."""
    layout = KVLayout(windows=(16, None), kv_heads=1, head_dim=2, elem_bytes=4)
    row = RowKV(layout, limit=None)
    tokens = torch.arange(1000, dtype=torch.float32)
    fed, compactions = 0, 0
    for n in [3, 1, 14, 1, 1, 5] + [1] * 150 + [9, 2, 14] * 10:  # every n <= window - 2 (the lean pass's fast path)
        new = tokens[fed : fed + n].view(1, n, 1).expand(1, n, 2)
        storage = row.keys[0]
        before = [] if storage is None else row.view(0)[0][0, :, 0].tolist()
        held = row.held(0)
        row.append(0, new, -new)
        compactions += storage is not None and row.keys[0] is not storage
        keys, values = row.last(0, held + n)
        assert keys[0, :, 0].tolist() == before + tokens[fed : fed + n].tolist()
        assert values[0, :, 0].tolist() == (-keys[0, :, 0]).tolist()
        fed += n
    assert compactions >= 3  # the storage was rebuilt (old tokens moved) several times along the way


def test_a_prompt_fed_in_chunks_is_stored_without_a_copy_until_it_is_complete():
    """A row told its prompt length allocates a full layer for all of it at the first chunk: no re-copy of the
    growing prompt while it joins (each one stalled every running row), and no more than the row may hold."""
    layout = KVLayout(windows=(16, None), kv_heads=1, head_dim=2, elem_bytes=4)
    row = RowKV(layout, limit=1004, prompt=1000)
    allocations, storage = 0, None
    for _ in range(1000 // 40):
        k = torch.zeros((1, 40, 2))
        for layer in (0, 1):
            row.append(layer, k, k)
        row.seen += 40
        allocations += row.keys[1] is not storage
        storage = row.keys[1]
    assert allocations == 1 and row.keys[1].shape[1] == 1000 + 4  # one allocation, capped at the row's limit
    assert row.held_bytes() <= layout.reserve_bytes(1004)
