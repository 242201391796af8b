"""The reductions a CPU decoding step makes over a whole vocabulary row: the argmax (greedy sampling), the top-k
(lm_head.Int8Head's candidates to rescore; sampling's top_k and logprobs) and the inverse CDF
(sampling's draw).

Why: aten's CPU argmax and topk over one 262k-entry row are scalar loops that carry an index with every element
(measured on an AMD EPYC, one thread: argmax 150 us over float32, 850 us over bfloat16; topk(64) 250 us), where a
vectorised max over the same row takes ~30 us. So both go through block maxima: the row cut into blocks, each
block's max (`amax`, vectorised), then the exact answer looked for only where it can be:
- argmax: the first block holding the row's max, then the first max inside it: torch.argmax's answer, the first
  index of the max (NaN counts as the max, as there), 30 us instead of 150;
- top-k: the k blocks with the largest maxima hold every entry above the k-th largest block max, so the k largest
  of their entries are the row's k largest values (ties at the boundary resolved arbitrarily, as torch.topk does),
  ~80 us instead of 250;
- inverse CDF: each block's sum, their running sum, then the running sum inside the one block the target falls in
  (torch.cumsum over the row is a scalar loop: 210 us over 262k float32, against ~63 us here, the whole draw).
No library has these: torch.argmax and torch.topk are the library calls being worked around. On other devices, or
rows too short to gain, the plain calls run. The argmax of a float32 or bfloat16 row goes to vocab_native.py's C++
pass where it is built (the same blocks in one pass: ~50 us instead of ~90 in the ops below).
"""

from __future__ import annotations

from typing import Any

import torch  # imported lazily by the loader and the engine, never at toolkit import time

BLOCK = 128  # entries per block: the 262k vocabulary in ~2k blocks (measured fastest for both among 64..4096)
HALVES = (torch.bfloat16, torch.float16)  # converted to float32 first (exactly); other dtypes are reduced as they are


def first_argmax(x: Any) -> Any:
    """`x.argmax(dim=-1)` for a 2-D [rows, n] tensor: the first index of each row's max (NaN as the max)."""
    rows, n = x.shape
    if x.device.type != "cpu" or n < 4 * BLOCK:
        return x.argmax(dim=-1)
    from toolkit.base import vocab_native

    if (done := vocab_native.first_argmax(x, BLOCK)) is not None:  # the same answer in one C++ pass a row (~3x faster)
        found, left = done
        for i in left:  # a row with a NaN: torch's NaN rules
            found[i] = _first_argmax_by_blocks(x[i : i + 1])[0]
        return found
    return _first_argmax_by_blocks(x)


def _first_argmax_by_blocks(x: Any) -> Any:
    if x.dtype in HALVES:  # exact; aten's bfloat16 max is slower than the conversion and the float32 max together
        x = x.float()
    starts = _per_block(x, "amax").argmax(dim=-1) * BLOCK  # the first block holding the max (a short row: cheap)
    _, inside = _block_entries(x, starts.unsqueeze(1))
    return starts + inside.argmax(dim=-1)


def top_indices(x: Any, k: int) -> Any:
    """The indices of each row's k largest values of a 2-D [rows, n] tensor (torch.topk's set, in no set order)."""
    rows, n = x.shape
    if x.device.type != "cpu" or n < 4 * k * BLOCK:
        return x.topk(min(k, n), dim=1, sorted=False).indices
    if x.dtype in HALVES:
        x = x.float()
    blocks = _per_block(x, "amax").topk(k, dim=1, sorted=False).indices  # [rows, k]
    idx, candidates = _block_entries(x, (blocks * BLOCK).view(rows, -1, 1))  # [rows, k * BLOCK] each
    picked = idx.gather(1, candidates.topk(k, dim=1, sorted=False).indices)
    # A short last block's places past the row hold -inf: never picked while a row has k values above -inf, but a row
    # with fewer (a grammar's mask) ties them with its own -inf entries, and any of those may be picked
    if bool((picked >= n).any()):
        return x.topk(k, dim=1, sorted=False).indices
    return picked


