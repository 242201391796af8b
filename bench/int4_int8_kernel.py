"""How fast the base's int4 projections could run with int8 activations (AVX512-VNNI), against GPTQModel's kernel.

    .venv/bin/python bench/int4_int8_kernel.py [--base build/real-base] [--rows 1,4,16] [--rounds 5]

Why: issue R3 2/6's open goal (one client at >= 70% of the memory-bandwidth limit) and its first token. GPTQModel's
AVX512 kernel (what `toolkit serve` runs on this CPU) multiplies bfloat16 activations by weights it unpacks to
bfloat16: one row at about the memory's speed, but every further row costs as much again (its 4-row tiles unpack
the weights again per tile), so a 16-token prompt's 126 projections take ~15 ms of its ~31 ms pass. llama.cpp's CPU
path instead rounds activations to int8 in blocks of 32 (Q8_0) and multiplies int4 x int8 with integer dot products.
This script builds that kernel (a prototype: not wired into the engine) and measures what it would change, before
anyone changes the served model's numbers for it:
  - time: all of the base's int4 projections at 1, 4 and 16 rows, weights cold (each call's weights differ, as in a
    step), rounds alternating between the kernels, median;
  - error: each kernel's output against the exact product (float32 activations times the exactly dequantised
    weights), relative Frobenius norm, on the activations a real prompt gives each projection.
The kernel: per 16 output columns, the weights repacked so one 64-byte load holds 8 inputs' codes for 16 columns
(low nibbles: 4 inputs, high nibbles: the next 4), `vpdpbusd` (unsigned codes x signed int8 activations, 32-bit
sums) per 32-input block, the block's activation scale and the group's weight scale applied in float32, the zero
point through the block's sum of activation codes. Needs AVX512-VNNI and AVX512-BF16; JSON to stdout. Not part of
the test suite.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

SOURCE = r"""
#include <torch/csrc/inductor/cpp_prefix.h>
#include <immintrin.h>

#define TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512bf16,fma")))

TARGET static inline __m512 widen(__m256i bf16) {  // 16 bfloat16 -> 16 float32 (exact)
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bf16), 16));
}

// x [M, K] bfloat16 -> xq [M, K] int8 in blocks of 32 (sx [M, K / 32]: each block's scale, its largest |x| / 127)
// and c [M, K / group]: per weight group, the sum over its blocks of scale x the block's sum of codes (what the zero
// point multiplies)
TARGET static void quantize(const uint16_t* x, int8_t* xq, float* sx, float* c, int64_t M, int64_t K,
                            int64_t group) {
    const int64_t blocks = K / 32, per = group / 32, groups = K / group;
    for (int64_t m = 0; m < M; ++m) {
        for (int64_t b = 0; b < blocks; ++b) {
            const uint16_t* p = x + m * K + b * 32;
            __m512 lo = widen(_mm256_loadu_si256((const __m256i*)p));
            __m512 hi = widen(_mm256_loadu_si256((const __m256i*)(p + 16)));
            float peak = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
            float inv = peak > 0 ? 127.0f / peak : 0.0f;
            __m512i qlo = _mm512_cvtps_epi32(_mm512_mul_ps(lo, _mm512_set1_ps(inv)));
            __m512i qhi = _mm512_cvtps_epi32(_mm512_mul_ps(hi, _mm512_set1_ps(inv)));
            _mm_storeu_si128((__m128i*)(xq + m * K + b * 32), _mm512_cvtsepi32_epi8(qlo));
            _mm_storeu_si128((__m128i*)(xq + m * K + b * 32 + 16), _mm512_cvtsepi32_epi8(qhi));
            float s = peak / 127.0f;
            sx[m * blocks + b] = s;
            float share = s * (float)_mm512_reduce_add_epi32(_mm512_add_epi32(qlo, qhi));
            c[m * groups + b / per] = (b % per == 0 ? 0.0f : c[m * groups + b / per]) + share;
        }
    }
}

