"""The LM head a CPU serves with: the tied token matrix as int8 rows, its top candidates rescored exactly.

Why: on a CPU one decoding step of a small Gemma 3 is mostly this matrix read from memory (the 270M's 262,208 x
640: 335 MB per token in bfloat16, 178 MB as int8; llama.cpp keeps it as Q8_0 in the GGUF the base comes from).
torch's weight-only int8 matmul (`_weight_int8pack_mm`, per-row scales) reads the int8 copy. Per-row int8 alone
moves the 270M's perplexity by ~0.3% but changes the greedy token at ~6% of held-out positions (near-ties: the
bfloat16 head itself differs from float32 math at ~2%). So each row's RESCORE best candidates are computed again
from the exact matrix (RESCORE rows of `hidden` multiply-adds): those logits, the argmax among them and therefore
greedy decoding, and the bulk of the softmax mass are the exact head's; only the tail's logits carry int8 rounding.
tests/base/test_lm_head.py gates it on the real 270M (perplexity within 0.5%, greedy agreement >= 99%).

The int8 product has two kernels, the faster timed at a head's first build on a machine and kept (`matmul`,
`choice_key`): torch's weight-only int8 matmul, and where the CPU has VNNI (int8 dot products) an int8 x int8 one,
the activations quantised too (`quantized::linear_dynamic`, fbgemm's / oneDNN's kernels under torch's x86
quantized engine). Why both: aten's
weight-only kernel converts every weight to a float before its multiply-add, so on some CPUs it is bound by that
arithmetic, not by memory: on an AMD EPYC (Zen 4, 2 cores) it read the 270M's head at 13 GB/s (12.9 ms) where a
plain read streams 35 GB/s, and the int8 x int8 kernel took 6-7 ms. Each row's activations get a scale of their own
(the row divided by its largest magnitude; a first row [1, -1, 0, ...] pins the call's quantisation range to [-1,
1]), so a row's int8 product is the same alone or in any batch.

Around the int8 product, a row's input scaling, the cast of its logits, the choice of its candidates and their exact
logits run as C++ passes of the toolkit's own (vocab_native.py: ~0.6 ms of the 270M's one-row step instead of ~1.3
in torch ops), the same numbers; the torch ops below serve where those are not built.

Every logit the served model gives goes through this head, whatever the call: a decoding step of any number of
rows, a prompt's every-position logits for prompt_logprobs (the perplexity a client measures through
/v1/completions), an evaluation's losses; so the logprobs a client reads are the served model's, one definition.
Training never sees this head (kernels.choose_head).
"""

from __future__ import annotations

import sys
import time
from typing import Any

import torch  # imported lazily by the loader, never at toolkit import time
import torch.nn.functional as F

from toolkit.base import vocab_native
from toolkit.base.vocab_reduce import BLOCK, top_indices
from toolkit.errors import ToolkitError

# Rows per int8 matmul. Measured on an AMD EPYC (2 cores, the 270M's head), int8 / bfloat16 F.linear: 1 row 4.4 /
# 11.3 ms, 4 rows 5.7 / 12.4, 8 rows 10.4 / 13.3, 16 rows 21.3 / 16.3 (the int8 kernel's cost grows with the rows
# past ~4): more rows go in chunks of this many, e.g. a 16-row decoding step's head ~21 ms instead of 16.
INT8_ROWS = 8
RESCORE = 64  # candidates per row computed again from the exact matrix (top-k + gather: ~0.15 ms on the 270M)
QUANT_CHUNK = 1 << 14  # rows quantised at a time: a float32 copy of the 27B's whole head would be 5.6 GB
# The int8 x int8 kernel takes rows in chunks of this many plus its pinning row: its cost steps up past 16 rows
# (measured on the AMD EPYC above: 16 rows 13 ms, 17 rows 19 ms)
DYNAMIC_ROWS = 15
MATMULS = ("auto", "weight_only", "dynamic")
HEAD_NAMES = {"weight_only": "int8-weight-only", "dynamic": "int8-dynamic"}  # each kernel's --lm-head name
REVISION = 1  # part of the kept choice's key (choice_key): bump when the kernels or their row chunks change


