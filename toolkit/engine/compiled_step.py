"""One row's decoding layers with inductor's fused kernels between the int4 matmuls: what `toolkit serve`'s engine
process runs for a lone stream on a CPU (Engine.compile_step).

Why: past the LM head and the int4 matmuls, the 270M's one-row lean step spent ~3 ms in ~4,600 small aten calls
(each RMS norm ~8 of them, rotary, residual adds, casts), each a Python call and a dispatch. Compiled, the float math
between two int4 calls is a fused C++ loop or two. Measured on an AMD EPYC (2 cores), the 270M from the main thread:
one layer's post-attention plus the next one's pre-attention 93 us compiled against 165 us eager, ~84 of them its
four int4 calls; the whole step 8.4-8.7 ms against 10.0-10.7 (docs/BENCHMARKS.md).

How: the step splits at its attention calls into segments: the first layer's pre-attention (norm, joined q/k/v, q/k norm
and rotation), then per next layer the previous one's post-attention (o, norm, residual, MLP) with this one's
pre-attention, then the last layer's post-attention and the model's final norm. Each segment is traced (make_fx) with
its weights as inputs, so one compiled graph serves every middle layer, and compiled by
`torch._inductor.standalone_compile`: no Dynamo at run time, hence no guard check per call (torch.compile of the whole
step paid ~0.9 ms a step in guards and input handling). Attention between the segments is the lean step's own
(`LeanDecoder.kernel_query`, else `_one_query_each`, over the row's stored keys and values, any length, sliding or not),
so the segments have static shapes and never recompile. One base row's prompt chunk (`chunk`) takes the same three
segments traced again from a chunk of CHUNK_EXAMPLE tokens with the count symbolic: one graph each serves every chunk
length (the 270M's 16-token prompt 29 ms instead of 34 eager), each layer's attention LeanDecoder.row_attention between
them.

Numbers: the lean step's ops in its order (LeanDecoder._decoding_layers), but inductor's fused reductions sum in
another order, so a norm's last bit can differ: tested against the generic forward as the lean step is.
"""

from __future__ import annotations

import functools
from typing import Any

import torch  # imported lazily by the engine, never at toolkit import time

from toolkit.engine.threads import parallel

# inductor: bfloat16 roundings where eager rounds (its default keeps float32 between fused ops): the eager step's
# numbers, up to the order of a reduction. Its C++ kernels on one thread: one row's norms, rotary and activation are
# a few thousand elements, where a parallel region's fork and join cost more than they split (the 270M's layers
# step 3.91 against 4.05 ms, median of 12 alternating pairs, 9 faster; the int4 calls keep every thread)
INDUCTOR_OPTIONS = {"config_patches": {"emulate_precision_casts": True, "cpp.threads": 1}}
# The chunk segments are traced from a chunk of this many tokens, the count symbolic: odd and prime, so no size of the
# model's equals it and the tracer ties nothing to it (a count of 0 or 1 would be specialised)
CHUNK_EXAMPLE = 7


class NotCompiled(Exception):
    """The model's decoding layers cannot be compiled here; the text says why (the eager lean step serves)."""


