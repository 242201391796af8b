"""Per-row KV cache: every running row holds exactly its own tokens; a forward pass sees them left-padded.

`RowKV` stores one row's keys and values, layer by layer, at that row's own length (full-attention layers:
every token; sliding-window layers: the last window-1). `RaggedCache` is a transformers `Cache` over the rows
of one forward pass: in each layer's `update` it appends the rows' new keys/values to their own storage and
returns them gathered left-padded to the widest row, so Gemma 3's attention, transformers' masks (causal,
sliding window, padding, image blocks from `token_type_ids`) and peft's per-row adapters run unchanged. The
padded copy lives only while that one layer computes; what stays in memory between steps is proportional to
the tokens held (`KVLayout.held_bytes`), not rows x widest row.

Why not transformers' own caches (5.23):
- `DynamicCache` keeps one [rows, heads, width, dim] tensor per layer: rows pad each other to the widest
  (one 30k-token row beside 15 short ones holds 16 x 30k slots per global layer).
- The paged cache of its continuous batching (`generation/continuous_batching`, `PagedAttentionCache` with the
  `paged|sdpa` attention) flattens every row into one sequence of batch size 1. peft's mixed-adapter batches
  pick each row's LoRA by batch index (`adapter_names`, one per row), and Gemma 3's bidirectional image blocks
  are built from `token_type_ids` per batch row; neither survives the flattening, and its manager brings its
  own scheduler and sampler (ours: sampling.py, per-row seeds). So the storage here is hand-written and small.

Where the model's own forward runs over a RaggedCache (prompts with images or prompt logprobs, fresh prompts
prefilled together), the cost of padding moves from memory to compute: attention runs over the widest row's columns
(masked). Decoding steps and text-only prompt chunks read each row's storage directly instead (lean_decode.py).
This module knows tensors and layers only: no requests, no sampling, no scheduling.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch  # this module is imported lazily by the engine, never at toolkit import time
from transformers.cache_utils import Cache, CacheLayerMixin

GROW = 8  # a row's storage grows by 1/GROW of its length (amortised copies; at most ~12% slack)
ALIGN = 16  # ... and in multiples of this many tokens
SLIDING_SLACK = 64  # a sliding layer keeps up to window-1 + this many tokens before it drops the oldest


@dataclass(frozen=True)
class KVLayout:
    """The model's attention layers as the cache sees them: heads, head size, element size, sliding windows."""

    windows: tuple[int | None, ...]  # per layer: None = full attention, else the sliding window
    kv_heads: int
    head_dim: int
    elem_bytes: int

    @classmethod
    def of(cls, model: Any, dtype: Any) -> KVLayout:
        config = model.config.get_text_config()
        types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
        window = getattr(config, "sliding_window", None)
        windows = tuple(window if t == "sliding_attention" and window else None for t in types)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        elem = torch.empty((), dtype=dtype).element_size()
        return cls(windows, config.num_key_value_heads, head_dim, elem)

    @property
    def token_bytes(self) -> int:
        """Bytes of one token in one layer: keys and values."""
        return 2 * self.kv_heads * self.head_dim * self.elem_bytes

    def needed_bytes(self, tokens: int) -> int:
        """What a row of `tokens` tokens needs: every token in full layers, the last window-1 in sliding ones."""
        return self.token_bytes * sum(tokens if w is None else min(tokens, w - 1) for w in self.windows)

    def capacity(self, window: int | None, needed: int, limit: int | None) -> int:
        """Storage (tokens) to allocate for `needed` tokens: some room to grow, never past the row's `limit`."""
        room = max(ALIGN, needed // GROW)
        cap = math.ceil((needed + room) / ALIGN) * ALIGN
        if window is not None:
            cap = min(cap, window - 1 + SLIDING_SLACK)
        if limit is not None:
            cap = min(cap, limit if window is None else min(limit, window - 1 + SLIDING_SLACK))
        return max(cap, needed if window is None else min(needed, window - 1))

    def reserve_bytes(self, tokens: int) -> int:
        """The most a row of at most `tokens` tokens can ever hold (its storage is capped at that length)."""
        per_layer = [tokens if w is None else min(tokens, w - 1 + SLIDING_SLACK) for w in self.windows]
        return self.token_bytes * sum(per_layer)


class RowKV:
    """One row's keys and values: per layer a [heads, capacity, dim] buffer of which `length` are filled.

    `seen` counts every token the row has put in the cache (its position frame); sliding layers keep only the
    newest window-1 of them (plus slack before a compaction).
    """

    def __init__(self, layout: KVLayout, limit: int | None = None, prompt: int = 0) -> None:
        self.layout, self.limit = layout, limit  # limit: prompt + max_tokens (storage never grows past it)
        # A prompt prefilled in chunks is sure to reach its full length, so its first allocation makes room for
        # all of it: growing by 1/GROW instead re-copied a 30k-token row ~40 times while it joined, the late
        # copies ~10 ms each (30 MB for one global layer of the tiny base), every one stalling the running rows.
        self.prompt = prompt
        n = len(layout.windows)
        self.keys: list[Any] = [None] * n
        self.values: list[Any] = [None] * n
        self.length = [0] * n
        self.seen = 0

    def held(self, layer: int) -> int:
        """Tokens visible to attention in `layer` (sliding layers: at most window-1)."""
        w = self.layout.windows[layer]
        return self.length[layer] if w is None else min(self.length[layer], w - 1)

    def view(self, layer: int) -> tuple[Any, Any]:
        n, h = self.length[layer], self.held(layer)
        return self.keys[layer][:, n - h : n], self.values[layer][:, n - h : n]

    def append(self, layer: int, k: Any, v: Any) -> None:
        """Add new tokens' keys/values ([heads, n, dim]) to `layer`."""
        w, n = self.layout.windows[layer], k.shape[1]
        if w is not None and n >= w - 1:  # the new tokens alone fill the window: the old ones all leave
            k, v, n = k[:, -(w - 1) :], v[:, -(w - 1) :], w - 1
            self.length[layer] = 0
        buf, length = self.keys[layer], self.length[layer]
        if buf is None or length + n > buf.shape[1]:
            # old tokens still needed after the append: a sliding layer keeps window-1 of them beside a few new ones
            # (`last` then returns what those new tokens attend to, without a copy), else only what stays in view
            keep = length if w is None else min(length, w - 1 if n <= SLIDING_SLACK else w - 1 - n)
            cap = self.layout.capacity(w, max(keep + n, self.prompt), self.limit)
            nk = torch.empty((k.shape[0], cap, k.shape[2]), dtype=k.dtype, device=k.device)
            nv = torch.empty_like(nk)
            if keep:
                nk[:, :keep] = buf[:, length - keep : length]
                nv[:, :keep] = self.values[layer][:, length - keep : length]
            self.keys[layer], self.values[layer], length = nk, nv, keep
        self.keys[layer][:, length : length + n] = k
        self.values[layer][:, length : length + n] = v
        self.length[layer] = length + n

    def last(self, layer: int, n: int) -> tuple[Any, Any]:
        """The newest `n` tokens stored in `layer` (a view). In a sliding layer, right after appending up to
        SLIDING_SLACK tokens to `held` ones, `last(layer, held + new)` is what the new tokens attend to."""
        length = self.length[layer]
        assert n <= length, (n, length)
        return self.keys[layer][:, length - n : length], self.values[layer][:, length - n : length]

    def held_bytes(self) -> int:
        """Bytes of storage allocated (capacity, not just filled)."""
        return sum(2 * b.numel() * b.element_size() for b in self.keys if b is not None)

    def needed_bytes(self) -> int:
        return self.layout.needed_bytes(self.seen)


class _RaggedLayer(CacheLayerMixin):
    """One layer of a RaggedCache: the CacheLayerMixin surface that Gemma 3 and masking_utils use."""

    is_compileable = False
    is_croppable = False
    supports_early_init = False

    def __init__(self, cache: RaggedCache, index: int, window: int | None) -> None:
        super().__init__()
        self.cache, self.index, self.window = cache, index, window
        self.is_sliding = window is not None
        self.sliding_window = window
        self.is_initialized = True

    def get_seq_length(self) -> int:
        return self.cache.past  # the position frame (columns) of the padded batch, as for a DynamicCache

    def get_max_length(self) -> int:
        return -1

    def lazy_initialization(self, key_states: Any, value_states: Any) -> None:
        pass  # storage lives in the rows

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        past = self.cache.past
        if self.window is None:
            return past + query_length, 0
        return min(past, self.window - 1) + query_length, max(past - self.window + 1, 0)

    def update(self, key_states: Any, value_states: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        """Store each row's new tokens; return [rows, heads, past_width + q, dim] left-padded (zeros masked)."""
        rows, q = self.cache.rows, key_states.shape[2]
        width = self.get_mask_sizes(q)[0] - q  # past columns this layer shows
        if width == 0:  # no past anywhere (a fresh prefill): the new states are the whole answer
            out_k, out_v = key_states, value_states
        else:
            b, h, _, d = key_states.shape
            out_k = key_states.new_zeros((b, h, width + q, d))
            out_v = torch.zeros_like(out_k)
            for i, row in enumerate(rows):
                pk, pv = row.view(self.index)
                if pk.shape[1]:
                    out_k[i, :, width - pk.shape[1] : width] = pk
                    out_v[i, :, width - pv.shape[1] : width] = pv
            out_k[:, :, width:] = key_states
            out_v[:, :, width:] = value_states
        for i, (row, new) in enumerate(zip(rows, self.cache.new_tokens, strict=True)):
            if new:
                row.append(self.index, key_states[i, :, q - new :], value_states[i, :, q - new :])
        return out_k, out_v


class RaggedCache(Cache):
    """A transformers-compatible cache over `rows` for one forward pass (built per pass; the rows persist).

    `new_tokens[i]` is how many of the pass's last positions are row i's real tokens (the rest is left
    padding). Rows with a past must all get the same number of new tokens (decode steps, or one row's chunk).
    """

    def __init__(self, rows: list[RowKV], new_tokens: list[int]) -> None:
        self.rows, self.new_tokens = rows, new_tokens
        self.past = max(r.seen for r in rows)  # the widest row sets the position frame
        super().__init__(layers=[_RaggedLayer(self, i, w) for i, w in enumerate(rows[0].layout.windows)])

    def finish(self) -> None:
        """After the forward pass: every row has seen its new tokens."""
        for row, new in zip(self.rows, self.new_tokens, strict=True):
            row.seen += new

    # --- the transformers Cache surface that Gemma 3's forward and masking_utils call ---
    def update(self, key_states: Any, value_states: Any, layer_idx: int, *args: Any, **kwargs: Any):
        return self.layers[layer_idx].update(key_states, value_states)

    def __len__(self) -> int:
        return len(self.layers)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.past

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self.past

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        if layer_idx >= len(self.layers):
            return query_length, 0
        return self.layers[layer_idx].get_mask_sizes(query_length)

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    @property
    def is_sliding(self) -> list[bool]:
        return [layer.is_sliding for layer in self.layers]

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_initialized(self) -> bool:
        return True

    @property
    def is_linear(self) -> list[bool]:
        return [False] * len(self.layers)

    @property
    def is_dummy(self) -> list[bool]:
        return [False] * len(self.layers)