// MT rows x one block of 16 output columns; w: that block's codes, 64 bytes per 8 inputs
template <int MT>
TARGET static void tile(const uint8_t* w, const int8_t* xq, const float* sx, const float* c, const float* scales,
                        const float* zs, uint16_t* out, int64_t K, int64_t N, int64_t group, int64_t col) {
    const int64_t blocks = K / 32, per = group / 32, groups = K / group;
    const __m512i nibble = _mm512_set1_epi8(0x0F);
    __m512 acc[MT];
    for (int i = 0; i < MT; ++i) acc[i] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; ++g) {
        const __m512 scale = _mm512_loadu_ps(scales + g * N + col);
        const __m512 zero = _mm512_loadu_ps(zs + g * N + col);
        for (int64_t j = 0; j < per; ++j) {
            const int64_t b = g * per + j;
            __m512i dot[MT];
            for (int i = 0; i < MT; ++i) dot[i] = _mm512_setzero_si512();
            for (int q = 0; q < 4; ++q) {
                const int64_t k = b * 32 + q * 8;
                const __m512i v = _mm512_loadu_si512(w + k * 8);
                const __m512i first = _mm512_and_si512(v, nibble);
                const __m512i second = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);
                for (int i = 0; i < MT; ++i) {
                    const int32_t* xi = (const int32_t*)(xq + i * K + k);
                    dot[i] = _mm512_dpbusd_epi32(dot[i], first, _mm512_set1_epi32(xi[0]));
                    dot[i] = _mm512_dpbusd_epi32(dot[i], second, _mm512_set1_epi32(xi[1]));
                }
            }
            for (int i = 0; i < MT; ++i)
                acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[i]),
                                         _mm512_mul_ps(scale, _mm512_set1_ps(sx[i * blocks + b])), acc[i]);
        }
        for (int i = 0; i < MT; ++i) acc[i] = _mm512_fnmadd_ps(zero, _mm512_set1_ps(c[i * groups + g]), acc[i]);
    }
    for (int i = 0; i < MT; ++i)
        _mm256_storeu_si256((__m256i*)(out + i * N + col), (__m256i)_mm512_cvtneps_pbh(acc[i]));
}

