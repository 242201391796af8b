"""Two passes over whole vocabulary rows in C++, one call each: the int8 head's finish (its logits rounded to
bfloat16, the top candidates found and computed again from the exact matrix: lm_head.Int8Head) and greedy
sampling's first argmax (vocab_reduce.first_argmax).

Why by hand: on the 270M's 262k-entry row, the torch ops of the head's finish (the cast, vocab_reduce.top_indices'
block maxima and top-k, the gather of the exact rows, their matmul, the copy back) took ~0.8 ms of a ~12 ms one-row
step and the greedy argmax ~0.16 ms (measured on an AMD EPYC, Zen 4, 2 cores), mostly per-op passes over the row
and calls that each do little; one pass over the row with the block maxima kept on the side takes ~0.1 ms. No
library op picks a row's top-k and rescores them.

Numbers: the same as the torch path's: the rounding to bfloat16 is the cast's (round to nearest even), the
candidates are the k largest (ties at the boundary as arbitrary as torch.topk's), each rescored logit is the
product of the bfloat16 hidden row and the exact matrix's bfloat16 row summed in float32 and rounded once, as
F.linear computes it, up to the order of the sum (tests/base/test_vocab_native.py holds both to the torch path).
A row with a NaN leaves it to the torch path (its NaN rules are torch's), as does anything but a contiguous CPU
row of bfloat16 or float32.
"""

from __future__ import annotations

import functools
from typing import Any

import torch  # imported lazily by the loader and the engine, never at toolkit import time

_COMMON = r"""
#include <torch/csrc/inductor/cpp_prefix.h>
#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

using BVec = at::vec::Vectorized<at::BFloat16>;
using FVec = at::vec::VectorizedN<float, 2>;  // the floats of one BVec
constexpr int64_t W = BVec::size();

static inline FVec load(const float* p) { return FVec::loadu(p, W); }
static inline FVec load(const at::BFloat16* p) {
    return at::vec::convert<float, 2, at::BFloat16, 1>(BVec::loadu(p, W));
}

// Each block's max of x[0, n) times `scale` into bmax (float); false where a NaN was met (the caller's torch path
// then serves). Where `o` is given, the scaled x is also rounded to bfloat16 into it (round to nearest even, as a
// tensor cast rounds; the product by `scale` is float32's, unfused, as a tensor multiply's).
template <typename T>
static bool block_maxima(const T* x, float scale, at::BFloat16* o, int64_t n, int64_t block, float* bmax) {
    float lanes[W];
    const FVec by(scale);
    for (int64_t s = 0, b = 0; s < n; s += block, ++b) {
        const int64_t e = std::min(n, s + block);
        FVec m(-std::numeric_limits<float>::infinity());
        int64_t i = s;
        for (; i + W <= e; i += W) {
            FVec v = scale == 1.0f ? load(x + i) : load(x + i) * by;
            if (o) at::vec::convert<at::BFloat16, 1, float, 2>(v).store(o + i, W);
            m = at::vec::maximum(m, v);  // (NaN-propagating)
        }
        m.store(lanes, W);
        float best = -std::numeric_limits<float>::infinity();
        for (int64_t j = 0; j < W; ++j) {
            if (std::isnan(lanes[j])) return false;
            best = std::max(best, lanes[j]);
        }
        for (; i < e; ++i) {  // a short block's tail
            const float v = scale == 1.0f ? static_cast<float>(x[i]) : static_cast<float>(x[i]) * scale;
            if (std::isnan(v)) return false;
            if (o) o[i] = static_cast<at::BFloat16>(v);
            best = std::max(best, v);
        }
        bmax[b] = best;
    }
    return true;
}
"""