class Int8Head(torch.nn.Module):
    """Wraps the model's exact LM head (kept as `exact`: its weight stays tied to the token embedding). `matmul`:
    the int8 product's kernel, "weight_only", "dynamic" (int8 x int8, VNNI only) or "auto" (the faster, timed)."""

    def __init__(self, exact: Any, matmul: str = "auto") -> None:
        super().__init__()
        if matmul not in MATMULS:
            raise ToolkitError(
                f"unknown int8 matmul {matmul!r}", where="--lm-head", fix="use int8-weight-only or int8-dynamic"
            )
        why = dynamic_unavailable()
        if matmul == "dynamic" and why:
            raise ToolkitError(
                f"the int8 x int8 head is not available here: {why}",
                where="--lm-head",
                fix="use int8 or int8-weight-only",
            )
        self.exact = exact
        vocab_native.unavailable()  # its C++ passes built at load (once a process), not in the first request
        self.qweight, self.scales = quantize_rows(exact.weight.detach())
        self.int8_bytes = self.qweight.nbytes + self.scales.nbytes  # what one product reads (bench/bandwidth.py)
        self.matmul, self._packed = "weight_only", None
        # how the kernel was chosen (`describe`): named, timed now, or kept from an earlier timing on this machine
        self.chosen = "asked for" if matmul != "auto" else f"auto ({why})" if why else "auto"
        if matmul != "weight_only" and not why:
            kept = self._kept() if matmul == "auto" else None
            if kept == "weight_only":  # (no int8 x int8 copy packed for nothing)
                return
            try:
                self._packed, self._pin = _prepack(self.qweight, self.scales)
            except (RuntimeError, AttributeError) as exc:  # a torch whose quantized tensors are gone: weight-only
                if matmul == "dynamic":
                    raise ToolkitError(
                        f"the int8 x int8 head failed to build: {exc}", where="--lm-head", fix="use int8-weight-only"
                    ) from exc
                self.chosen = f"auto (the int8 x int8 kernel failed to build: {exc})"
                return
            self.matmul = "dynamic" if "dynamic" in (matmul, kept) else self._time_and_keep()
            if self.matmul == "dynamic":
                self.qweight = None  # the packed copy serves; not both in memory (the 27B's head: 1.4 GB each)
            else:
                self._packed = None

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
        step = DYNAMIC_ROWS if self.matmul == "dynamic" else INT8_ROWS
        parts = [self._rows(flat[i : i + step]) for i in range(0, flat.shape[0], step)]
        logits = parts[0] if len(parts) == 1 else torch.cat(parts)
        return logits.view(*hidden.shape[:-1], -1)

    def product(self, flat: Any) -> Any:
        """The int8 product alone, [rows, vocab] (no rescoring): what the head reads per call."""
        if self.matmul == "weight_only":
            return torch._weight_int8pack_mm(flat.to(torch.bfloat16), self.qweight, self.scales)
        x = flat.float()
        # a NaN or inf row would break the call's range search for every row (a NaN first even raises): it goes in
        # as zeros and comes out as NaN logits
        finite = torch.isfinite(x).all(1, keepdim=True)
        x = torch.where(finite, x, 0.0)
        peak = x.abs().amax(1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)
        out = self.matvec(torch.cat([self._pin, x / peak]))[1:] * peak
        return out if bool(finite.all()) else out.masked_fill(~finite, float("nan"))

    def matvec(self, x: Any) -> Any:
        """The int8 kernel's call alone on input ready for it (the int8 x int8 one's: pinning row first, `product`):
        what bench/bandwidth.py times as the machine's bandwidth at this precision."""
        if self.matmul == "weight_only":
            return torch._weight_int8pack_mm(x, self.qweight, self.scales)
        return torch.ops.quantized.linear_dynamic(x, self._packed, False)

    def describe(self) -> str:
        """The kernel serving the int8 product and how it was chosen, e.g. for `toolkit serve`'s start-up line."""
        return f"{HEAD_NAMES[self.matmul]}, {self.chosen}"

    def _kept(self) -> str | None:
        """The kernel kept for this head's shape on this machine (`choice_key`), or None (not timed yet)."""
        hit = kept_choice(*self.exact.weight.shape)
        if hit is None:
            return None
        self.chosen = hit[1]
        return hit[0]

    def _time_and_keep(self) -> str:
        """The faster kernel for one row here, timed now and kept (`choice_key`)."""
        from toolkit.base import kept_choices

        seconds = self._timed()
        summary = ", ".join(f"{HEAD_NAMES[k]} {s * 1e3:.2f} ms" for k, s in seconds.items()) + " for one row"
        self.chosen = f"auto (timed now: {summary})"
        best = min(seconds, key=seconds.get)
        entry = {"matmul": best, "summary": summary, "seconds": seconds}
        kept_choices.keep(choice_key(*self.exact.weight.shape), entry, lambda line: print(line, file=sys.stderr))
        return best

    def _timed(self) -> dict[str, float]:
        """Seconds of one row's product with each kernel here (the best of three calls each)."""
        x = torch.randn(1, self.exact.weight.shape[1]).to(torch.bfloat16)
        best = {}
        for kind in ("weight_only", "dynamic"):
            self.matmul = kind
            self.product(x)  # first call: allocations, the kernel's own set-up
            times = []
            for _ in range(3):
                start = time.perf_counter()
                self.product(x)
                times.append(time.perf_counter() - start)
            best[kind] = min(times)
        return best

    def _rows(self, flat: Any) -> Any:
        if flat.dtype != torch.bfloat16 or not vocab_native.serves(flat, self.weight):
            return self._finish(self.product(flat), flat)
        # the int8 kernel's input, the cast of its output, the top candidates and their exact logits in C++
        # (vocab_native.py: ~0.4 ms a row against ~1.4 for the torch ops of `product` and `_finish`); the same
        # numbers
        scale, bad = None, []
        if self.matmul == "weight_only":
            raw = self.matvec(flat)
        else:
            x, scale, bad = vocab_native.prepare(flat)
            raw = self.matvec(x)[1:]
        logits, left = vocab_native.finish(raw, flat, self.weight, RESCORE, BLOCK, scale)
        for i in left:  # a NaN in the product: torch's NaN rules
            logits[i] = self._finish(self.product(flat[i : i + 1]), flat[i : i + 1])[0]
        if bad:  # a row with a NaN or inf: NaN logits, as `product` gives (the torch path then rescores its top
            logits[bad] = float("nan")  # candidates from the row itself: NaN or, for an inf without a NaN, +-inf)
        return logits

    def _finish(self, product: Any, flat: Any) -> Any:
        logits = product.to(flat.dtype)
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


