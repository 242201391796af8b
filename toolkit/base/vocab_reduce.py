"""The two reductions every CPU decoding step makes over a whole vocabulary row: the argmax (greedy sampling) and the
top-k (lm_head.Int8Head's candidates to rescore).

Why: aten's CPU argmax and topk over one 262k-entry row are scalar loops that carry an index with every element
(measured on an AMD EPYC, one thread: argmax 150 us over float32, 850 us over bfloat16; topk(64) 250 us), where a
vectorised max over the same row takes ~30 us. So both go through block maxima: the row cut into blocks, each
block's max (`amax`, vectorised), then the exact answer looked for only where it can be:
- argmax: the first block holding the row's max, then the first max inside it: torch.argmax's answer, the first
  index of the max (NaN counts as the max, as there), 30 us instead of 150;
- top-k: the k blocks with the largest maxima hold every entry above the k-th largest block max, so the k largest
  of their entries are the row's k largest values (ties at the boundary resolved arbitrarily, as torch.topk does),
  ~80 us instead of 250.
No library has these: torch.argmax and torch.topk are the library calls being worked around. On other devices, or
rows too short to gain, the plain calls run.
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
    if x.dtype in HALVES:  # exact; aten's bfloat16 max is slower than the conversion and the float32 max together
        x = x.float()
    starts = _block_maxima(x).argmax(dim=-1) * BLOCK  # the first block holding the max (a short row: cheap)
    _, inside = _block_entries(x, starts.unsqueeze(1))
    return starts + inside.argmax(dim=-1)


def top_indices(x: Any, k: int) -> Any:
    """The indices of each row's k largest values of a 2-D [rows, n] tensor (torch.topk's set, in no set order)."""
    rows, n = x.shape
    if x.device.type != "cpu" or n < 4 * k * BLOCK:
        return x.topk(min(k, n), dim=1, sorted=False).indices
    if x.dtype in HALVES:
        x = x.float()
    blocks = _block_maxima(x).topk(k, dim=1, sorted=False).indices  # [rows, k]
    # (the last block's missing entries are never picked: k full blocks hold k entries anyway)
    idx, candidates = _block_entries(x, (blocks * BLOCK).view(rows, -1, 1))  # [rows, k * BLOCK] each
    return idx.gather(1, candidates.topk(k, dim=1, sorted=False).indices)


def _block_maxima(x: Any) -> Any:
    """[rows, ceil(n / BLOCK)]: each block's max; the last block is the row's remainder (a view for the rest)."""
    rows, n = x.shape
    full = n // BLOCK * BLOCK
    maxima = x[:, :full].reshape(rows, -1, BLOCK).amax(dim=-1)
    if full < n:
        maxima = torch.cat([maxima, x[:, full:].amax(dim=-1, keepdim=True)], dim=1)
    return maxima


def _block_entries(x: Any, starts: Any) -> tuple[Any, Any]:
    """The indices and values of the blocks starting at `starts` [rows, blocks, 1] (or [rows, 1]), flattened per
    row; a short last block's places past the row hold -inf, never a row's max nor among its k largest."""
    n = x.shape[1]
    idx = (starts + torch.arange(BLOCK, device=starts.device)).view(x.shape[0], -1)
    return idx, x.gather(1, idx.clamp(max=n - 1)).masked_fill_(idx >= n, float("-inf"))
