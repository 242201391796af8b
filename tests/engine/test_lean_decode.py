"""The lean decoding step (engine/lean_decode.py) against the model's own forward over the same cached rows."""

from __future__ import annotations

import copy

import pytest
import torch

from toolkit.engine.kv_cache import KVLayout, RaggedCache, RowKV
from toolkit.engine.lean_decode import LeanDecoder


def _prefill(model, dtype, prompts: list[list[int]], names: list[str] | None) -> list[RowKV]:
    """Each prompt through the model's own forward into its own RowKV (as the engine's prefill does)."""
    layout = KVLayout.of(model, dtype)
    rows = []
    for i, ids in enumerate(prompts):
        row = RowKV(layout)
        cache = RaggedCache([row], [len(ids)])
        extra = {"adapter_names": [names[i]]} if names else {}
        with torch.no_grad():
            model(input_ids=torch.tensor([ids]), past_key_values=cache, use_cache=True, logits_to_keep=1, **extra)
        cache.finish()
        rows.append(row)
    return rows


def _generic_step(model, tokens: list[int], rows: list[RowKV], names: list[str] | None) -> torch.Tensor:
    """One decoding step through the model's forward: rows left-padded to the widest, as the engine did before."""
    past = max(r.seen for r in rows)
    seen = torch.tensor([r.seen for r in rows])
    cache = RaggedCache(rows, [1] * len(rows))
    extra = {"adapter_names": names} if names else {}
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor([[t] for t in tokens]),
            attention_mask=(torch.arange(past + 1).unsqueeze(0) >= (past - seen).unsqueeze(1)).long(),
            position_ids=seen.unsqueeze(1),
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
            **extra,
        )
    cache.finish()
    return out.logits[:, -1]


def _lean_prefill(lean, model, dtype, prompts, names, chunk):
    """The prompts through the lean pass instead, in chunks of `chunk` tokens (the engine's chunked prefill)."""
    layout = KVLayout.of(model, dtype)
    rows, last = [], []
    for i, ids in enumerate(prompts):
        row = RowKV(layout)
        for start in range(0, len(ids), chunk):
            logits = lean.forward([ids[start : start + chunk]], [row], [names[i]] if names else None)
        rows.append(row)
        last.append(logits[0])
    return rows, torch.stack(last)


def _generic_last(model, prompts, names):
    out = []
    for i, ids in enumerate(prompts):
        extra = {"adapter_names": [names[i]]} if names else {}
        with torch.no_grad():
            out.append(model(input_ids=torch.tensor([ids]), logits_to_keep=1, **extra).logits[0, -1])
    return torch.stack(out)


def _compare(model, dtype, prompts, names, steps=6, chunk=None, threads=1):
    """Decoding steps (and, with `chunk`, the prompts' prefill too) lean vs generic; the largest logit difference
    relative to the largest logit. Greedy choices and the stored keys/values must agree."""
    lean = LeanDecoder(model, threads)
    generic_rows = _prefill(model, dtype, prompts, names)
    worst = 0.0
    if chunk:
        lean_rows, a = _lean_prefill(lean, model, dtype, prompts, names, chunk)
        b = _generic_last(model, prompts, names)
        worst = ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
        assert torch.equal(a.argmax(-1), b.argmax(-1))
    else:
        lean_rows = copy.deepcopy(generic_rows)
    tokens = [ids[-1] for ids in prompts]  # any token continues the rows; then each row's own greedy choice
    for _ in range(steps):
        a = lean(tokens, lean_rows, names)
        b = _generic_step(model, tokens, generic_rows, names)
        assert a.shape == b.shape
        worst = max(worst, ((a.float() - b.float()).abs().max() / b.float().abs().max()).item())
        assert torch.equal(a.argmax(-1), b.argmax(-1))
        tokens = b.argmax(-1).tolist()
    assert [r.seen for r in lean_rows] == [r.seen for r in generic_rows]
    for x, y in zip(lean_rows, generic_rows, strict=True):  # the same keys and values were stored
        for layer in range(len(x.length)):
            kx, vx = x.view(layer)
            ky, vy = y.view(layer)
            assert kx.shape == ky.shape
            torch.testing.assert_close(kx.float(), ky.float(), rtol=0, atol=0.05)
            torch.testing.assert_close(vx.float(), vy.float(), rtol=0, atol=0.05)
    return worst