def choice_key(rows: int, cols: int) -> str:
    """Where auto's kernel for a head of this shape is kept (kept_choices.py, beside the training kernel's): it
    is timed at the first build on a machine, not at every load: timing both takes ~2 s on the 270M's head, more on
    the 27B's, and a near call re-timed at every load could flip between two servers on one machine."""
    from toolkit.base.kept_choices import cpu_name

    threads = torch.get_num_threads()
    return f"lm head {REVISION} | {cpu_name()} | {threads} threads | torch {torch.__version__} | {rows}x{cols}"


def kept_choice(rows: int, cols: int) -> tuple[str, str] | None:
    """auto's kernel kept for a head of this shape here and how it was chosen (`Int8Head.chosen`), or None."""
    from toolkit.base import kept_choices

    entry = kept_choices.kept(choice_key(rows, cols))
    readable = isinstance(entry, dict) and isinstance(entry.get("summary"), str)
    if not readable or entry.get("matmul") not in HEAD_NAMES:
        return None  # not timed yet (or an entry this version cannot read: timed again)
    return entry["matmul"], f"auto (timed on this machine: {entry['summary']})"


def auto_kernel(rows: int, cols: int) -> str:
    """What auto's int8 head on this shape serves with here, as `Int8Head.describe` gives it after a load (for
    `toolkit info`, which loads nothing)."""
    if why := dynamic_unavailable():
        return f"{HEAD_NAMES['weight_only']}, auto ({why})"
    hit = kept_choice(rows, cols)
    return f"{HEAD_NAMES[hit[0]]}, {hit[1]}" if hit else "the faster kernel, timed at the first load on this machine"


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


def dynamic_unavailable() -> str | None:
    """Why the int8 x int8 kernel cannot serve here, or None. It needs VNNI: without it the kernel's 8-bit products
    saturate in 16 bits unless the activations keep 7 bits, which on the 270M moved perplexity by 0.7% (the gate
    allows 0.5)."""
    if "x86" not in torch.backends.quantized.supported_engines:
        return f"torch {torch.__version__} has no x86 quantized engine"
    vnni = getattr(torch.cpu, "_is_vnni_supported", None)
    if vnni is None or not vnni():
        return "the CPU has no AVX512-VNNI"
    return None


def _prepack(codes: Any, scales: Any) -> tuple[Any, Any]:
    """The int8 codes as the x86 quantized engine's packed weight (the same codes and per-row scales), and the
    pinning row."""
    import warnings

    engine, torch.backends.quantized.engine = torch.backends.quantized.engine, "x86"
    zeros = torch.zeros(codes.shape[0], dtype=torch.long)
    try:
        with warnings.catch_warnings():  # torch 2.14 warns that quantized tensors are deprecated: requirements.lock
            warnings.simplefilter("ignore")  # pins a torch that has them (without them: the weight-only kernel)
            quantized = torch._make_per_channel_quantized_tensor(codes, scales.double(), zeros, 0)
            packed = torch.ops.quantized.linear_prepack(quantized, None)
    finally:
        torch.backends.quantized.engine = engine
    pin = torch.zeros(1, codes.shape[1])
    pin[0, 0], pin[0, 1] = 1.0, -1.0
    return packed, pin


def use_int8_head(model: Any, matmul: str = "auto") -> None:
    """Serve `model` with the int8 head in place of its own (the generic forward and the lean step both call it)."""
    model.set_output_embeddings(Int8Head(model.get_output_embeddings(), matmul))