_FINISH = (
    _COMMON
    + r"""
// x [rows, vocab] (float32 or bfloat16, the int8 product; where `scale`, each row times scale[r] first) -> o [rows,
// vocab] bfloat16, with each row's k largest
// logits computed again from h [rows, cols] and w [vocab, cols] (both bfloat16). status[r] = 1 where row r has a NaN
// (left to the caller).
template <typename T>
static void finish(const T* x, const float* scale, at::BFloat16* o, const at::BFloat16* h, const at::BFloat16* w,
                   int64_t rows, int64_t vocab, int64_t cols, int64_t k, int64_t block, int64_t* status) {
    const int64_t nb = (vocab + block - 1) / block;
    std::vector<float> bmax(nb), hf(cols), values;
    std::vector<int64_t> order(nb), picked;
    for (int64_t r = 0; r < rows; ++r) {
        const T* xr = x + r * vocab;
        at::BFloat16* orow = o + r * vocab;
        status[r] = !block_maxima(xr, scale ? scale[r] : 1.0f, orow, vocab, block, bmax.data());
        if (status[r]) continue;
        // the kb blocks with the largest maxima hold the row's k largest entries
        const int64_t kb = std::min(k, nb);
        std::iota(order.begin(), order.end(), 0);
        std::nth_element(order.begin(), order.begin() + (kb - 1), order.end(),
                         [&](int64_t a, int64_t b) { return bmax[a] > bmax[b]; });
        picked.clear();
        values.clear();
        for (int64_t c = 0; c < kb; ++c) {
            for (int64_t j = order[c] * block, e = std::min(vocab, j + block); j < e; ++j) {
                picked.push_back(j);
                values.push_back(static_cast<float>(orow[j]));
            }
        }
        const int64_t kk = std::min<int64_t>(k, picked.size());
        std::vector<int64_t> at(picked.size());
        std::iota(at.begin(), at.end(), 0);
        std::nth_element(at.begin(), at.begin() + (kk - 1), at.end(),
                         [&](int64_t a, int64_t b) { return values[a] > values[b]; });
        // the exact rows are far apart in a matrix the int8 product just pushed out of the caches: asked for all at
        // once, their reads overlap instead of one row's latency after another's
        for (int64_t c = 0; c < kk; ++c) {
            const char* row = reinterpret_cast<const char*>(w + picked[at[c]] * cols);
            for (int64_t b = 0; b < cols * 2; b += 64) __builtin_prefetch(row + b);
        }
        const at::BFloat16* hr = h + r * cols;
        for (int64_t i = 0; i < cols; ++i) hf[i] = static_cast<float>(hr[i]);
        for (int64_t c = 0; c < kk; ++c) {
            const int64_t j = picked[at[c]];
            const at::BFloat16* wj = w + j * cols;
            FVec acc(0.0f);
            int64_t i = 0;
            for (; i + W <= cols; i += W) acc = at::vec::fmadd(load(hf.data() + i), load(wj + i), acc);
            at::vec::Vectorized<float> half = acc[0] + acc[1];
            float dot = at::vec::vec_reduce_all<float>(
                [](at::vec::Vectorized<float>& a, at::vec::Vectorized<float>& b) { return a + b; }, half);
            for (; i < cols; ++i) dot += hf[i] * static_cast<float>(wj[i]);
            orow[j] = static_cast<at::BFloat16>(dot);
        }
    }
}

extern "C" void kernel(const void* x, const float* scale, at::BFloat16* o, const at::BFloat16* h,
                       const at::BFloat16* w, int64_t rows, int64_t vocab, int64_t cols, int64_t k, int64_t block,
                       int64_t x_bf16, int64_t scaled, int64_t* status) {
    if (x_bf16) finish(static_cast<const at::BFloat16*>(x), nullptr, o, h, w, rows, vocab, cols, k, block, status);
    else finish(static_cast<const float*>(x), scaled ? scale : nullptr, o, h, w, rows, vocab, cols, k, block, status);
}
"""
)

_ARGMAX = (
    _COMMON
    + r"""
// out[r] = the first index of row r's max (x [rows, n]); status[r] = 1 where row r has a NaN (left to the caller).
template <typename T>
static void argmax(const T* x, int64_t rows, int64_t n, int64_t block, int64_t* out, int64_t* status) {
    const int64_t nb = (n + block - 1) / block;
    std::vector<float> bmax(nb);
    for (int64_t r = 0; r < rows; ++r) {
        const T* xr = x + r * n;
        status[r] = !block_maxima<T>(xr, 1.0f, nullptr, n, block, bmax.data());
        if (status[r]) continue;
        const int64_t b = std::max_element(bmax.begin(), bmax.end()) - bmax.begin();  // (the first block holding it)
        int64_t j = b * block;
        while (static_cast<float>(xr[j]) != bmax[b]) ++j;
        out[r] = j;
    }
}

extern "C" void kernel(const void* x, int64_t rows, int64_t n, int64_t block, int64_t x_bf16, int64_t* out,
                       int64_t* status) {
    if (x_bf16) argmax(static_cast<const at::BFloat16*>(x), rows, n, block, out, status);
    else argmax(static_cast<const float*>(x), rows, n, block, out, status);
}
"""
)

_PREPARE = (
    _COMMON
    + r"""
// x [rows, cols] bfloat16 -> inp [rows + 1, cols] float32: the pinning row (1, -1, 0, ...), then each row over its
// largest magnitude (at least FLT_MIN), that magnitude in peak[r]; a row with a NaN or inf goes in as zeros
// (bad[r] = 1). The same numbers as Int8Head.product's torch ops.
extern "C" void kernel(const at::BFloat16* x, float* inp, float* peak, int64_t* bad, int64_t rows, int64_t cols) {
    std::fill(inp, inp + cols, 0.0f);
    inp[0] = 1.0f;
    inp[1] = -1.0f;
    for (int64_t r = 0; r < rows; ++r) {
        const at::BFloat16* xr = x + r * cols;
        float* out = inp + (r + 1) * cols;
        float m = 0.0f;
        bool finite = true;
        for (int64_t i = 0; i < cols; ++i) {
            const float v = static_cast<float>(xr[i]);
            finite = finite && std::isfinite(v);
            m = std::max(m, std::fabs(v));
        }
        bad[r] = !finite;
        m = finite ? std::max(m, std::numeric_limits<float>::min()) : std::numeric_limits<float>::min();
        peak[r] = m;
        for (int64_t i = 0; i < cols; ++i) out[i] = finite ? static_cast<float>(xr[i]) / m : 0.0f;
    }
}
"""
)

