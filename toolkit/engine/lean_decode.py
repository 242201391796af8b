"""Gemma 3 passes for decoding steps and text-only prompt chunks, without transformers' generic forward around them.

Why by hand: on a CPU a decoding step of a small model is mostly per-call Python, not arithmetic. transformers'
forward builds causal and sliding masks, position embeddings and a cache object for every step, and peft installs
and removes a hook on every LoRA layer per forward to pass `adapter_names`; on the tiny base that was most of the
step (docs/BENCHMARKS.md, "Lean decoding step": 2.1 ms here vs 7.1 ms generic for one row). Here the same modules
run the same arithmetic in the same order (the model's own norms, rotary embedding, projections, MLP, LM head and
SDPA), but attention runs per row over that row's own keys and values (kv_cache.RowKV), so no row pads another:
a decoding query sees every token its row holds (sliding layers hold the last window - 1, plus the new one), a
prompt chunk gets its causal (and sliding-window) mask or, in a global layer of a single-threaded pass, two
unmasked parts (`_past_then_chunk`), a fresh prompt is plainly causal. Rows are grouped by adapter, so each
adapter's LoRA runs once over its contiguous slice of the pass's tokens: the sums of peft's per-row path
(`_mixed_batch_forward`, which builds index lists, gathers and scatters in every LoRA layer of every pass) without
its per-call work; LoRA variants (e.g. DoRA) keep peft's path.

What stays with the model's own forward over `kv_cache.RaggedCache`: prompts with images (the vision tower and the
bidirectional image blocks), prompts that want every position's logits (prompt_logprobs), and fresh prompts
prefilled together. `LeanDecoder.supports(model)` says whether this model's shape is covered (Gemma 3 text layers,
causal, no attention logit softcapping); otherwise the engine keeps the generic forward.
tests/engine/test_lean_decode.py checks logits and stored keys/values against the generic forward.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

import torch  # imported lazily by the engine, never at toolkit import time
import torch.nn.functional as F

from toolkit.engine.kv_cache import SLIDING_SLACK
from toolkit.engine.threads import PARALLEL_ELEMENTS, parallel

BASE_ADAPTER = "__base__"
PARALLEL_KEYS = 4096  # a row's attention over at least this many keys x queries runs on every thread (threads.py)
# a projection of at least this many multiply-adds (rows x in x out) runs on every thread: measured on the 270M,
# one int4 call for 16 rows takes ~370 us on one thread; the tiny base's largest (16 x 256 x 768) ~30 us
PARALLEL_MATMUL = 1 << 23
# ... or, on a process's main thread (Engine.run_here), where OpenMP wakes its team cheaply (threads.py), from this
# many per row: measured on the 270M's one-row step, its 72 int4 calls (0.66-2.6M multiply-adds a row) 2.0 ms on
# two threads against 2.7 on one. Not by the pass's total: the tiny base's calls (0.07-0.39M a row) on both cores
# at 16 rows took `toolkit serve` from 8.3-8.7x transformers serve to 6.0-6.8x (the OpenMP worker spinning between
# calls takes the core the server's process answers on)
PARALLEL_MATMUL_MAIN = 1 << 19
# In a pass that is otherwise single-threaded, attention goes to every thread only from this many keys x queries:
# the parallel region leaves GNU OpenMP's worker spinning for ~10 ms, beside which the engine thread's following
# single-threaded ops ran 25-45% slower (the tiny base: a 15-row step 12.2 ms alone, 15.2-17.6 ms right after a pass
# whose 16-token prompt chunk attended to 25k keys on two threads; 12.0 ms when it ran on one, 9.6 ms instead of
# 4.8). Passes that use every thread anyway (large projections, a 262k-row LM head) keep PARALLEL_KEYS.
PARALLEL_KEYS_LONE = 1 << 20
# A chunk's attention over a long past (global layers) in a pass that is otherwise single-threaded: from this many
# keys x max(queries, 4), with more than one thread, its past is split in two, half on a helper thread
# (_past_then_chunk). Measured on the tiny base
# (one thread): the hand-off costs ~0.25 ms; 16 queries over 4k keys 1.18 ms alone, 0.97 split; one query over 30k
# keys 1.88 and 1.42 (one query's cost is mostly reading the keys: it counts as 4)
HELPER_KEYS = 1 << 16
# One decoding query over at least this many keys of a global layer, in a single-threaded pass, also goes through
# _past_then_chunk (its GQA group folded into one head: 1.9 ms instead of SDPA's 2.8 over 30k keys on the tiny
# base; in a pass on every thread SDPA's own split over heads serves it)
LONG_ROW_KEYS = 8192
# A mixed pass's batched LoRA pads every adapter's group of tokens to the longest while that stays within this many
# times the pass's tokens (_groups): padded rows are rank-r multiply-adds, where the alternative, a group's extra
# tokens through GEMMs of their own, costs ops, and on a small model ops are what a pass is made of (tiny base, 15
# decoding rows and a fresh 26-token prompt on 4 adapters: +3.3 ms over one adapter's pass with the extra tokens in
# their own GEMMs, +2.8 padded; 14 rows and two prompts on two adapters: +4.9 and +2.0)
PAD_LIMIT = 3
# Adapter weights each LoRA layer keeps stacked (_stacked), counted per set with repeats: a pass's set changes as
# rows of other adapters join and leave, and restacking every layer's A and B costs ops on every pass that flips
# between sets. Each set holds a copy of its adapters' weights (the 27B at rank 16: ~230 MB per adapter), so the
# latest sets are kept up to this many copies (at most ~3.7 GB on the 27B however many adapters a server mixes;
# 4 sets of 4 adapters), and a pass's own set always.
STACKED_COPIES = 16
COMPILED_TOLERANCE = 0.02  # compile_step's check: the largest logit difference over the largest logit
ROPE_TABLE = 4096  # positions whose rotary cos / sin are kept per layer type (_rope): the 270M's, 4 MB per type
# SDPA's own CPU kernel with its log-sum-exp (private; without it chunks keep SDPA with the boolean mask)
FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _text_model(model: Any) -> Any:
    """The Gemma3TextModel inside `model` (a Gemma3ForConditionalGeneration, possibly wrapped by peft)."""
    from transformers.models.gemma3.modeling_gemma3 import Gemma3TextModel

    for module in model.modules():
        if isinstance(module, Gemma3TextModel):
            return module
    return None


class LeanDecoder:
    """Decoding steps on one model: `logits = decoder(tokens, rows, adapters)`; rows are kv_cache.RowKV.

    Called on one intra-op thread (the engine's default, threads.py); the LM head and long rows' attention go to
    `threads` threads (a long chunk's, in an otherwise single-threaded pass, to this thread and one helper)."""

    def __init__(self, model: Any, threads: int = 1) -> None:
        from transformers.models.gemma3.modeling_gemma3 import apply_rotary_pos_emb

        self.model, self.threads = model, threads
        self.text = _text_model(model)
        self.head = model.get_output_embeddings()
        self.embed = self.text.embed_tokens
        config = self.text.config
        self.config = config
        self.types = list(config.layer_types)
        self._rope_types = sorted(set(self.types))
        self._rope_table: dict | None = None  # _rope's, made at the first pass that fits it
        # per layer: its attention and MLP modules and the MLP's activation as a plain function where it is
        # transformers' GELUTanh (its module call cost ~4 us a layer). peft replaces only the projections inside.
        self._parts = [(layer.self_attn, layer.mlp, _activation(layer.mlp.act_fn)) for layer in self.text.layers]
        self.softcap = getattr(config, "final_logit_softcapping", None)
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        self.rope = apply_rotary_pos_emb
        top = getattr(model, "config", None)
        image_id = getattr(top, "image_token_id", None)
        # Gemma3Model swaps an out-of-vocabulary image token for 0 before the embedding; a sampled one gets the same
        self.image_id = image_id if image_id is not None and image_id >= self.embed.num_embeddings else None
        self._slices: list[tuple[str, int, int]] = []  # the current pass's tokens per adapter: (name, first, end)
        # Gemma's RMSNorm scales by (1 + weight) in float32; F.rms_norm with that weight gives the module's output
        # bit for bit (checked in tests) in one op instead of six. The norms are frozen: computed once.
        self.eps = config.rms_norm_eps
        self.norms = [
            tuple(
                (1.0 + m.weight.float()).detach()
                for m in (
                    layer.input_layernorm,
                    layer.post_attention_layernorm,
                    layer.pre_feedforward_layernorm,
                    layer.post_feedforward_layernorm,
                    layer.self_attn.q_norm,
                    layer.self_attn.k_norm,
                )
            )
            for layer in self.text.layers
        ]
        self.final_norm = (1.0 + self.text.norm.weight.float()).detach()
        # per layer, q's and k's norm weights per head [heads + kv_heads, 1, head_dim] (the joined q/k norm)
        self.qk_norms = [
            torch.cat([w_q.expand(self.heads, -1), w_k.expand(self.kv_heads, -1)]).unsqueeze(1)
            for *_, w_q, w_k in self.norms
        ]
        mlp = self.text.layers[0].mlp
        self._widest = max(  # the largest projection's in x out (PARALLEL_MATMUL's gate, per token)
            m.in_features * m.out_features for m in (_base(mlp.gate_proj), _base(mlp.down_proj))
        )
        self._head_parallel = self.head.weight.numel() >= PARALLEL_ELEMENTS  # e.g. the 262k-row head
        self._mv: bool | None = None  # _mv_faster's answer, once timed
        self._short_steps = False  # whether the current pass is decoding rows only, none long (_one_query_each)
        self._threaded = False  # whether the current pass runs other ops on every thread (PARALLEL_KEYS_LONE)
        self._executor = None  # _helper's, made on first use
        # per LoRA layer: for its latest sets of adapters (STACKED_COPIES), their weights stacked (_stacked)
        self._stacks: dict[int, dict[tuple[str, ...], tuple]] = {}
        self._grouping: dict[tuple, Any] = {}  # per pass: how its adapters' tokens go into batched GEMMs (_groups)
        self._fused: dict[int, Any] = {}  # per group of projections on one input: its joined op (_linears) or None
        self._direct: list | bool | None = None  # _decoding_ops' answer once every layer is repacked
        self.row_gate = None  # PARALLEL_MATMUL_MAIN where the engine runs on the main thread (_wide)
        self.compiled = None  # compiled_step.CompiledLayers once compile_step made them: one base row's steps
        self._kernel: Any = None  # kernel_query's one_query.OneQuery, or False where it does not serve; None: not yet
        self.attention_kind = "not yet known"  # what a decoding query's attention runs as (kernel_query)

    def _helper(self) -> Any:
        """A one-thread executor (pinned to one intra-op thread) for half of a long chunk's attention
        (_past_then_chunk)."""
        if self._executor is None:
            from concurrent.futures import ThreadPoolExecutor

            self._executor = ThreadPoolExecutor(1, "lean-attention", initializer=_one_thread)
        return self._executor

    def close(self) -> None:
        """End the helper thread, if one was started (the engine's close)."""
        if self._executor is not None:
            self._executor.shutdown(wait=False)
            self._executor = None

    @staticmethod
    def supports(model: Any) -> bool:
        text = _text_model(model)
        if text is None or model.get_output_embeddings() is None:
            return False
        config = text.config
        return (
            getattr(config, "attn_logit_softcapping", None) is None
            and not getattr(config, "use_bidirectional_attention", False)
            and bool(getattr(config, "layer_types", None))
        )

    # ------------------------------------------------------------------------------------------------ the step
    @torch.no_grad()
    def __call__(self, tokens: list[int], rows: list[Any], adapters: list[str] | None) -> Any:
        """Logits [rows, vocab] of the next token after each row's `tokens[i]`; stores each row's new keys and
        values (and counts the token as seen). `adapters`: each row's peft adapter name (None: no peft model)."""
        return self.forward([[t] for t in tokens], rows, adapters)

    @torch.no_grad()
    def forward(self, tokens: list[list[int]], rows: list[Any], adapters: list[str] | None) -> Any:
        """The same for any number of new tokens per row, in one pass: decoding rows' sampled tokens beside
        prompt chunks of any length (the engine's chunked prefill rides on its decoding steps). Logits
        [rows, vocab] after each row's last new token.

        Tokens are laid out token-major ([tokens, 1, hidden]): every projection runs once over all of them, each
        adapter's LoRA once over its rows' tokens; only attention goes row by row."""
        n = len(rows)
        names = None if adapters is None or all(a == BASE_ADAPTER for a in adapters) else adapters
        order = None
        if names is not None and any(a != names[0] for a in names):  # mixed: each adapter's rows side by side
            order = sorted(range(n), key=names.__getitem__)  # (stable)
            tokens, rows, names = [tokens[i] for i in order], [rows[i] for i in order], [names[i] for i in order]
        sizes = [len(ts) for ts in tokens]
        self._slices = _slices(names, sizes) if names is not None else []
        self._grouping.clear()
        flat = [t for ts in tokens for t in ts]
        if self.image_id is not None:
            flat = [0 if t == self.image_id else t for t in flat]
        total = len(flat)
        ids = torch.tensor(flat).unsqueeze(1)  # [T, 1]
        if total == n:
            positions = torch.tensor([r.seen for r in rows]).unsqueeze(1)
        else:  # each row's tokens in its own position frame
            positions = torch.cat([torch.arange(r.seen, r.seen + m) for r, m in zip(rows, sizes, strict=True)])
            positions = positions.unsqueeze(1)
        if names is not None and total != n:
            names = [a for a, m in zip(names, sizes, strict=True) for _ in range(m)]  # one per token (peft's path)
        # Every op on all threads only when the pass's activations (tokens x hidden) are big; below that only the ops
        # big enough on their own go parallel (projections: PARALLEL_MATMUL, attention: PARALLEL_KEYS, the head).
        # Not a token count: prompt chunks ride on decoding steps, and a step of small ops (norms, rotary, one row's
        # attention) on two threads pays the ~80 us wake per op (threads.py): measured on the tiny base, two 26-token
        # prompts beside 15 decoding rows cost 24 ms over an 11 ms step when the pass ran on two threads.
        # decoding rows only, all short: _one_query_each serves every layer's attention
        self._short_steps = total == n and max(r.seen for r in rows) < LONG_ROW_KEYS - 1
        everywhere = total * self.text.config.hidden_size >= PARALLEL_ELEMENTS
        self._threaded = everywhere or self._head_parallel or self._wide(total, self._widest)
        direct = self._decoding_ops(names) if self._short_steps else None
        with parallel(self.threads, everywhere):
            hidden = self.embed(ids)  # [T, 1, hidden], scaled as the model does
            rope = self._rope(hidden, positions, max(r.seen + m for r, m in zip(rows, sizes, strict=True)))
            # one base row's decoding step, or its prompt chunk (a pass on every thread stays eager: the compiled
            # segments' own kernels run on one)
            step = direct is not None and direct[1] is None
            chunk = direct is None and names is None and total > 1 and not everywhere
            compiled = self.compiled if n == 1 else None
            normed = compiled is not None and (step or (chunk and compiled.chunks_off is None))
            if normed:  # (the compiled segments end with the final norm)
                try:
                    if step:
                        hidden = compiled(self, hidden, rope, rows)
                    else:
                        hidden = compiled.chunk(self, hidden, rope, rows[0])
                except Exception as exc:
                    # (not retried: the layers before the failure stored their keys and values) the pass's rows
                    # get the error; later passes of its kind run eager
                    if step:
                        self.compiled = None
                    else:
                        compiled.drop_chunks(f"failed while serving: {type(exc).__name__}")
                    raise
            elif direct is not None:
                hidden = self._decoding_layers(hidden, rope, rows, *direct)
            else:
                hidden = self._layers(hidden, rope, rows, names, sizes)
        for row, m in zip(rows, sizes, strict=True):
            row.seen += m
        hidden = hidden[:, 0] if total == n else hidden[torch.tensor(sizes).cumsum(0) - 1, 0]  # rows' last tokens
        if not normed:
            hidden = self._norm(hidden, self.final_norm)
        with parallel(self.threads, self._head_parallel):
            if n == 1 and self._plain_head(hidden) and self._mv_faster(hidden):
                # one row: torch.mv is CPU's matrix-vector kernel, the same logits bit for bit as F.linear's
                # (tested); which is faster depends on the CPU (_mv_faster)
                logits = torch.mv(self.head.weight, hidden[0]).unsqueeze(0)
            else:
                logits = self.head(hidden)
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        if order is not None:  # back to the caller's row order
            back = torch.empty(n, dtype=torch.long)
            back[torch.tensor(order)] = torch.arange(n)
            logits = logits[back]
        return logits

    def compile_step(self, layout: Any) -> float:
        """Compile one base row's decoding layers (compiled_step.py), after a warm-up pass over a scratch row (the
        kernels' first calls repack them; the direct ops come after). Seconds it took; NotCompiled where it cannot."""
        import time

        from toolkit.engine.compiled_step import CompiledLayers, NotCompiled
        from toolkit.engine.kv_cache import RowKV

        start = time.perf_counter()
        row = RowKV(layout)
        self.forward([[2, 2, 2]], [row], None)
        self([2], [row], None)  # (builds the direct ops, or finds there are none: CompiledLayers then refuses)
        compiled = CompiledLayers(self, layout.windows)
        # Checked once before it serves: a step and a prompt chunk of each on copies of the scratch row, compiled and
        # eager, must give the same greedy token and logits within the tolerance the tests hold the lean step to.
        # Both through the exact head (the int8 head's, lm_head.py): what is checked is the layers, and an int8 x int8
        # head rounds its activations, so a last-bit difference in them can move a tail logit by a whole step
        twin = copy.deepcopy(row)
        head, self.head = self.head, getattr(self.head, "exact", self.head)
        try:
            if off_by := self._compiled_off(compiled, "step", [3], row, twin):
                raise NotCompiled(f"the compiled step's logits {off_by}")
            if compiled.chunks_off is None:  # a chunk that disagrees or fails: the step serves, chunks go eager
                try:
                    if off_by := self._compiled_off(compiled, "prompt chunk", [4, 5, 6, 7, 8], row, twin):
                        compiled.drop_chunks(f"its logits {off_by}")
                except Exception as exc:  # noqa: BLE001  (whatever the chunk graphs raise)
                    compiled.drop_chunks(f"failed its check: {type(exc).__name__}")
        finally:
            self.head = head
        self.compiled = compiled
        return time.perf_counter() - start

    def _compiled_off(self, compiled: Any, what: str, tokens: list[int], row: Any, twin: Any) -> str | None:
        """How `compiled`'s pass of `tokens` over `row` is off the eager pass over its copy `twin`, or None where
        they agree (compile_step's check)."""
        self.compiled = compiled
        try:
            got = self.forward([tokens], [row], None)
        finally:
            self.compiled = None
        want = self.forward([tokens], [twin], None)
        off = ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()
        if off < COMPILED_TOLERANCE and torch.equal(got.argmax(-1), want.argmax(-1)):
            return None
        return f"differ from the eager {what}'s by {off:.3g} (relative)"

    def _mv_faster(self, hidden: Any) -> bool:
        """Whether torch.mv beats F.linear for one row of the exact head on this machine, timed once (twice each,
        the best of two): on the 270M's 262k x 640 bfloat16 head, 15 against 22 ms on an Intel Xeon (AVX512-BF16,
        2 cores) but 24.9 against 11.3 on an AMD EPYC (the same). Their logits are the same bits."""
        if self._mv is None:
            import time

            def best(run: Any) -> float:
                times = []
                for _ in range(2):
                    start = time.perf_counter()
                    run()
                    times.append(time.perf_counter() - start)
                return min(times)

            weight = self.head.weight
            self._mv = best(lambda: torch.mv(weight, hidden[0])) < best(lambda: F.linear(hidden, weight))
        return self._mv

    def _plain_head(self, hidden: Any) -> bool:
        """The LM head is a plain bias-free nn.Linear in the activations' dtype (not loader.py's float32 tiles)."""
        head = self.head
        return (
            type(head) is torch.nn.Linear
            and "forward" not in vars(head)
            and head.bias is None
            and head.weight.dtype == hidden.dtype
            and hidden.device.type == "cpu"
        )

    def _rope(self, hidden: Any, positions: Any, end: int) -> dict:
        """Each layer type's rotary cos / sin [T, 1, d] at `positions` (all below `end`): rows of a table kept per
        type for the first ROPE_TABLE positions (the rotary module's own output for them, computed once: the same
        values, two index ops instead of its ~10 per step and type), else the module itself."""
        if end > ROPE_TABLE:
            return {t: self.text.rotary_emb(hidden, positions, t) for t in self._rope_types}
        if self._rope_table is None:
            everywhere = torch.arange(ROPE_TABLE).unsqueeze(0)
            self._rope_table = {t: self.text.rotary_emb(hidden[:1], everywhere, t) for t in self._rope_types}
        at = positions.view(-1)
        return {t: (c[0].index_select(0, at).unsqueeze(1), s[0].index_select(0, at).unsqueeze(1))
                for t, (c, s) in self._rope_table.items()}  # fmt: skip

    def _layers(self, hidden: Any, rope: dict, rows: list, names: list | None, sizes: list[int]) -> Any:
        for i, (attn, mlp, act) in enumerate(self._parts):
            w_in, w_attn, w_pre, w_post, w_q, w_k = self.norms[i]
            x = self._norm(hidden, w_in)
            x = self._attention(attn, i, x, rope[self.types[i]], rows, names, sizes, (w_q, w_k))
            hidden = hidden + self._norm(x, w_attn)
            x = self._norm(hidden, w_pre)
            gate, up = self._linears((mlp.gate_proj, mlp.up_proj), x, names)
            x = self._linear(mlp.down_proj, act(gate) * up, names)
            hidden = hidden + self._norm(x, w_post)
        return hidden

    def _decoding_ops(self, names: list[str] | None) -> tuple[list, list | None] | None:
        """For `_decoding_layers`: per layer its four kernel calls (q/k/v joined, o, gate/up joined, down), each
        with its multiply-adds per row (`_wide` decides its threads) and its parts' widths; and per
        layer the LoRA modules of the pass's one adapter (None: no adapter). None where the general path serves
        the pass: before the layers are repacked, a kernel without direct or joined ops, GQA-less shapes, rows on
        more than one adapter, a LoRA variant (e.g. DoRA)."""
        if self._direct is None:
            layers = []
            for attn, mlp, _ in self._parts:
                ops = []
                for parent, attrs in _projection_groups(attn, mlp):
                    group = tuple(getattr(parent, a) for a in attrs)
                    if not all(hasattr(_base(m), "_lean_checked") for m in group):
                        return None  # not yet repacked (the first passes do that): ask again next pass
                    if len(group) > 1:
                        fused = self._joined_op(group)
                        op, size = (fused[0], fused[2]) if fused is not None else (None, 1)
                    else:
                        b = _base(group[0])
                        op, size = getattr(b, "lean_op", None), b.in_features * b.out_features
                    ops.append((op, size, [_base(m).out_features for m in group]))
                layers.append(tuple(ops))
            usable = all(op is not None for ops in layers for op, _, _ in ops) and self.heads != self.kv_heads
            self._direct = layers if usable else False
        if self._direct is False:
            return None
        if names is None:
            return self._direct, None
        if len(self._slices) != 1:
            return None
        # The LoRA modules are looked up per pass, not kept: serve's runtime adapters wrap projections between
        # passes (peft replaces a layer's module the first time an adapter targets it). Read through `_modules`,
        # ~10x cheaper than nn.Module's attribute lookup (126 modules on the 270M).
        name, loras = self._slices[0][0], []
        for attn, mlp, _ in self._parts:
            own = []
            for parent, attrs in _projection_groups(attn, mlp):
                with_it = []
                for j, attr in enumerate(attrs):
                    module = parent._modules[attr]
                    lora_a = module._modules.get("lora_A")
                    if lora_a is not None and name in lora_a._modules:
                        if name in module.lora_variant:
                            return None
                        with_it.append((j, module))
                own.append(with_it)
            loras.append(own)
        return self._direct, loras

    def _decoding_layers(self, hidden: Any, rope: dict, rows: list, ops: list, loras: list | None) -> Any:
        """`_layers` for a pass of decoding rows only, none long, on one adapter or none: the same ops in the same
        order (the same logits bit for bit, tested), with each layer's kernel calls and LoRA modules looked up once
        (`_decoding_ops`) instead of per call: on the 270M's one-row step the general path spent ~150 us a layer in
        Python around ~125 us of int4 kernels."""
        n, d, both = len(rows), self.head_dim, self.heads + self.kv_heads
        x_shape, wide = hidden.shape, self._wide
        hidden = hidden.view(n, -1)
        for i, (
            (qkv, qkv_size, qkv_widths),
            (o, o_size, _),
            (gu, gu_size, gu_widths),
            (down, down_size, _),
        ) in enumerate(ops):
            w_in, w_attn, w_pre, w_post, _, _ = self.norms[i]
            attn, _, act = self._parts[i]
            lora = loras[i] if loras is not None else None
            x = self._norm(hidden, w_in)
            with parallel(self.threads, wide(n, qkv_size)):
                out = qkv(x)
            if lora and lora[0]:
                self._lora_parts(lora[0], out, qkv_widths, x)
            q, k = self._joined_qk(out, self.qk_norms[i], rope[self.types[i]])
            v = out[:, both * d :].view(n, self.kv_heads, 1, d)
            window = rows[0].layout.windows[i]
            a = self._one_query_each(q, k, v, rows, i, window, attn.scaling).view(n, -1)
            with parallel(self.threads, wide(n, o_size)):
                x = o(a)
            if lora and lora[1]:
                self._add_lora(lora[1][0][1], self._slices, x, a)
            hidden = hidden + self._norm(x, w_attn)
            x = self._norm(hidden, w_pre)
            with parallel(self.threads, wide(n, gu_size)):
                out = gu(x)
            if lora and lora[2]:
                self._lora_parts(lora[2], out, gu_widths, x)
            gate, up = out.split_with_sizes(gu_widths, dim=-1)
            y = act(gate) * up
            with parallel(self.threads, wide(n, down_size)):
                x = down(y)
            if lora and lora[3]:
                self._add_lora(lora[3][0][1], self._slices, x, y)
            hidden = hidden + self._norm(x, w_post)
        return hidden.view(x_shape)

    def _joined_qk(self, out: Any, qk_norm: Any, rope: tuple) -> tuple[Any, Any]:
        """q and k [T, heads, 1, d] / [T, kv_heads, 1, d] from a joined q/k/v output [T, width]: normed (per-head
        weights `qk_norm`, a layer's qk_norms) and rotated side by side, one norm and one rotation for both."""
        d, both = self.head_dim, self.heads + self.kv_heads
        qk = out[:, : both * d].view(out.shape[0], both, 1, d)
        normed = F.rms_norm(qk.float(), (d,), None, self.eps) * qk_norm
        qk = _rotate(normed.to(qk.dtype), *rope)
        return qk[:, : self.heads], qk[:, self.heads :]

    @property
    def splits_rows(self) -> bool:
        """Whether one row's projections are big enough to go to every thread on a main thread (row_gate): where
        none is (e.g. the tiny base), an engine gains nothing there (Engine.prefers_main_thread)."""
        return self._widest >= PARALLEL_MATMUL_MAIN

    def _wide(self, rows: int, size: int) -> bool:
        """Whether a kernel call of `size` multiply-adds per row over `rows` rows goes to every thread."""
        return rows * size >= PARALLEL_MATMUL or (self.row_gate is not None and size >= self.row_gate)

    def _lora_parts(self, with_lora: list, out: Any, widths: list[int], x: Any) -> None:
        """Each projection's LoRA into its own part of a joined op's output (`_linears`' rule)."""
        parts = out.split_with_sizes(widths, dim=-1)
        for j, module in with_lora:
            self._add_lora(module, self._slices, parts[j], x)

    def _norm(self, x: Any, weight: Any) -> Any:
        """Gemma3RMSNorm: float32 math, (1 + weight) scale, back to the input's dtype."""
        return F.rms_norm(x.float(), (x.shape[-1],), weight, self.eps).to(x.dtype)

    def _linear(self, module: Any, x: Any, names: list[str] | None) -> Any:
        base = _base(module)
        wide = self._wide(x.shape[0] * x.shape[1], base.in_features * base.out_features)
        slices = [] if names is None or base is module else [s for s in self._slices if s[0] in module.lora_A]
        if any(name in module.lora_variant for name, _, _ in slices):
            with parallel(self.threads, wide):
                return module(x, adapter_names=names)  # a LoRA variant (e.g. DoRA): peft's per-row split
        # Only the base op goes to every thread (e.g. 16 rows through the 270M's 640 x 1024): the LoRA ops (rank-r
        # matmuls) are small, and each op run in a parallel region pays the ~80 us wake (threads.py). Measured on
        # the tiny base, 15 decoding rows and 2 fresh 26-token prompts on one adapter: 33.6 ms a pass with them
        # inside, 26.8 ms outside.
        with parallel(self.threads, wide):
            result = self._plain(base, x)
        if slices:  # (none: no adapter in this pass, or its adapters leave this layer alone)
            self._add_lora(module, slices, result, x)
        return result

    def _joined_op(self, modules: tuple) -> tuple | None:
        """gptq_backend.fused_op for these projections' base layers, with their widths and in x out (cached per
        group, once the layers are repacked: the first call of each does that), or None: call them one by one."""
        key = id(modules[0])
        if key not in self._fused:
            bases = [_base(m) for m in modules]
            if not all(hasattr(b, "_lean_checked") for b in bases):  # not yet repacked: their first call does that
                return None
            from toolkit.base.gptq_backend import fused_op

            op = fused_op(bases)
            widths = [b.out_features for b in bases]
            self._fused[key] = None if op is None else (op, widths, bases[0].in_features * sum(widths))
        return self._fused[key]

    def _linears(self, modules: tuple, x: Any, names: list[str] | None, joined: bool = False) -> Any:
        """Projections that read the same input (q/k/v, gate/up): their base layers in one kernel call where
        gptq_backend.fused_op joins them (the same outputs, fewer ops per step), then each one's LoRA into its own
        part of the output; else one by one (_linear). With `joined`: (the parts, the whole output or None)."""
        fused = self._joined_op(modules)
        slices = [
            [] if names is None or _base(m) is m else [s for s in self._slices if s[0] in m.lora_A] for m in modules
        ]
        if fused is None or any(n in m.lora_variant for m, s in zip(modules, slices, strict=True) for n, _, _ in s):
            apart = [self._linear(m, x, names) for m in modules]
            return (apart, None) if joined else apart
        op, widths, size = fused
        wide = self._wide(x.shape[0] * x.shape[1], size)
        with parallel(self.threads, wide):
            out = op(x.reshape(-1, x.shape[-1])).view(*x.shape[:-1], -1)
        parts = out.split_with_sizes(widths, dim=-1)  # (Tensor.split's Python wrapper costs ~2 us a call)
        for module, part, own in zip(modules, parts, slices, strict=True):
            if own:
                self._add_lora(module, own, part, x)
        return (list(parts), out) if joined else list(parts)

    def _add_lora(self, module: Any, slices: list[tuple[str, int, int]], result: Any, x: Any) -> None:
        """Add each slice's adapter's LoRA into its tokens' rows of `result` in place: scaling x
        lora_B(lora_A(x)), the sum peft's `_mixed_batch_forward` adds without its per-row split (index lists,
        gathers and scatters, ~7 ops per adapter in every LoRA layer of every pass).

        Several adapters go through two batched GEMMs over their stacked weights, one adapter's group of tokens
        per batch entry (_stacked; _groups pads the groups or leaves a long group's extra tokens over). One adapter,
        and tokens left over, take two GEMMs per adapter over its own slice, the scaling (addmm's alpha) and, in a
        float32 model, the add (its beta) folded into the second; a bfloat16 model's sums gather in one float32
        buffer, converted and added once. Measured on the tiny base: docs/BENCHMARKS.md "Serving load"."""
        flat = x.reshape(-1, x.shape[-1])
        target = result.view(flat.shape[0], -1)
        stack = self._stacked(module, tuple(name for name, _, _ in slices)) if len(slices) > 1 else None
        if stack is not None:
            a_all, b_all = stack
            rows, valid, dest, slices = self._groups(tuple(slices), flat.shape[0], flat.device)
            xs = flat.to(a_all.dtype)
            xs = (xs if rows is None else xs.index_select(0, rows)).view(len(a_all), -1, xs.shape[1])
            y = torch.bmm(torch.bmm(xs, a_all), b_all).view(-1, target.shape[1])
            y = (y if valid is None else y.index_select(0, valid)).to(target.dtype)
            if isinstance(dest, slice):
                target[dest] += y
            else:
                target.index_add_(0, dest, y)
            if not slices:
                return
        lora_a, lora_b = module.lora_A, module.lora_B
        dtype = lora_a[slices[0][0]].weight.dtype
        if module.training or any(
            lora_a[n].bias is not None or lora_b[n].bias is not None or lora_a[n].weight.dtype != dtype
            for n, _, _ in slices
        ):  # dropout in training, a LoRA bias, adapters of two dtypes: each adapter through its own modules
            for name, first, end in slices:
                self._one_lora(module, name, target[first:end], flat[first:end])
            return
        lo, hi = slices[0][1], slices[-1][2]  # (slices are in token order)
        xs = flat[lo:hi].to(dtype)
        direct = target.dtype == dtype  # the sums go straight into the result
        if direct:
            delta = target[lo:hi]
        else:  # tokens between the slices (the base model's, another adapter's) must get nothing
            covered = sum(end - first for _, first, end in slices) == hi - lo
            delta = (torch.empty if covered else torch.zeros)(hi - lo, target.shape[1], dtype=dtype, device=xs.device)
        for name, first, end in slices:  # (at beta 0 an empty buffer's contents are ignored)
            xa = F.linear(xs[first - lo : end - lo], lora_a[name].weight)
            b = lora_b[name].weight.t()
            delta[first - lo : end - lo].addmm_(xa, b, beta=int(direct), alpha=module.scaling[name])
        if not direct:
            target[lo:hi] += delta.to(target.dtype)

    def _stacked(self, module: Any, names: tuple[str, ...]) -> tuple[Any, Any] | None:
        """`names`' A weights stacked and transposed [adapters, in, rank] and their B weights transposed and
        scaled [adapters, rank, out], cached per layer (its latest sets, up to STACKED_COPIES adapters' copies)
        while the same adapters' weights stay the same tensors, unchanged (serve's runtime adapters load and unload
        between passes; the check reads peft's modules' `_modules` / `_parameters` dicts directly, ~10x cheaper
        than nn.Module's attribute lookup, which summed to ~0.4 ms of a ~9 ms pass on the tiny base). None where a
        batched sum does not hold (dropout in training, a bias, ranks or dtypes that differ, inference tensors with
        no version counter): those take the slices."""
        if module.training:
            return None
        lora_a, lora_b = module.lora_A._modules, module.lora_B._modules
        weights = tuple(w for n in names for w in (lora_a[n]._parameters["weight"], lora_b[n]._parameters["weight"]))
        try:
            versions = tuple(w._version for w in weights)
        except RuntimeError:  # inference tensors keep no version counter: nothing to check a copy against
            return None
        sets = self._stacks.setdefault(id(module), {})
        hit = sets.pop(names, None)  # re-inserted last: the dict's order is the sets' recency
        if hit is not None and hit[0] == versions and all(a is b for a, b in zip(hit[1], weights, strict=True)):
            sets[names] = hit
            return hit[2]
        for gone in [key for key in sets if any(n not in lora_a for n in key)]:
            del sets[gone]  # an unloaded adapter's copies (serve's runtime adapters) go at the layer's next restack
        first = weights[0]
        if any(lora_a[n].bias is not None or lora_b[n].bias is not None for n in names) or any(
            w.dtype != first.dtype or w.shape != weights[i % 2].shape for i, w in enumerate(weights)
        ):
            stack = None
        else:
            a_all = torch.stack([lora_a[n].weight.t() for n in names])
            b_all = torch.stack([lora_b[n].weight.t() * float(module.scaling[n]) for n in names])
            stack = (a_all, b_all)
        sets[names] = (versions, weights, stack)
        while len(sets) > 1 and sum(len(key) for key in sets) > STACKED_COPIES:
            del sets[next(iter(sets))]  # the least recently used
        return stack

    def _groups(self, slices: tuple[tuple[str, int, int], ...], total: int, device: Any) -> tuple:
        """How the pass's tokens go into the batched GEMMs, one adapter's group of `size` tokens per batch entry
        (cached per pass): (the rows to gather, or None when the groups are equal and cover every token in order;
        which products are real, or None for all; where they go: a slice of rows or each one's row; the slices
        left over). The size is the longest group's (a shorter group repeats its last token, computed, then left
        out) unless that pads the pass past PAD_LIMIT times its tokens; then the groups' lower median, and a
        longer group's tokens past it go through their adapter's own GEMMs."""
        hit = self._grouping.get(slices)
        if hit is not None:
            return hit
        sizes = [end - first for _, first, end in slices]
        size = max(sizes)
        if len(sizes) * size > PAD_LIMIT * total:  # e.g. a long prompt chunk beside a few decoding rows
            size = sorted(sizes)[(len(sizes) - 1) // 2]
        rows = [min(first + j, end - 1) for _, first, end in slices for j in range(size)]
        real = [g * size + j for g, m in enumerate(sizes) for j in range(min(m, size))]
        dest = [first + j for (_, first, end), m in zip(slices, sizes, strict=True) for j in range(min(m, size))]
        rest = tuple((name, first + size, end) for name, first, end in slices if end - first > size)
        contiguous = dest == list(range(dest[0], dest[0] + len(dest)))
        plan = (
            None if rows == list(range(total)) else torch.tensor(rows, device=device),
            None if len(real) == len(rows) else torch.tensor(real, device=device),
            slice(dest[0], dest[0] + len(dest)) if contiguous else torch.tensor(dest, device=device),
            rest,
        )
        self._grouping[slices] = plan
        return plan

    @staticmethod
    def _plain(base: Any, x: Any) -> Any:
        """The projection without LoRA: the int4 kernel's op itself where gptq_backend's shim gives one."""
        if getattr(base, "lean_op", None) is not None:
            return base.lean_op(x.reshape(-1, x.shape[-1])).view(*x.shape[:-1], -1)
        return base(x)

    @staticmethod
    def _one_lora(module: Any, name: str, result: Any, x: Any) -> Any:
        """Rows on adapter `name`: peft's `_mixed_batch_forward` for one vanilla LoRA, without its per-row index
        lists (the same ops in the same order: base output + lora_B(lora_A(dropout(x))) * scaling), added into
        `result` in place."""
        lora_a = module.lora_A[name]
        out = module.lora_B[name](lora_a(module.lora_dropout[name](x.to(lora_a.weight.dtype))))
        result += (out * module.scaling[name]).to(result.dtype)
        return result

    def _one_query_each(self, q: Any, k: Any, v: Any, rows: list, layer: int, window: Any, scale: float) -> Any:
        """A pass of decoding rows only, none past LONG_ROW_KEYS: `_attention`'s loop for that case alone (a
        decoding step's common one), each query's GQA group folded into one head as there; [T, 1, heads * d]."""
        big, out = PARALLEL_KEYS_LONE if not self._threaded else PARALLEL_KEYS, []
        for i, row in enumerate(rows):
            a = self.kernel_query(q[i : i + 1], k[i : i + 1], v[i : i + 1], row, layer)
            if a is None:
                keys, values = _stored(row, layer, k[i], v[i], window)  # (k[i], v[i]: [kv_heads, 1, d])
                a = self._one_query(q[i], keys, values, scale, keys.shape[1] >= big).view(1, -1)
            out.append(a)
        return (out[0] if len(out) == 1 else torch.cat(out)).unsqueeze(1)

    def kernel_query(self, q: Any, k: Any, v: Any, row: Any, layer: int) -> Any:
        """One decoding query's attention [1, heads * d] through one_query.py's kernel, its key and value stored, for
        q [1, heads, 1, d], k and v [1, kv_heads, 1, d]; None, the row untouched, where the kernel does not serve
        (not bfloat16 on a CPU, shapes it does not fit, a long row, no toolchain): the caller's SDPA path then does.
        Every decoding query the kernel can serve goes through it, alone, batched or beside prompt chunks, compiled
        or eager, so a row's tokens do not depend on what it shares a pass with."""
        if self._kernel is None:
            self._kernel, self.attention_kind = _one_query_kernel(self, row.layout.windows)
        if self._kernel is False or q.dtype != torch.bfloat16 or q.device.type != "cpu":
            return None
        return self._kernel(q, k, v, row, layer)

    def _one_query(self, q: Any, keys: Any, values: Any, scale: float, big: bool) -> Any:
        """One decoding query (heads x d) over its row's keys and values [kv_heads, n, d] -> [1, heads, 1, d]: its
        GQA group folded into one head's queries (no mask ties a query to a position), the same numbers as SDPA's
        enable_gqa, which copies the keys per head: measured on the 270M's shapes (4 heads, 1 KV head, 256 dims),
        one thread, 511 keys: 58 us folded, 808 us with enable_gqa."""
        folded = q.reshape(1, self.kv_heads, self.heads // self.kv_heads, self.head_dim)
        with parallel(self.threads, big):
            o = F.scaled_dot_product_attention(folded, keys[None], values[None], scale=scale)
        return o.reshape(1, self.heads, 1, self.head_dim)

    def _attention(
        self, attn: Any, layer: int, x: Any, rope: tuple, rows: list, names: list | None, sizes: list, qk_norms: tuple
    ) -> Any:
        total, d = x.shape[0], self.head_dim
        (q, k, v), joined = self._linears((attn.q_proj, attn.k_proj, attn.v_proj), x, names, joined=True)
        v = v.view(total, 1, self.kv_heads, d).transpose(1, 2)
        if joined is not None:  # q and k side by side: one norm (per-head weights) and one rotation for both
            q, k = self._joined_qk(joined.view(total, -1), self.qk_norms[layer], rope)
        else:
            q = q.view(total, 1, self.heads, d).transpose(1, 2)  # [T, heads, 1, d]
            k = k.view(total, 1, self.kv_heads, d).transpose(1, 2)
            q, k = self.rope(self._norm(q, qk_norms[0]), self._norm(k, qk_norms[1]), *rope)
        window = rows[0].layout.windows[layer]  # the storage's view of the layer (kv_cache.KVLayout)
        gqa = self.heads != self.kv_heads
        if self._short_steps and gqa:
            return self._linear(attn.o_proj, self._one_query_each(q, k, v, rows, layer, window, attn.scaling), names)
        out, start = [], 0
        for row, m in zip(rows, sizes, strict=True):
            end = start + m
            out.append(self.row_attention(q[start:end], k[start:end], v[start:end], row, layer, window, attn.scaling))
            start = end
        o = (out[0] if len(out) == 1 else torch.cat(out)).unsqueeze(1)  # [T, 1, heads * d]
        return self._linear(attn.o_proj, o, names)

    def row_attention(self, q: Any, k: Any, v: Any, row: Any, layer: int, window: Any, scale: float) -> Any:
        """One row's m new tokens' attention [m, heads * d], their keys and values stored first, for q [m, heads, 1,
        d], k and v [m, kv_heads, 1, d] (token-major): a decoding query through the kernel where it serves, else
        SDPA (or _past_then_chunk) over what the row holds. `_attention`'s per-row part; the compiled prompt chunk's
        attention (compiled_step.py)."""
        m, d, gqa = q.shape[0], self.head_dim, self.heads != self.kv_heads
        if m == 1 and gqa:  # a decoding query: the kernel where it serves (kernel_query)
            a = self.kernel_query(q, k, v, row, layer)
            if a is not None:
                return a
        kw = {"scale": scale, "enable_gqa": gqa}
        lone = not self._threaded
        qi = q.transpose(0, 2)  # [1, heads, m, d]
        ki, vi = k[:, :, 0].transpose(0, 1), v[:, :, 0].transpose(0, 1)  # [kv_heads, m, d]
        keys, values = _stored(row, layer, ki, vi, window)
        # one new token sees all its row holds; a fresh prompt inside the window is plainly causal (no mask
        # of prompt x prompt booleans); otherwise the chunk's causal / sliding mask
        causal = m > 1 and keys.shape[1] == m and (window is None or m <= window)
        big = keys.shape[1] * m >= (PARALLEL_KEYS_LONE if lone else PARALLEL_KEYS)  # worth every thread
        # in a single-threaded pass, a chunk over its row's past (or one query over a long one) in a global
        # layer: unmasked parts (_past_then_chunk). A pass on every thread keeps SDPA, whose split over heads
        # the folded heads would undo (e.g. the 270M's 4 heads, 1 KV head).
        past_then_chunk = (m > 1 and not causal) or (m == 1 and keys.shape[1] >= LONG_ROW_KEYS)
        if past_then_chunk and lone and window is None and qi.device.type == "cpu" and FLASH_CPU is not None:
            split = keys.shape[1] * max(m, 4) >= HELPER_KEYS and self.threads > 1
            helper = self._helper() if split else None
            with parallel(self.threads, big and not split):
                o = _past_then_chunk(qi, keys[None], values[None], helper=helper, **kw)
        elif m == 1 and gqa:
            o = self._one_query(qi, keys, values, scale, big)
        else:
            mask = None if m == 1 or causal else _chunk_mask(keys.shape[1], m, window)
            with parallel(self.threads, big):
                o = F.scaled_dot_product_attention(qi, keys[None], values[None], attn_mask=mask, is_causal=causal, **kw)
        return o.transpose(1, 2).reshape(m, self.heads * d)  # back to token-major


def _stored(row: Any, layer: int, ki: Any, vi: Any, window: int | None) -> tuple[Any, Any]:
    """Append a row's new keys and values [kv_heads, m, d] to `layer`'s storage; return the keys and values its m
    new tokens attend to (a sliding layer's: its held window and the new tokens; a global one's: all it holds)."""
    m = ki.shape[1]
    if window is not None and m <= min(SLIDING_SLACK, window - 2):
        # the held last window - 1 tokens and the new ones, read in place after the append: copying them per row
        # per layer (torch.cat) cost ~3 ms of a ~14 ms 15-row step on the tiny base past the window
        held = row.held(layer)
        row.append(layer, ki, vi)
        return row.last(layer, held + m)
    if window is not None:  # a long chunk: storage keeps only the newest window - 1, so read the old first
        keys, values = ki, vi
        if row.length[layer]:
            pk, pv = row.view(layer)
            keys, values = torch.cat([pk, keys], dim=1), torch.cat([pv, values], dim=1)
        row.append(layer, ki, vi)
        return keys, values
    row.append(layer, ki, vi)
    return row.view(layer)


def _one_query_kernel(decoder: LeanDecoder, windows: tuple) -> tuple[Any, str]:
    """one_query.OneQuery for the decoder's attention shapes and what a decoding query's attention runs as; False
    where it does not fit them or cannot be built here (the text says why)."""
    from toolkit.engine import one_query
    from toolkit.errors import brief

    heads, kv_heads, d = decoder.heads, decoder.kv_heads, decoder.head_dim
    if not one_query.fits(heads, kv_heads, d, windows):
        return False, f"eager attention (shapes {heads} x {kv_heads} x {d} not the one-query kernel's)"
    try:
        scales = [attn.scaling for attn, _, _ in decoder._parts]
        return one_query.OneQuery(heads, kv_heads, d, windows, scales), "one-query kernel"
    except Exception as exc:  # noqa: BLE001  (the toolchain's own errors: SDPA serves)
        return False, f"eager attention ({brief(exc)})"


def _projection_groups(attn: Any, mlp: Any) -> tuple:
    """A layer's kernel calls in a decoding step, as (module, its projections' names): q/k/v joined, o, gate/up
    joined, down."""
    return ((attn, ("q_proj", "k_proj", "v_proj")), (attn, ("o_proj",)), (mlp, ("gate_proj", "up_proj")),
            (mlp, ("down_proj",)))  # fmt: skip


def _activation(module: Any) -> Any:
    """transformers' GELUTanh as the function it calls (F.gelu, tanh approximation); any other module as itself."""
    if type(module).__name__ == "GELUTanh" and "forward" not in vars(module) and callable(getattr(module, "act", None)):
        return module.act
    return module


def _rotate(x: Any, cos: Any, sin: Any) -> Any:
    """Gemma 3's rotary embedding (transformers' apply_rotary_pos_emb for one tensor, the same ops) of x
    [T, heads, 1, d] with cos / sin [T, 1, d]."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    half = x.shape[-1] // 2
    return (x * cos) + (torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin)


def _slices(names: list[str], sizes: list[int]) -> list[tuple[str, int, int]]:
    """Each adapter's tokens in a pass whose rows are grouped by adapter: (name, first token, end)."""
    out: list[tuple[str, int, int]] = []
    start = 0
    for name, m in zip(names, sizes, strict=True):
        if out and out[-1][0] == name:
            out[-1] = (name, out[-1][1], start + m)
        else:
            out.append((name, start, start + m))
        start += m
    return out


def _one_thread() -> None:
    """Pin the calling thread to one intra-op thread. The get comes first: a thread's first torch op sets its
    count up from the last value any thread set, which would override a plain set_num_threads(1) made before it."""
    torch.get_num_threads()
    torch.set_num_threads(1)


def _base(module: Any) -> Any:
    """A projection without its LoRA wrapper."""
    return getattr(module, "base_layer", module)


def _past_then_chunk(q: Any, keys: Any, values: Any, *, scale: float, enable_gqa: bool, helper: Any = None) -> Any:
    """SDPA of a prompt chunk's m queries [1, heads, m, d] (or one decoding query) over its row's keys
    [1, kv_heads, past + m, d] in a global layer: every query sees the whole past and, causally, the chunk. The
    same result as SDPA with `_chunk_mask`, computed as unmasked parts joined by their log-sum-exps (flash
    attention's own rule).

    Why by hand: this is what a chunk late in a 32k prompt adds to the decoding step it rides on (the gap of every
    running stream), and public SDPA serves it badly on a CPU. Given a boolean mask it reads the mask for every key
    (16 queries over 30k keys: 8.8 ms against 6.6 here); its CPU kernel parallelises over heads x blocks of 32
    queries (below 192), so a small chunk is one block on one thread; and an OpenMP region started from the engine's
    thread leaves its worker spinning beside the single-threaded ops after it (threads.py, PARALLEL_KEYS_LONE). So the
    past part folds each GQA group's query heads into one head (no mask ties a query to its position there) and,
    given a `helper` (a one-thread executor), hands the older half of the past to it while this thread does the
    rest: a Python thread waits on a lock, not in a spin. The chunk part is square and plainly causal.
    `_scaled_dot_product_flash_attention_for_cpu` is SDPA's own CPU kernel, the one that returns the log-sum-exp."""
    flash = FLASH_CPU
    _, heads, m, d = q.shape
    kv_heads, past = keys.shape[1], keys.shape[2] - m
    group = heads // kv_heads
    k_new, v_new = keys[:, :, past:], values[:, :, past:]
    if enable_gqa and group > 1:
        k_new, v_new = k_new.repeat_interleave(group, dim=1), v_new.repeat_interleave(group, dim=1)
    if past == 0:  # (the kernel divides by the key count: no empty part)
        return flash(q, k_new, v_new, is_causal=True, scale=scale)[0]
    folded = q.reshape(1, kv_heads, group * m, d)
    parts = []

    def unfold(o: Any, lse: Any) -> tuple[Any, Any]:
        return o.reshape(1, heads, m, d), lse.reshape(1, heads, m)

    half = past // 2 if helper is not None else 0
    older = helper.submit(flash, folded, keys[:, :, :half], values[:, :, :half], scale=scale) if half else None
    parts.append(unfold(*flash(folded, keys[:, :, half:past], values[:, :, half:past], scale=scale)))
    parts.append(flash(q, k_new, v_new, is_causal=True, scale=scale))
    if older is not None:
        parts.append(unfold(*older.result()))
    lse = functools.reduce(torch.logaddexp, (part_lse for _, part_lse in parts))
    out = sum(o.float() * (part_lse - lse).exp()[..., None] for o, part_lse in parts)
    return out.to(q.dtype)


def _chunk_mask(keys: int, m: int, window: int | None) -> Any:
    """Which of a row's `keys` (its held past, then its m new tokens) each new token sees: causal, and within the
    sliding window (a query sees the `window` newest positions up to its own) where the layer slides."""
    q = torch.arange(m).unsqueeze(1) + (keys - m)  # each query's index among the keys
    k = torch.arange(keys).unsqueeze(0)
    mask = k <= q
    if window is not None:
        mask &= k > q - window
    return mask