class CompiledLayers:
    """`hidden = layers(decoder, hidden, rope, rows)`: LeanDecoder._decoding_layers for one row on the base (no
    adapter), then the model's final norm (LeanDecoder.forward's), built from the decoder's direct ops (its kernels
    repacked: LeanDecoder.compile_step warms them up)."""

    def __init__(self, decoder: Any, windows: tuple) -> None:
        from toolkit.base.gptq_backend import Int4Call

        direct = decoder._direct
        if not direct:
            raise NotCompiled("the lean step has no direct layers for this model (kernels or head shapes)")
        ops = [[op for op, _, _ in layer] for layer in direct]  # per layer: q/k/v, o, gate/up, down
        if not all(isinstance(op, Int4Call) for row in ops for op in row):
            raise NotCompiled("a projection's kernel is not an int4 call on fixed tensors")
        self.applies = [op.apply for op in ops[0]]
        if any(op.apply is not self.applies[j] for row in ops for j, op in enumerate(row)):
            raise NotCompiled("the layers' projections do not share one kernel and group size")
        dtype = decoder.embed.weight.dtype
        if dtype != torch.bfloat16 or decoder.embed.weight.device.type != "cpu":
            raise NotCompiled(f"the activations are {dtype} on {decoder.embed.weight.device.type}, not bfloat16 on cpu")
        self.heads, self.kv_heads, self.head_dim = decoder.heads, decoder.kv_heads, decoder.head_dim
        self.norm, self.joined_qk = decoder._norm, decoder._joined_qk  # the eager step's own ops, traced
        self.gate_up = direct[0][2][2]  # the joined gate/up's widths
        self.act = decoder._parts[0][2]
        self.sizes = [size for _, size, _ in direct[0]]  # each call's multiply-adds per row (LeanDecoder._wide)
        self.types = decoder.types
        self.attention = [(decoder._parts[i][0].scaling, w) for i, w in enumerate(windows)]  # per layer
        weights = [tuple(t for op in row for t in op.tensors) for row in ops]
        self.counts = [len(op.tensors) for op in ops[0]]  # tensors per call: q/k/v, o, gate/up, down
        q_end = self.counts[0]
        norms, qk = decoder.norms, decoder.qk_norms
        # per segment, its inputs after (hidden, a, cos, sin) / (hidden, cos, sin): norms, then int4 tensors
        self.first = (norms[0][0], qk[0], *weights[0][:q_end])
        self.middles = [
            (*norms[i][1:4], norms[i + 1][0], qk[i + 1], *weights[i][q_end:], *weights[i + 1][:q_end])
            for i in range(len(ops) - 1)
        ]
        last = len(ops) - 1
        # the last segment ends with the model's final norm: as an eager op after the layers it ran with every cache
        # cold from the weights just streamed (~140 us in a 270M step, ~15 us alone)
        self.last_inputs = (*norms[last][1:4], decoder.final_norm, *weights[last][q_end:])
        self.calls = self.chunks = 0  # compiled steps and prompt chunks taken (tests check the path was used)
        self.chunks_off: str | None = None  # why prompt chunks take the eager pass, where they do
        self._compile(decoder)

    # ------------------------------------------------------------------------------------------------ segments
    def _pre(self, hidden: Any, cos: Any, sin: Any, w_in: Any, qk_norm: Any, *qkv: Any) -> tuple:
        """A layer up to its attention: q [T, heads, 1, d], k and v [T, kv_heads, 1, d] (T: 1, or the chunk's)."""
        d, both = self.head_dim, self.heads + self.kv_heads
        out = self.applies[0](self.norm(hidden, w_in), *qkv)
        q, k = self.joined_qk(out, qk_norm, (cos, sin))
        return q, k, out[:, both * d :].view(out.shape[0], self.kv_heads, 1, d)

    def _post(self, hidden: Any, a: Any, w_attn: Any, w_pre: Any, w_post: Any, weights: tuple) -> Any:
        """A layer after its attention `a` [1, heads * d]: o, norm, residual, the MLP, norm, residual."""
        n_o, n_gu = self.counts[1], self.counts[2]
        o, gu, down = weights[:n_o], weights[n_o : n_o + n_gu], weights[n_o + n_gu :]
        hidden = hidden + self.norm(self.applies[1](a, *o), w_attn)
        gate, up = self.applies[2](self.norm(hidden, w_pre), *gu).split_with_sizes(self.gate_up, dim=-1)
        return hidden + self.norm(self.applies[3](self.act(gate) * up, *down), w_post)

    def _middle(self, hidden: Any, a: Any, cos: Any, sin: Any, *inputs: Any) -> tuple:
        w_attn, w_pre, w_post, w_in, qk_norm, *weights = inputs
        ours, nexts = tuple(weights[: -self.counts[0]]), weights[-self.counts[0] :]
        hidden = self._post(hidden, a, w_attn, w_pre, w_post, ours)
        return (hidden, *self._pre(hidden, cos, sin, w_in, qk_norm, *nexts))

    def _last(self, hidden: Any, a: Any, *inputs: Any) -> Any:
        w_attn, w_pre, w_post, w_final, *weights = inputs
        return self.norm(self._post(hidden, a, w_attn, w_pre, w_post, tuple(weights)), w_final)

    def _compile(self, decoder: Any) -> None:
        from toolkit.errors import brief

        self.pre, self.middle, self.last = self._graphs(decoder, 1)
        try:  # (the one-token step serves without them)
            self.chunk_pre, self.chunk_middle, self.chunk_last = self._graphs(decoder, CHUNK_EXAMPLE)
        except Exception as exc:  # noqa: BLE001  (the toolchain's own errors)
            self.drop_chunks(f"not compiled: {brief(exc)}")

    def drop_chunks(self, why: str) -> None:
        """Prompt chunks take the eager pass from now on (`chunks_off` says why); the one-token step stays."""
        self.chunk_pre = self.chunk_middle = self.chunk_last = None
        self.chunks_off = why

    def _graphs(self, decoder: Any, tokens: int) -> list:
        """The three segments compiled for one token (static shapes) or, from an example of `tokens` > 1, for any
        number of them (the token count symbolic: one graph each serves every prompt chunk)."""
        from torch.fx.experimental.proxy_tensor import make_fx

        _fake_kernels()
        hidden = torch.zeros(tokens, decoder.text.config.hidden_size, dtype=torch.bfloat16)
        a = torch.zeros(tokens, self.heads * self.head_dim, dtype=torch.bfloat16)
        cos, sin = decoder._rope(hidden.unsqueeze(1), torch.arange(tokens).unsqueeze(1), tokens)[self.types[0]]
        mode, shapes = ("real", "from_example_inputs") if tokens == 1 else ("symbolic", "from_graph")
        graphs = []
        with torch.no_grad():
            for fn, example in (
                (self._pre, (hidden, cos, sin, *self.first)),
                (self._middle, (hidden, a, cos, sin, *self.middles[0]) if self.middles else None),
                (self._last, (hidden, a, *self.last_inputs)),
            ):
                if example is None:
                    graphs.append(None)
                    continue
                traced = make_fx(fn, tracing_mode=mode)(*example)
                graphs.append(
                    torch._inductor.standalone_compile(
                        traced, list(example), dynamic_shapes=shapes, options=INDUCTOR_OPTIONS
                    )
                )
        return graphs

    # ------------------------------------------------------------------------------------------------ the step
    def __call__(self, decoder: Any, hidden: Any, rope: dict, rows: list) -> Any:
        def attend(q: Any, k: Any, v: Any, i: int, window: Any, scale: float) -> Any:
            a = decoder.kernel_query(q, k, v, rows[0], i)
            return a if a is not None else decoder._one_query_each(q, k, v, rows, i, window, scale).view(1, -1)

        hidden = self._through(decoder, hidden, rope, (self.pre, self.middle, self.last), attend)
        self.calls += 1
        return hidden

    def chunk(self, decoder: Any, hidden: Any, rope: dict, row: Any) -> Any:
        """`hidden = layers.chunk(decoder, hidden, rope, row)`: a base row's prompt chunk of T tokens ([T, 1,
        hidden]) through the layers, the chunk segments between each layer's attention (LeanDecoder.row_attention:
        its keys and values stored, SDPA over what the row holds): the eager `_layers` pass's ops and order, then the
        final norm over every token (a row-wise op: the last token's is what forward reads)."""

        def attend(q: Any, k: Any, v: Any, i: int, window: Any, scale: float) -> Any:
            return decoder.row_attention(q, k, v, row, i, window, scale)

        hidden = self._through(decoder, hidden, rope, (self.chunk_pre, self.chunk_middle, self.chunk_last), attend)
        self.chunks += 1
        return hidden

    def _through(self, decoder: Any, hidden: Any, rope: dict, graphs: tuple, attend: Any) -> Any:
        """hidden [T, 1, hidden] through the layers: the segments `graphs` (pre, middle, last), each layer's
        attention `attend(q, k, v, layer, window, scale)` -> [T, heads * d] between them."""
        (pre, middle, last), shape, types = graphs, hidden.shape, self.types
        hidden = hidden.view(shape[0], -1)
        wide = all(decoder._wide(shape[0], size) for size in self.sizes)
        with parallel(decoder.threads, wide):
            q, k, v = pre(hidden, *rope[types[0]], *self.first)
        for i, (scale, window) in enumerate(self.attention):
            a = attend(q, k, v, i, window, scale)
            with parallel(decoder.threads, wide):
                if i + 1 < len(self.attention):
                    hidden, q, k, v = middle(hidden, a, *rope[types[i + 1]], *self.middles[i])
                else:
                    hidden = last(hidden, a, *self.last_inputs)
        return hidden.view(shape)


@functools.cache
def _fake_kernels() -> None:
    """GPTQModel's AVX512 int4 op has no fake (shape-only) kernel, which tracing needs: [rows, out] in x's dtype."""
    name = "gptqmodel_int4_qzero_group_scaled_cpu::gemm_int4_qzero_group_scaled_cpu_forward"
    try:

        @torch.library.register_fake(name)
        def _(x: Any, qweight: Any, qzeros: Any, scales: Any, group: int, bias: Any = None) -> Any:
            return x.new_empty(x.shape[0], qzeros.shape[1])

    except (RuntimeError, ValueError, AttributeError):  # registered already (GPTQModel's own), or no such op
        pass
