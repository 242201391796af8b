"""The memory-bandwidth limit of one decoding step: what every tokens/s figure is measured against.

    .venv/bin/python bench/bandwidth.py [--base DIR] [--context 128]

One row's decoding step reads every weight once (the 4-bit layers as their kernel holds them after its repack,
the LM head at the precision it serves with, the norms) and its row's keys and values; at one row nothing else
of that size moves. The limit is those bytes over the machine's bandwidth, measured as a matrix-vector product at
the head's precision over the head itself on every thread (the largest matrix of the step, far past the caches):
the fastest a step could go if it did nothing but stream its bytes once. JSON to stdout; imported by
bench/decode_step.py and bench/peer_serve.py. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def step_bytes(base: Any, context_tokens: int) -> dict:
    """Bytes one row's decoding step reads: weights as held in memory, the head as served, the row's KV."""
    import torch

    from toolkit.base.gptq_backend import is_quantized_linear
    from toolkit.engine.kv_cache import KVLayout

    model = base.model
    with torch.no_grad():  # one forward: the CPU kernels repack their weights at their first call
        model(input_ids=torch.tensor([[2, 3]]), logits_to_keep=1)
    quantized = 0
    seen: set[int] = set()
    for module in model.modules():
        if is_quantized_linear(module):
            for name in ("qweight", "qzeros", "scales", "g_idx", "bias"):
                t = getattr(module, name, None)
                if isinstance(t, torch.Tensor) and t.data_ptr() not in seen:
                    seen.add(t.data_ptr())
                    quantized += t.nbytes
    head = model.get_output_embeddings()
    if hasattr(head, "int8_bytes"):  # lm_head.Int8Head: the int8 codes and their scales, plus RESCORE exact rows
        from toolkit.base.lm_head import RESCORE

        head_bytes = head.int8_bytes + RESCORE * head.weight[0].nbytes
    else:
        head_bytes = head.weight.nbytes
    text = model.config.get_text_config()
    norms = (text.num_hidden_layers * 4 + 1) * text.hidden_size * 4 + text.num_hidden_layers * 2 * text.head_dim * 4
    embed_row = model.get_input_embeddings().weight[0].nbytes
    layout = KVLayout.of(model, base.dtype)
    kv = layout.needed_bytes(context_tokens)
    total = quantized + head_bytes + norms + embed_row + kv
    return {"layers": quantized, "head": head_bytes, "kv": kv, "other": norms + embed_row, "total": total}


def matvec_bandwidth(base: Any, repeats: int = 20) -> tuple[float, str]:
    """Bytes per second of a matrix-vector product at the head's precision over the head, on every thread (for the
    int8 head: the kernel it serves with, the faster of the two on this machine: lm_head.Int8Head.matmul)."""
    import torch

    head = base.model.get_output_embeddings()
    if hasattr(head, "int8_bytes"):
        # the kernel's call alone (Int8Head.matvec), not `product`'s input scaling and output multiply around it:
        # the served step does those in C++ (base/vocab_native.py), and they are not memory reads
        x = torch.randn(1, head.weight.shape[1], dtype=torch.bfloat16)
        if head.matmul == "dynamic":
            x = torch.cat([head._pin, x.float() / x.float().abs().max()])

        def run() -> Any:
            return head.matvec(x)

        kernel = {"weight_only": "weight-only (_weight_int8pack_mm)", "dynamic": "int8 x int8 (linear_dynamic)"}
        nbytes, what = head.int8_bytes, f"int8 matvec, {kernel[head.matmul]}"
    else:
        w = head.weight.detach()
        x = torch.randn(w.shape[1], dtype=w.dtype)

        def run() -> Any:
            return torch.mv(w, x)

        nbytes, what = w.nbytes, f"{str(w.dtype).removeprefix('torch.')} torch.mv"
    with torch.no_grad():
        seconds, threads = _fastest(run, repeats)
    return nbytes / seconds, f"{what} over the {nbytes / 1e6:.0f} MB head, {threads} threads"


def _fastest(run: Any, repeats: int, warm: int = 3) -> tuple[float, int]:
    """The fastest of `repeats` calls of `run` on every thread, after `warm` untimed ones; seconds and threads."""
    import os

    import torch

    before = torch.get_num_threads()
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    try:
        for _ in range(warm):
            run()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(before)
    return min(times), threads


def read_bandwidth(nbytes: int = 400_000_000, repeats: int = 10) -> float:
    """Bytes per second of a plain read (an int32 max over `nbytes`, every thread): the memory's own speed, beside
    the matvec's. Where the matvec is slower, its kernel is bound by arithmetic, not memory (reported, not used)."""
    import torch

    x = torch.ones(nbytes // 4, dtype=torch.int32)
    return nbytes / _fastest(x.max, repeats, warm=1)[0]


def decode_limit(base_dir: str, context_tokens: int, base: Any = None) -> dict:
    """The one-row decoding limit of `base_dir` (loaded here unless `base` is given) at `context_tokens`."""
    if base is None:
        from toolkit.base.loader import load_base

        base = load_base(base_dir, device="cpu")
    parts = step_bytes(base, context_tokens)
    bandwidth, measured = matvec_bandwidth(base)
    read = read_bandwidth()
    seconds = parts["total"] / bandwidth
    return {
        "read_gb_s": read / 1e9,
        "read_limit_tokens_per_s": read / parts["total"],
        "bytes_per_step": parts["total"],
        "bytes": parts,
        "bandwidth_gb_s": bandwidth / 1e9,
        "limit_ms": seconds * 1000,
        "limit_tokens_per_s": 1 / seconds,
        "context_tokens": context_tokens,
        "head": base.head,
        "what": f"{parts['total'] / 1e6:.0f} MB per step (layers {parts['layers'] / 1e6:.0f}, head "
        f"{parts['head'] / 1e6:.0f} as {base.head}, KV {parts['kv'] / 1e6:.1f}) at {bandwidth / 1e9:.1f} GB/s "
        f"({measured}; a plain read streams {read / 1e9:.1f} GB/s, a limit of {read / parts['total']:.1f} tokens/s)",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default=None, help="base folder (default: the real 270M base, cached)")
    ap.add_argument("--context", type=int, default=128, help="tokens the row holds")
    args = ap.parse_args()
    if args.base is None:
        from toolkit.base import real_weights

        args.base = str(real_weights.cached_base())
    print(json.dumps(decode_limit(args.base, args.context), indent=2))


if __name__ == "__main__":
    main()