def _prompts():
    return [[2] + list(range(300, 340)), [2, 400, 401], [2] + list(range(500, 590))]  # three lengths


def test_the_lean_step_gives_the_generic_forwards_logits_for_rows_of_different_lengths(base):
    assert LeanDecoder.supports(base.model)
    worst = _compare(base.model, base.dtype, _prompts(), None)
    assert worst < (1e-5 if base.dtype == torch.float32 else 2e-2), worst  # bf16: rounding of the masked SDPA


@pytest.mark.parametrize("chunk", [None, 16, 5])
def test_the_lean_pass_truncates_sliding_layers_as_the_generic_forward_does(base, chunk):
    """Window 8: every row is past it (its sliding layers hold the last 7 tokens); chunks of 16 (past the window
    in one pass) and 5 (chunks that cross its edge) prefill the prompts through the lean pass too."""
    config = base.model.config.get_text_config()
    old = config.sliding_window
    config.sliding_window = 8
    try:
        worst = _compare(base.model, base.dtype, _prompts(), None, steps=10, chunk=chunk)
    finally:
        config.sliding_window = old
    assert worst < (1e-5 if base.dtype == torch.float32 else 2e-2), worst


def test_the_lean_prefill_of_prompt_chunks_gives_the_whole_forwards_logits(base):
    worst = _compare(base.model, base.dtype, _prompts(), None, steps=3, chunk=32)
    assert worst < (1e-5 if base.dtype == torch.float32 else 2e-2), worst


def test_chunks_and_long_rows_through_unmasked_parts_and_the_helper_give_the_generic_forwards_logits(base, monkeypatch):
    """The engine's path for long rows (global-layer chunks over their past, decoding queries over 8k+ keys, the
    older half on a helper thread), made to run on these short prompts: the same logits as the generic forward."""
    import toolkit.engine.lean_decode as lean_decode

    monkeypatch.setattr(lean_decode, "HELPER_KEYS", 1)
    monkeypatch.setattr(lean_decode, "LONG_ROW_KEYS", 1)
    calls = []
    real = lean_decode._past_then_chunk
    monkeypatch.setattr(
        lean_decode, "_past_then_chunk", lambda *a, **kw: calls.append(kw["helper"] is not None) or real(*a, **kw)
    )
    worst = _compare(base.model, base.dtype, _prompts(), None, steps=4, chunk=16, threads=2)
    assert calls and all(calls), calls  # every global-layer chunk and decoding query took it, with the helper
    assert worst < (1e-5 if base.dtype == torch.float32 else 2e-2), worst


@pytest.mark.parametrize("mix", [["quickstart", "__base__", "quickstart"], ["quickstart"] * 3, ["__base__"] * 3])
def test_the_lean_step_applies_each_rows_adapter(trained, mix):
    """Per-row adapters (peft's mixed batch) as in the model's forward; every row on one adapter takes the direct
    LoRA sum, a batch of base rows skips LoRA."""
    model = trained.model
    from toolkit.lora.registry import enable_mixed_adapter_batches

    enable_mixed_adapter_batches()
    name = next(iter(model.peft_config))
    names = [name if n != "__base__" else n for n in mix]
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    worst = _compare(model, dtype, _prompts(), names, chunk=16)
    assert worst < _trained_tolerance(model, dtype), worst


def _trained_tolerance(model, dtype) -> float:
    """The trained model runs on the kernel its training was timed fastest on (kernel_probe.py): exact float32
    only with TorchLinear; torch_fused multiplies in bfloat16 inside a float32 model."""
    from toolkit.base.gptq_backend import layer_kernels

    return 1e-5 if dtype == torch.float32 and layer_kernels(model) == ["TorchLinear"] else 2e-2