extern "C" void kernel(const uint16_t* x, const uint8_t* w, const float* scales, const float* zs, uint16_t* out,
                       int8_t* xq, float* sx, float* c, int64_t M, int64_t K, int64_t N, int64_t group,
                       int64_t threads) {
    quantize(x, xq, sx, c, M, K, group);
    const int64_t columns = N / 16, blocks = K / 32, groups = K / group;
    #pragma omp parallel for num_threads(threads) schedule(static) if(threads > 1)
    for (int64_t cb = 0; cb < columns; ++cb) {
        const uint8_t* wb = w + cb * K * 8;
        int64_t m = 0;
        for (; m + 4 <= M; m += 4)
            tile<4>(wb, xq + m * K, sx + m * blocks, c + m * groups, scales, zs, out + m * N, K, N, group, cb * 16);
        for (; m < M; ++m)
            tile<1>(wb, xq + m * K, sx + m * blocks, c + m * groups, scales, zs, out + m * N, K, N, group, cb * 16);
    }
}
"""
ARGS = ["const uint16_t*", "const uint8_t*", "const float*", "const float*", "uint16_t*", "int8_t*", "float*"]
ARGS += ["float*"] + ["int64_t"] * 5


class Int4Int8:
    """One projection's weights repacked for the kernel: `out = layer(x)`, x [M, K] bfloat16 -> [M, N] bfloat16."""

    def __init__(self, call: Any, codes: Any, qzeros: Any, scales: Any, group: int) -> None:

        n, k = codes.shape
        if n % 16 or k % group or group % 32:
            raise ValueError(f"a {n} x {k} projection in groups of {group} does not fit the kernel's blocks")
        c = codes.view(n // 16, 16, k // 8, 2, 4)  # column block, lane, 8 inputs, first / next 4, input
        self.w = (c[:, :, :, 0] | (c[:, :, :, 1] << 4)).permute(0, 2, 1, 3).contiguous()
        self.scales = scales.float().contiguous()
        self.zs = (scales.float() * qzeros.float()).contiguous()  # the zero point's product, per group and column
        self.call, self.n, self.k, self.group = call, n, k, group

    def __call__(self, x: Any) -> Any:
        import torch

        m = x.shape[0]
        out = torch.empty(m, self.n, dtype=torch.bfloat16)
        xq = torch.empty(m, self.k, dtype=torch.int8)
        sx, c = torch.empty(m, self.k // 32), torch.empty(m, self.k // self.group)
        args = (xq, sx, c, m, self.k, self.n, self.group, torch.get_num_threads())
        self.call(x.contiguous(), self.w, self.scales, self.zs, out, *args)
        return out


def projections(base: Any) -> list:
    """The base's int4 layers in their forward order, repacked by GPTQModel's AVX512 kernel (after one forward)."""
    import torch

    from toolkit.base.gptq_backend import is_quantized_linear

    with torch.no_grad():
        base.model(input_ids=torch.tensor([[2, 3]]), logits_to_keep=1)
    layers = [m for m in base.model.modules() if is_quantized_linear(m)]
    kinds = {type(m).__name__ for m in layers}
    if kinds != {"TorchCpuAvx512Linear"}:
        raise SystemExit(f"this compares against GPTQModel's AVX512 kernel; the base loaded {sorted(kinds)}")
    return layers


def inputs(base: Any, layers: list) -> dict:
    """Each projection's input [tokens, K] on a real chat prompt (hooks on one forward)."""
    import torch
    from peer_serve import PROMPTS, templated_ids

    ids = torch.tensor([templated_ids(base.tokenizer, PROMPTS[5])])
    seen: dict = {}
    hooks = [m.register_forward_pre_hook(lambda mod, a: seen.setdefault(mod, a[0].reshape(-1, a[0].shape[-1])))
             for m in layers]  # fmt: skip
    try:
        with torch.no_grad():
            base.model(input_ids=ids, logits_to_keep=1)
    finally:
        for h in hooks:
            h.remove()
    return seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default=str(ROOT / "build" / "real-base"))
    parser.add_argument("--rows", default="1,4,16")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    import torch
    from gptqmodel.nn_modules.qlinear.torch_cpu_avx512 import unpack_hf_int4
    from report import cpu_label

    from toolkit import native
    from toolkit.base.loader import load_base

    call = native.build(ARGS, SOURCE)
    base = load_base(args.base, device="cpu", kernel="cpu_avx512")
    layers = projections(base)
    seen = inputs(base, layers)
    ours, codes = [], []
    for m in layers:
        codes.append(unpack_hf_int4(m.qweight, m.out_features, m.in_features))
        ours.append(Int4Int8(call, codes[-1], m.qzeros, m.scales, m.group_size))

    def gptq(i: int, x: Any) -> Any:
        m = layers[i]
        return m.gemm_int4_qzero_group_scaled_cpu_kernel(x, m.qweight, m.qzeros, m.scales, m.group_size, None)

    kernels = {"gptqmodel": gptq, "int4_int8": lambda i, x: ours[i](x)}
    errors: dict = {name: [] for name in kernels}
    for i, m in enumerate(layers):  # each projection's exact product once, against both kernels
        groups = torch.arange(m.in_features) // m.group_size
        weight = (codes[i].float() - m.qzeros.float()[groups].t()) * m.scales.float()[groups].t()  # [N, K]
        x = seen[m]
        exact = x.float() @ weight.t()
        for name, run in kernels.items():
            errors[name].append(float((run(i, x).float() - exact).norm() / exact.norm()))
    errors = {name: {"median": statistics.median(e), "worst": max(e)} for name, e in errors.items()}

    timing: dict = {}
    for rows in [int(r) for r in args.rows.split(",")]:
        xs = [torch.randn(rows, m.in_features).to(torch.bfloat16) for m in layers]
        runs: dict = {name: [] for name in kernels}
        for _ in range(args.rounds):
            for name, run in kernels.items():
                for i in range(len(layers)):  # warm: allocations, the OpenMP team
                    run(i, xs[i])
                start = time.perf_counter()
                for _ in range(5):
                    for i in range(len(layers)):
                        run(i, xs[i])
                runs[name].append((time.perf_counter() - start) / 5 * 1e3)
        ms = {k: statistics.median(v) for k, v in runs.items()}
        timing[rows] = {**{f"{k}_ms": round(v, 3) for k, v in ms.items()}, "ratio": ms["gptqmodel"] / ms["int4_int8"]}
    nbytes = sum(t.numel() * t.element_size() for m in layers for t in (m.qweight, m.qzeros, m.scales))
    print(json.dumps({
        "cpu": cpu_label(), "threads": torch.get_num_threads(), "projections": len(layers),
        "weights_mb": round(nbytes / 1e6, 1), "ms_all_projections": timing, "relative_error": errors,
    }, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
