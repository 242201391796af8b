"""One decoding query's attention over its row's stored keys and values, the new token's own stored first: one C++
call per layer for every decoding query it serves, in the compiled one-row step (compiled_step.py) and in eager
passes alike (LeanDecoder.kernel_query). Built as toolkit/native.py builds the toolkit's kernels.

Why by hand: in the 270M's compiled step, each layer's attention through the eager path (kv_cache.RowKV.append, the
views it attends to, SDPA's dispatch, reshapes) cost ~70 us, ~1.3 ms of a ~4.5 ms layers step, for a row of ~80
tokens whose keys and values are ~80 KB a layer; SDPA's CPU kernel alone took ~20-35 us of it. No library op
appends a key and attends in one call, and inductor compiles attention only over shapes fixed at compile time (the
row grows every step; a graph over a symbolic length ran slower than the eager path). Built with inductor's own
C++ toolchain and Python binding (the compiled step needs that toolchain anyway), vectorised with ATen's
`at::vec` types, so it runs the CPU's widest float unit as inductor's kernels do.

Numbers: SDPA's CPU flash kernel's for bfloat16, up to the order of float sums: the scores and softmax in float32
from the bfloat16 keys, the softmax's sum over its float weights, the product with the values over the weights
rounded to bfloat16, one rounding of the output (tests/engine/test_one_query.py holds it to SDPA,
test_compiled_step.py the step to the generic forward, test_real_base a served row alone to the same row batched).
"""

from __future__ import annotations

import functools
from typing import Any

import torch  # imported lazily by the engine, never at toolkit import time

MAX_GROUP = 8  # query heads per KV head the kernel holds in registers (the 270M 4, the 27B 2)
# Past this many attended positions a layer takes the eager path: SDPA's kernel alone is as fast from ~500 keys and
# faster from a few thousand (one thread: 89 against 84 us at 511 keys, 639 against 527 at 4000), while the eager
# path's own calls around it cost ~40 us a layer
MAX_KEYS = 1024

_SOURCE = r"""
#include <torch/csrc/inductor/cpp_prefix.h>
#include <vector>

using BVec = at::vec::Vectorized<at::BFloat16>;
using FVec = at::vec::VectorizedN<float, 2>;  // the floats of one BVec
// fits() admits head sizes in whole steps of 32 and groups of up to MAX_GROUP query heads: a build where a step is
// not a divisor of 32 fails here, and the eager attention serves
static_assert(32 % BVec::size() == 0, "head sizes step by 32");
static_assert(BVec::size() == 2 * at::vec::Vectorized<float>::size(), "one FVec holds one BVec");
constexpr int64_t MAX_GROUP = @MAX_GROUP@;

static inline float total(const FVec& x) {
    at::vec::Vectorized<float> v = x[0] + x[1];
    return at::vec::vec_reduce_all<float>(
        [](at::vec::Vectorized<float>& a, at::vec::Vectorized<float>& b) { return a + b; }, v);
}

// q [kv_heads * g, d]; k_new, v_new [kv_heads, d]; keys, values [kv_heads, cap, d]; out [kv_heads * g, d].
// Attends to positions [first, first + n); when `write`, the new key and value go to position first + n - 1 first.
extern "C" void kernel(const at::BFloat16* q, const at::BFloat16* k_new, const at::BFloat16* v_new,
                       at::BFloat16* keys, at::BFloat16* values, at::BFloat16* out, int64_t first, int64_t n,
                       int64_t cap, int64_t kv_heads, int64_t g, int64_t d, int64_t write, float scale) {
    constexpr int64_t w = BVec::size();
    std::vector<float> qf(g * d), scores(g * n), acc(g * d), sums(g);
    for (int64_t h = 0; h < kv_heads; ++h) {
        at::BFloat16* K = keys + h * cap * d;
        at::BFloat16* V = values + h * cap * d;
        if (write) {
            std::memcpy(K + (first + n - 1) * d, k_new + h * d, d * sizeof(at::BFloat16));
            std::memcpy(V + (first + n - 1) * d, v_new + h * d, d * sizeof(at::BFloat16));
        }
        for (int64_t j = 0; j < g * d; ++j) qf[j] = static_cast<float>(q[h * g * d + j]);
        for (int64_t t = 0; t < n; ++t) {  // each key read once for the group's queries
            const at::BFloat16* kt = K + (first + t) * d;
            FVec dots[MAX_GROUP];
            for (int64_t j = 0; j < g; ++j) dots[j] = FVec(0.0f);
            for (int64_t i = 0; i < d; i += w) {
                FVec k = at::vec::convert<float, 2, at::BFloat16, 1>(BVec::loadu(kt + i, w));
                for (int64_t j = 0; j < g; ++j) dots[j] = dots[j] + FVec::loadu(qf.data() + j * d + i, w) * k;
            }
            for (int64_t j = 0; j < g; ++j) scores[j * n + t] = total(dots[j]) * scale;
        }
        for (int64_t j = 0; j < g; ++j) {
            float* s = scores.data() + j * n;
            float m = s[0];
            for (int64_t t = 1; t < n; ++t) m = std::max(m, s[t]);
            float sum = 0.0f;
            for (int64_t t = 0; t < n; ++t) {  // as SDPA's CPU kernel: the sum of the float weights, the product
                float e = std::exp(s[t] - m);  // with the values over the weights rounded to bfloat16
                sum += e;
                s[t] = static_cast<float>(static_cast<at::BFloat16>(e));
            }
            sums[j] = sum;
        }
        std::fill(acc.begin(), acc.end(), 0.0f);
        for (int64_t t = 0; t < n; ++t) {
            const at::BFloat16* vt = V + (first + t) * d;
            for (int64_t i = 0; i < d; i += w) {
                FVec v = at::vec::convert<float, 2, at::BFloat16, 1>(BVec::loadu(vt + i, w));
                for (int64_t j = 0; j < g; ++j) {
                    float* a = acc.data() + j * d + i;
                    (FVec::loadu(a, w) + FVec(scores[j * n + t]) * v).store(a, w);
                }
            }
        }
        for (int64_t j = 0; j < g; ++j) {
            float inv = 1.0f / sums[j];
            for (int64_t i = 0; i < d; ++i)
                out[(h * g + j) * d + i] = static_cast<at::BFloat16>(acc[j * d + i] * inv);
        }
    }
}
"""