def test_rows_of_two_adapters_and_the_base_interleaved_get_each_rows_own_lora(trained):
    """A mixed pass groups its rows by adapter (each adapter's LoRA over one slice of tokens) and hands the logits
    back in the caller's order: the same as peft's per-row split in the model's forward, decoding and chunked
    prefill alike, with the rows given out of adapter order."""
    model = trained.model
    from toolkit.lora.registry import enable_mixed_adapter_batches

    enable_mixed_adapter_batches()
    first = next(iter(model.peft_config))
    model.load_adapter(str(trained.adapter_dir), adapter_name="second")
    try:
        with torch.no_grad():  # a different adapter: its own B weights
            for module in model.modules():
                if hasattr(module, "lora_B") and "second" in module.lora_B:
                    module.lora_B["second"].weight.mul_(-2.0).add_(0.01)
        model.set_adapter(first)
        dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
        prompts = _prompts() + [[2, 700, 701, 702, 703]]
        names = ["second", "__base__", first, "second"]
        worst = _compare(model, dtype, prompts, names, chunk=16)
        assert worst < _trained_tolerance(model, dtype), worst
        # the adapters do differ: the same prompt on each gives other logits
        lean, layout = LeanDecoder(model), KVLayout.of(model, dtype)

        def last() -> torch.Tensor:
            return lean.forward([prompts[0]] * 3, [RowKV(layout) for _ in range(3)], [first, "second", "__base__"])

        before = last()
        assert not torch.allclose(before[0], before[1]) and not torch.allclose(before[1], before[2])
        # weights changed in place between passes (as serve's runtime adapters may): no stale stacked copy is used
        with torch.no_grad():
            for module in model.modules():
                if hasattr(module, "lora_B") and "second" in module.lora_B:
                    module.lora_B["second"].weight.mul_(0.5)
        after, want = last()[1], _generic_last(model, [prompts[0]], ["second"])[0]
        assert not torch.allclose(after, before[1])
        assert ((after.float() - want.float()).abs().max() / want.float().abs().max()).item() < (
            _trained_tolerance(model, dtype)
        )
    finally:
        model.delete_adapter("second")


def test_passes_that_flip_between_sets_of_adapters_reuse_each_sets_stacked_weights(trained, monkeypatch):
    """A mixed pass's stacked LoRA weights are kept per set of adapters (the latest sets per layer, up to
    STACKED_COPIES adapters' copies), so passes that alternate between two sets restack nothing; a set with an
    adapter since unloaded is dropped at the layer's next restack, the oldest sets go past the limit, and a pass's
    own set stays whatever its size."""
    from toolkit.engine import lean_decode

    model = trained.model
    first = next(iter(model.peft_config))
    extras = ["second", "third", "fourth", "fifth"]
    for extra in extras:
        model.load_adapter(str(trained.adapter_dir), adapter_name=extra)
    try:
        lean = LeanDecoder(model)
        module = next(m for m in model.modules() if hasattr(m, "lora_A") and "second" in m.lora_A)
        one, two = (first, "second"), (first, "third")
        a, b = lean._stacked(module, one), lean._stacked(module, two)
        assert a is not None and b is not None
        assert lean._stacked(module, one) is a and lean._stacked(module, two) is b  # no restack when flipping
        assert torch.equal(a[0][1], module.lora_A["second"].weight.t())
        model.delete_adapter("third")
        c = lean._stacked(module, (first, "fourth"))  # a restack: the set holding the unloaded adapter goes
        assert set(lean._stacks[id(module)]) == {one, (first, "fourth")}
        assert c is not None and lean._stacked(module, (first, "fourth")) is c  # kept: the most recently used
        monkeypatch.setattr(lean_decode, "STACKED_COPIES", 6)  # three sets of two adapters
        newer = [(first, "fifth"), ("second", "fifth")]
        for names in newer:  # one set past the limit: the least recently used goes
            lean._stacked(module, names)
        sets = lean._stacks[id(module)]
        assert list(sets) == [(first, "fourth"), *newer]
        wide = (first, "second", "fourth", "fifth")
        lean._stacked(module, wide)  # 4 copies: the oldest two sets make room
        assert list(lean._stacks[id(module)]) == [newer[1], wide]
        monkeypatch.setattr(lean_decode, "STACKED_COPIES", 2)
        three = (first, "fourth", "fifth")
        assert lean._stacked(module, three) is not None and list(lean._stacks[id(module)]) == [three]  # kept whole
    finally:
        for extra in extras:
            if extra in model.peft_config:
                model.delete_adapter(extra)