def top_sorted(x: Any, k: int) -> tuple[Any, Any]:
    """`torch.topk(x, k)` for a 2-D [rows, n] tensor: the k largest values of each row, descending, and their indices,
    equal values in ascending index order (torch.topk promises no order; which of the values tied at the k-th are
    in is as arbitrary as there)."""
    idx = top_indices(x, k).sort(dim=1).values
    values, order = x.gather(1, idx).sort(dim=1, descending=True, stable=True)
    return values, idx.gather(1, order)


def inverse_cdf(weights: Any, u: Any) -> Any:
    """For non-negative weights [rows, n] and u [rows] in [0, 1): the first index whose running sum of weights
    exceeds u times the row's total (`searchsorted(cumsum, u * total, right=True)`), always an index of positive
    weight; where rounding leaves every running sum at or under the target, the row's last index of positive
    weight."""
    n = weights.shape[1]
    if weights.device.type != "cpu" or n < 4 * BLOCK:
        cdf = weights.cumsum(dim=-1)
        target = (u.double() * cdf[:, -1].double()).to(cdf.dtype).unsqueeze(1)
        picked = torch.searchsorted(cdf, target, right=True).squeeze(1)
        return _last_positive_past_the_end(weights, picked, n)
    csum = _per_block(weights, "sum").cumsum(dim=-1)
    target = (u.double() * csum[:, -1].double()).to(csum.dtype).unsqueeze(1)
    block = torch.searchsorted(csum, target, right=True)  # [rows, 1]; the first block whose running sum passes
    past = block.squeeze(1) >= csum.shape[1]
    block.clamp_(max=csum.shape[1] - 1)
    before = csum.gather(1, (block - 1).clamp(min=0)).masked_fill_(block == 0, 0)
    idx, values = _block_entries(weights, block * BLOCK)
    values.clamp_(min=0)  # a short last block's places past the row: no weight
    inside = torch.searchsorted(before + values.cumsum(dim=-1), target, right=True)  # BLOCK: rounding, none passed
    picked = idx.gather(1, inside.clamp(max=BLOCK - 1)).squeeze(1)
    short = inside.squeeze(1) >= BLOCK
    if bool(short.any()):  # the block's own running sum stopped short of its sum: its last entry of positive weight
        picked[short] = idx[short].gather(1, _last_positive(values[short]).unsqueeze(1)).squeeze(1)
    picked[past] = n  # the target at or past the total: the row's last positive weight
    return _last_positive_past_the_end(weights, picked, n)


def _last_positive_past_the_end(weights: Any, picked: Any, n: int) -> Any:
    """`picked` with every index past the row (n) replaced by the row's last index of positive weight."""
    over = picked >= n
    if bool(over.any()):
        picked = picked.clone()
        picked[over] = _last_positive(weights[over])
    return picked


def _last_positive(weights: Any) -> Any:
    """Each row's last index of positive weight."""
    return weights.shape[1] - 1 - (weights > 0).flip(1).int().argmax(dim=1)


def _per_block(x: Any, reduce: str) -> Any:
    """[rows, ceil(n / BLOCK)]: each block's `reduce` ("amax", "sum"); the last block is the row's remainder (a view
    for the rest)."""
    rows, n = x.shape
    full = n // BLOCK * BLOCK
    out = getattr(x[:, :full].reshape(rows, -1, BLOCK), reduce)(dim=-1)
    if full < n:
        out = torch.cat([out, getattr(x[:, full:], reduce)(dim=-1, keepdim=True)], dim=1)
    return out


def _block_entries(x: Any, starts: Any) -> tuple[Any, Any]:
    """The indices and values of the blocks starting at `starts` [rows, blocks, 1] (or [rows, 1]), flattened per
    row; a short last block's places past the row hold -inf, never a row's max nor among its k largest (nor a
    weight, once clamped at 0)."""
    n = x.shape[1]
    idx = (starts + torch.arange(BLOCK, device=starts.device)).view(x.shape[0], -1)
    return idx, x.gather(1, idx.clamp(max=n - 1)).masked_fill_(idx >= n, float("-inf"))