_ARGS = ["const at::BFloat16*"] * 3 + ["at::BFloat16*"] * 3 + ["int64_t"] * 7 + ["float"]


@functools.cache
def kernel() -> Any:
    """The compiled kernel (built once per process; inductor caches the build on disk). Raises what the toolchain
    raises where it cannot build."""
    from toolkit import native

    return native.build(_ARGS, _SOURCE.replace("@MAX_GROUP@", str(MAX_GROUP)))


def fits(heads: int, kv_heads: int, head_dim: int, windows: tuple) -> bool:
    """Whether the kernel serves these attention shapes: whole steps of 32 per head, a group of query heads it holds
    in registers, sliding windows that keep a past token (RowKV's window of 2 or less restarts its storage at each
    token, which the kernel's reading does not follow)."""
    return (
        heads % kv_heads == 0
        and heads // kv_heads <= MAX_GROUP
        and head_dim % 32 == 0
        and all(w is None or w > 2 for w in windows)
    )


class OneQuery:
    """`a = attend(q, k, v, row, layer)`: [1, heads * d] for one row's decoding query q [1, heads, 1, d] and its new
    key and value [1, kv_heads, 1, d], bfloat16, stored into `row` (kv_cache.RowKV) as RowKV.append stores them;
    None, the row untouched, where the layer holds MAX_KEYS tokens or more or the inputs are not contiguous (the
    caller's eager path serves it)."""

    def __init__(self, heads: int, kv_heads: int, head_dim: int, windows: tuple, scales: list[float]) -> None:
        if not fits(heads, kv_heads, head_dim, windows):  # the kernel's bounds rest on these
            raise ValueError(f"attention shapes the kernel does not serve: {heads} x {kv_heads} x {head_dim}")
        self.call = kernel()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.group = heads // kv_heads
        self.scales = scales

    def __call__(self, q: Any, k: Any, v: Any, row: Any, layer: int) -> Any:
        held, length, keys = row.held(layer), row.length[layer], row.keys[layer]
        # the kernel reads raw pointers: a layout it does not expect would read the wrong numbers silently
        if held >= MAX_KEYS or not (q.is_contiguous() and k.is_contiguous() and v.is_contiguous()):
            return None
        write = keys is not None and length < keys.shape[1]
        if not write:  # a new or compacted buffer: RowKV.append's own rules, then the kernel reads
            row.append(layer, k[0], v[0])
            keys = row.keys[layer]
        # (else room after the stored tokens: the kernel stores the new ones itself, RowKV.append's plain case)
        end = length + 1 if write else row.length[layer]
        out = torch.empty(1, self.heads * self.head_dim, dtype=torch.bfloat16)
        self.call(q, k, v, keys, row.values[layer], out, end - held - 1, held + 1, keys.shape[1], self.kv_heads,
                  self.group, self.head_dim, int(write), self.scales[layer])  # fmt: skip
        row.length[layer] = end
        return out
