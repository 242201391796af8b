"""The LM head a CPU serves with: the tied token matrix as int8 rows, its top candidates rescored exactly.

Why: on a CPU one decoding step of a small Gemma 3 is mostly this matrix read from memory (the 270M's 262,208 x
640: 335 MB per token in bfloat16, 178 MB as int8; llama.cpp keeps it as Q8_0 in the GGUF the base comes from).
torch's weight-only int8 matmul (`_weight_int8pack_mm`, per-row scales) reads the int8 copy. Per-row int8 alone
moves the 270M's perplexity by ~0.3% but changes the greedy token at ~6% of held-out positions (near-ties: the
bfloat16 head itself differs from float32 math at ~2%). So each row's RESCORE best candidates are computed again
from the exact matrix (RESCORE rows of `hidden` multiply-adds): those logits, the argmax among them and therefore
greedy decoding, and the bulk of the softmax mass are the exact head's; only the tail's logits carry int8 rounding.
tests/base/test_lm_head.py gates it on the real 270M (perplexity within 0.5%, greedy agreement >= 99%).

Every logit the served model gives goes through this head, whatever the call: a decoding step of any number of
rows, a prompt's every-position logits for prompt_logprobs (the perplexity a client measures through
/v1/completions), an evaluation's losses; so the logprobs a client reads are the served model's, one definition.
Training never sees this head (kernels.choose_head).
"""

from __future__ import annotations

from typing import Any

import torch  # imported lazily by the loader, never at toolkit import time
import torch.nn.functional as F

from toolkit.base.vocab_reduce import top_indices

# Rows per int8 matmul. Measured on an AMD EPYC (2 cores, the 270M's head), int8 / bfloat16 F.linear: 1 row 4.4 /
# 11.3 ms, 4 rows 5.7 / 12.4, 8 rows 10.4 / 13.3, 16 rows 21.3 / 16.3 (the int8 kernel's cost grows with the rows
# past ~4): more rows go in chunks of this many, e.g. a 16-row decoding step's head ~21 ms instead of 16.
INT8_ROWS = 8
RESCORE = 64  # candidates per row computed again from the exact matrix (top-k + gather: ~0.15 ms on the 270M)
QUANT_CHUNK = 1 << 14  # rows quantised at a time: a float32 copy of the 27B's whole head would be 5.6 GB


class Int8Head(torch.nn.Module):
    """Wraps the model's exact LM head (kept as `exact`: its weight stays tied to the token embedding)."""

    def __init__(self, exact: Any) -> None:
        super().__init__()
        self.exact = exact
        self.qweight, self.scales = quantize_rows(exact.weight.detach())

    @property
    def weight(self) -> Any:  # the tied matrix, for whatever reads the head's weight (sizes, re-tying)
        return self.exact.weight

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "weight":  # re-tying (`head.weight = embedding.weight`) ties the exact head it wraps
            self.exact.weight = value
        else:
            super().__setattr__(name, value)

    def forward(self, hidden: Any) -> Any:
        flat = hidden.reshape(-1, hidden.shape[-1])
        if flat.device.type != "cpu":
            return self.exact(hidden)
        parts = [self._rows(flat[i : i + INT8_ROWS]) for i in range(0, flat.shape[0], INT8_ROWS)]
        logits = parts[0] if len(parts) == 1 else torch.cat(parts)
        return logits.view(*hidden.shape[:-1], -1)

    def _rows(self, flat: Any) -> Any:
        logits = torch._weight_int8pack_mm(flat.to(torch.bfloat16), self.qweight, self.scales).to(flat.dtype)
        vocab = logits.shape[1]
        top = top_indices(logits, RESCORE)  # [rows, k]
        # index_select / index_copy_ on flat views, not fancy indexing and scatter_: ~30 and ~100 us less per call
        # in the head's parallel region (the ops' own thread split does not pay at this size)
        rows = self.weight.index_select(0, top.view(-1)).view(*top.shape, -1)  # [rows, k, hidden]
        if rows.dtype != flat.dtype:  # a float32 model over the bfloat16 matrix (loader.bfloat16_token_matrix)
            rows = rows.to(flat.dtype)
        exact = F.linear(flat, rows[0]) if len(flat) == 1 else torch.bmm(rows, flat.unsqueeze(2)).squeeze(2)
        where = (top + torch.arange(0, logits.numel(), vocab).unsqueeze(1)).view(-1)
        logits.view(-1).index_copy_(0, where, exact.reshape(-1))
        return logits


def quantize_rows(weight: Any) -> tuple[Any, Any]:
    """Symmetric int8 per row: codes [rows, cols] int8 and scales [rows] bfloat16 (the matmul's dtype). Each row
    is rounded against its scale as stored (bfloat16), so the codes carry the only rounding."""
    rows = weight.shape[0]
    codes = torch.empty(weight.shape, dtype=torch.int8)
    scales = torch.empty(rows, dtype=torch.bfloat16)
    for start in range(0, rows, QUANT_CHUNK):
        w = weight[start : start + QUANT_CHUNK].float()
        scale = (w.abs().amax(1) / 127).clamp(min=torch.finfo(torch.bfloat16).tiny).to(torch.bfloat16)
        codes[start : start + QUANT_CHUNK] = torch.round(w / scale.float()[:, None]).clamp_(-127, 127)
        scales[start : start + QUANT_CHUNK] = scale
    return codes, scales


def use_int8_head(model: Any) -> None:
    """Serve `model` with the int8 head in place of its own (the generic forward and the lean step both call it)."""
    model.set_output_embeddings(Int8Head(model.get_output_embeddings()))