@pytest.mark.parametrize(
    "layout",
    [
        ["second", "third", "first", "second", "third", "first"],  # equal groups: batched GEMMs over every token
        ["first", "second", "second", "third", "third"],  # a shorter group, padded to the others
        ["third", "__base__", "first", "second", "first"],  # base rows between the groups
        ["first", "second", "third", "fourth"],  # the fresh prompt would pad 4 groups past PAD_LIMIT: its own GEMMs
    ],
)
def test_a_pass_of_three_adapters_and_the_base_with_a_fresh_prompt_gets_each_rows_own_lora(trained, layout):
    """The batched LoRA of a mixed pass (each adapter's group of tokens one batch entry; a shorter group padded, or
    a fresh prompt's tokens past the groups' size through its adapter's own GEMMs): the logits of peft's per-row
    split in the model's forward, for decoding steps and for a pass that also prefills a prompt."""
    model = trained.model
    from toolkit.lora.registry import enable_mixed_adapter_batches

    enable_mixed_adapter_batches()
    first = next(iter(model.peft_config))
    extras = (("second", -2.0), ("third", 0.5), ("fourth", 1.5))
    for extra, factor in extras:
        model.load_adapter(str(trained.adapter_dir), adapter_name=extra)
        with torch.no_grad():  # each its own B weights
            for module in model.modules():
                if hasattr(module, "lora_B") and extra in module.lora_B:
                    module.lora_B[extra].weight.mul_(factor).add_(0.01)
    try:
        model.set_adapter(first)
        dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
        tolerance = _trained_tolerance(model, dtype)
        names = [first if n == "first" else n for n in layout]
        prompts = [[2] + list(range(300 + 50 * i, 305 + 50 * i + 7 * i)) for i in range(len(names))]
        worst = _compare(model, dtype, prompts, names)
        assert worst < tolerance, worst
        # one pass: every row's next token, and a 30-token prompt on the first row's adapter
        lean = LeanDecoder(model)
        generic_rows = _prefill(model, dtype, prompts, names)
        lean_rows = copy.deepcopy(generic_rows) + [RowKV(KVLayout.of(model, dtype))]
        fresh = [2] + list(range(900, 929))
        tokens = [ids[-1] for ids in prompts]
        got = lean.forward([[t] for t in tokens] + [fresh], lean_rows, names + [names[0]])
        want = torch.cat([_generic_step(model, tokens, generic_rows, names), _generic_last(model, [fresh], names[:1])])
        assert torch.equal(got.argmax(-1), want.argmax(-1))
        assert ((got.float() - want.float()).abs().max() / want.float().abs().max()).item() < tolerance
    finally:
        for extra, _ in extras:
            model.delete_adapter(extra)


@pytest.mark.parametrize("adapter", [False, True])
def test_decoding_rows_take_the_direct_layers_with_the_general_paths_logits_bit_for_bit(
    tiny_ct, trained, adapter, monkeypatch
):
    """Passes of decoding rows only (here 1 and 3 rows, on the base or all on one adapter, with the inference
    kernel `toolkit serve` loads: joined q/k/v and gate/up ops) go through `_decoding_layers`, with the same logits
    and stored keys and values, bit for bit, as the general path gives the same passes. The adapter is attached
    after the decoders ran on the bare base, as serve's runtime loading does (peft then wraps the projections)."""
    from toolkit.base.loader import load_base
    from toolkit.lora.registry import attach

    loaded = load_base(tiny_ct, device="cpu")
    calls = []
    real = LeanDecoder._decoding_layers
    monkeypatch.setattr(LeanDecoder, "_decoding_layers", lambda self, *a: calls.append(1) or real(self, *a))
    direct, general = LeanDecoder(loaded.model), LeanDecoder(loaded.model)
    general._direct = False  # (what a kernel without direct ops answers: every pass on the general path)
    layout = KVLayout.of(loaded.model, loaded.dtype)

    def steps(prompts, names):
        rows = {}
        for lean in (direct, general):
            rows[lean] = [RowKV(layout) for _ in prompts]
            lean.forward(prompts, rows[lean], names)  # a prefill pass: the general path (its rows are no steps)
        tokens = [ids[-1] for ids in prompts]
        before = len(calls)
        for _ in range(4):
            a, b = direct(tokens, rows[direct], names), general(tokens, rows[general], names)
            assert torch.equal(a, b)
            tokens = a.argmax(-1).tolist()
        assert len(calls) - before == 4  # every step took the direct layers
        for x, y in zip(rows[direct], rows[general], strict=True):
            for layer in range(len(x.length)):
                assert all(torch.equal(p, q) for p, q in zip(x.view(layer), y.view(layer), strict=True))
        return rows[direct], tokens

    steps(_prompts()[:1], None)
    if adapter:
        attach(loaded, [("quickstart", trained.adapter_dir)])
    for prompts in (_prompts()[:1], _prompts()):
        rows, tokens = steps(prompts, ["quickstart"] * len(prompts) if adapter else None)
    if adapter:  # the adapter's LoRA is in those logits: the same direct step on the base alone differs
        twin = copy.deepcopy(rows)
        assert not torch.equal(direct(tokens, rows, ["quickstart"] * 3), direct(tokens, twin, None))