_FINISH_ARGS = ["const void*", "const float*", "at::BFloat16*", "const at::BFloat16*", "const at::BFloat16*"]
_FINISH_ARGS += ["int64_t"] * 7 + ["int64_t*"]
_PREPARE_ARGS = ["const at::BFloat16*", "float*", "float*", "int64_t*", "int64_t", "int64_t"]
_ARGMAX_ARGS = ["const void*"] + ["int64_t"] * 4 + ["int64_t*", "int64_t*"]
_SOURCES = {
    "finish": (_FINISH_ARGS, _FINISH),
    "argmax": (_ARGMAX_ARGS, _ARGMAX),
    "prepare": (_PREPARE_ARGS, _PREPARE),
}
_DTYPES = (torch.float32, torch.bfloat16)


@functools.cache
def _kernel(which: str) -> Any:
    """The built kernel, or the reason it cannot be built here (a str: the torch path serves)."""
    from toolkit import native
    from toolkit.errors import brief

    try:
        return native.build(*_SOURCES[which])
    except Exception as exc:  # noqa: BLE001  (the toolchain's own errors)
        return brief(exc)


def _built(which: str) -> Any:
    if isinstance(call := _kernel(which), str):  # callers ask `serves` first
        raise RuntimeError(f"the {which} kernel is not built here: {call}")
    return call


def unavailable() -> str | None:
    """Why the kernels cannot serve here (no C++ toolchain, an inductor that moved), or None."""
    for which in _SOURCES:
        if isinstance(got := _kernel(which), str):
            return got
    return None


def _row_major(x: Any) -> bool:
    return x.device.type == "cpu" and x.dim() == 2 and x.is_contiguous() and x.dtype in _DTYPES


def serves(hidden: Any, weight: Any) -> bool:
    """Whether `prepare` and `finish` serve a head's rows: hidden [rows, cols] and its exact matrix [vocab, cols],
    both row-major bfloat16 on a CPU, and the kernels built here."""
    return (
        _row_major(hidden) and _row_major(weight) and hidden.dtype == weight.dtype == torch.bfloat16
        and hidden.shape[1] == weight.shape[1] >= 2 and weight.shape[0] > 0 and unavailable() is None
    )  # fmt: skip


def prepare(hidden: Any) -> tuple[Any, Any, list[int]]:
    """The int8 x int8 kernel's input for hidden [rows, cols] (see Int8Head.product): [rows + 1, cols] float32, the
    pinning row then each row over its largest magnitude; those magnitudes [rows]; the rows with a NaN or inf (in
    as zeros; their logits are the caller's to set to NaN). For rows `serves` admits."""
    rows, cols = hidden.shape
    inp = torch.empty(rows + 1, cols)
    peak = torch.empty(rows)
    bad = torch.empty(rows, dtype=torch.long)
    _built("prepare")(hidden, inp, peak, bad, rows, cols)
    return inp, peak, _flagged(bad)


def finish(product: Any, hidden: Any, weight: Any, k: int, block: int, scale: Any = None) -> tuple[Any, list[int]]:
    """Int8Head's logits [rows, vocab] in bfloat16: `product` (the int8 product, [rows, vocab] float32 or bfloat16;
    float32 rows times `scale` [rows] first, where given) rounded, each row's k largest computed again as hidden
    [rows, cols] @ weight [vocab, cols].T; and the rows it left to the caller (a NaN in them). For rows `serves`
    admits, `product` row-major."""
    rows, vocab = product.shape
    scaled = scale is not None and product.dtype == torch.float32
    fits = not scaled or (scale.dtype == torch.float32 and scale.is_contiguous() and scale.shape == (rows,))
    if not (_row_major(product) and fits and weight.shape[0] == vocab and hidden.shape[0] == rows and k > 0):
        raise ValueError(f"finish: product {tuple(product.shape)} does not match the head's rows and matrix")
    out = torch.empty(rows, vocab, dtype=torch.bfloat16)
    status = torch.empty(rows, dtype=torch.long)
    _built("finish")(product, scale if scaled else product, out, hidden, weight, rows, vocab, hidden.shape[1], k,
                      block, int(product.dtype == torch.bfloat16), int(scaled), status)  # fmt: skip
    return out, _flagged(status)


def first_argmax(x: Any, block: int) -> tuple[Any, list[int]] | None:
    """vocab_reduce.first_argmax's answer for a 2-D row-major CPU x (bfloat16 or float32), one pass a row, and the
    rows it left to the caller (a NaN in them); None where the kernel does not serve (see the module docstring)."""
    call = _kernel("argmax") if _row_major(x) and x.shape[1] > 0 else None
    if call is None or isinstance(call, str):
        return None
    out = torch.empty(x.shape[0], dtype=torch.long)
    status = torch.empty(x.shape[0], dtype=torch.long)
    call(x, x.shape[0], x.shape[1], block, int(x.dtype == torch.bfloat16), out, status)
    return out, _flagged(status)


def _flagged(status: Any) -> list[int]:
    return [i for i, flag in enumerate(status.tolist()) if flag]  # (a list: no torch op for a handful of rows)