def test_rms_norm_with_one_plus_weight_is_gemmas_norm_bit_for_bit():
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        norm = Gemma3RMSNorm(64, eps=1e-6)
        norm.weight.data.normal_()
        x = (torch.randn(5, 1, 64) * 3).to(dtype)
        lean = LeanDecoder.__new__(LeanDecoder)
        lean.eps = 1e-6
        assert torch.equal(lean._norm(x, 1.0 + norm.weight.float()), norm(x))


def test_one_rows_head_through_torch_mv_gives_f_linears_logits():
    """The lean step's one-row LM head (torch.mv, CPU's matrix-vector kernel): F.linear's logits for a bfloat16
    head (bit for bit on the Xeon it was measured on; within one bfloat16 rounding step wherever kernels differ)."""
    from torch import nn

    torch.manual_seed(0)
    head = nn.Linear(64, 5000, bias=False).to(torch.bfloat16)
    hidden = torch.randn(1, 64).to(torch.bfloat16)
    lean = LeanDecoder.__new__(LeanDecoder)
    lean.head = head
    assert lean._plain_head(hidden)
    got, want = torch.mv(head.weight, hidden[0]), nn.functional.linear(hidden, head.weight)[0]
    torch.testing.assert_close(got.float(), want.float(), rtol=8e-3, atol=1e-2)
    assert got.argmax() == want.argmax()
    head.forward = head.forward  # an instance forward (loader.py's float32 tiles) is not a plain head
    assert not lean._plain_head(hidden)


@pytest.mark.parametrize(
    ("heads", "kv_heads", "dtype", "helper"),
    [
        (2, 1, torch.float32, False),
        (8, 4, torch.float32, True),
        (4, 2, torch.bfloat16, True),
        (2, 1, torch.float32, True),
    ],
)
@pytest.mark.parametrize(("m", "past"), [(7, 301), (1, 301), (7, 1), (7, 0)])
def test_a_chunk_over_a_long_past_in_unmasked_parts_is_sdpa_with_the_chunk_mask(
    heads, kv_heads, dtype, helper, m, past
):
    """A global layer's prompt chunk (m 7) or decoding query (m 1): past (no mask; with a helper thread, its older
    half there) and chunk (causal)
    joined by log-sum-exps, as SDPA with the boolean chunk mask gives it (GQA groups folded into the past part's
    queries)."""
    from concurrent.futures import ThreadPoolExecutor

    from toolkit.engine.lean_decode import _chunk_mask, _past_then_chunk

    torch.manual_seed(0)
    d = 32
    q = torch.randn(1, heads, m, d).to(dtype)
    k, v = (torch.randn(1, kv_heads, past + m, d).to(dtype) for _ in range(2))
    want = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=_chunk_mask(past + m, m, None), scale=0.2, enable_gqa=True
    )
    with ThreadPoolExecutor(1) as pool:
        got = _past_then_chunk(q, k, v, scale=0.2, enable_gqa=True, helper=pool if helper else None)
    assert got.dtype == dtype and got.shape == want.shape
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(got, want, **tol)
