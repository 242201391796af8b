"""One base row's compiled decoding layers (engine/compiled_step.py) against the generic forward and the eager step."""

from __future__ import annotations

import copy

import pytest
import torch
from test_engine import Collector, _prompt, _submit
from test_lean_decode import _generic_step, _prefill

from toolkit.engine.engine import Engine, generate_greedy
from toolkit.engine.kv_cache import KVLayout, RowKV
from toolkit.engine.lean_decode import LONG_ROW_KEYS, ROPE_TABLE, LeanDecoder


@pytest.fixture(scope="module")
def compiled(base):
    """A lean decoder with its one-row layers compiled, beside an eager twin on the same model."""
    lean, eager = LeanDecoder(base.model), LeanDecoder(base.model)
    seconds = lean.compile_step(KVLayout.of(base.model, base.dtype))
    assert lean.compiled is not None and seconds > 0
    return lean, eager


def test_the_compiled_step_gives_the_generic_forwards_logits_and_keys(base, compiled):
    """Twelve steps of one row through the compiled layers: each took them, and each gives the generic forward's
    greedy token, its logits within the lean step's own tolerance and the same keys and values stored; the eager
    lean step gives nearly the same logits (inductor's fused norms may round a last bit differently)."""
    lean, eager = compiled
    assert lean.attention_kind == "one-query kernel"  # each layer's attention through one_query.py's kernel
    prompt = [2] + list(range(300, 340))
    rows = _prefill(base.model, base.dtype, [prompt], None)
    generic, twin = copy.deepcopy(rows), copy.deepcopy(rows)
    token, before = prompt[-1], lean.compiled.calls
    for step in range(12):
        a = lean([token], rows, None)
        b = _generic_step(base.model, [token], generic, None)
        c = eager([token], twin, None)
        assert lean.compiled.calls == before + step + 1
        assert torch.equal(a.argmax(-1), b.argmax(-1))
        scale = b.float().abs().max()
        assert ((a.float() - b.float()).abs().max() / scale).item() < 0.02
        assert ((a.float() - c.float()).abs().max() / scale).item() < 0.02
        token = b.argmax(-1).item()
    for layer in range(len(rows[0].length)):
        for x, y in zip(rows[0].view(layer), generic[0].view(layer), strict=True):
            assert x.shape == y.shape
            torch.testing.assert_close(x.float(), y.float(), rtol=0, atol=0.05)


@pytest.mark.parametrize("length", [2, 13, 40])
def test_a_prompt_chunk_through_the_compiled_segments_gives_the_eager_passs_logits_and_keys(base, compiled, length):
    """One base row's prompt, fresh or after a first chunk, through the chunk segments (the token count symbolic in
    one graph): it took them, and gives the eager pass's greedy token, its logits within the lean step's tolerance
    and the same keys and values stored; a pass of two rows stays eager."""
    lean, eager = compiled
    layout = KVLayout.of(base.model, base.dtype)
    prompt = [2] + list(range(500, 500 + length))
    rows = {d: RowKV(layout) for d in (lean, eager)}
    for part in (prompt[: length // 2 + 1], prompt[length // 2 + 1 :]):
        if len(part) < 2:
            continue
        before = lean.compiled.chunks
        a, b = lean.forward([part], [rows[lean]], None), eager.forward([part], [rows[eager]], None)
        assert lean.compiled.chunks == before + 1
        assert torch.equal(a.argmax(-1), b.argmax(-1))
        assert ((a.float() - b.float()).abs().max() / b.float().abs().max()).item() < 0.02
    for layer in range(len(rows[lean].length)):
        for x, y in zip(rows[lean].view(layer), rows[eager].view(layer), strict=True):
            assert x.shape == y.shape
            torch.testing.assert_close(x.float(), y.float(), rtol=0, atol=0.05)
    before = lean.compiled.chunks
    lean.forward([prompt[:5], prompt[:7]], [RowKV(layout), RowKV(layout)], None)
    assert lean.compiled.chunks == before


def test_passes_of_several_rows_or_an_adapter_take_the_eager_layers(tiny_ct, trained):
    """The compiled layers serve one base row only: a pass of two rows, or one on an adapter, takes the eager
    direct layers, with the eager twin's logits bit for bit (and the adapter's LoRA in them)."""
    from toolkit.base.loader import load_base
    from toolkit.lora.registry import attach

    loaded = load_base(tiny_ct, device="cpu")
    attach(loaded, [("quickstart", trained.adapter_dir)])
    layout = KVLayout.of(loaded.model, loaded.dtype)
    lean, eager = LeanDecoder(loaded.model), LeanDecoder(loaded.model)
    lean.compile_step(layout)
    prompts = [[2] + list(range(300, 320)), [2, 400, 401]]
    for names in (None, ["quickstart"]):
        for count in (2, 1):
            if names is None and count == 1:
                continue  # (the compiled case, tested above)
            names_ = names * count if names else None
            rows = {d: [RowKV(layout) for _ in range(count)] for d in (lean, eager)}
            for d in (lean, eager):
                d.forward(prompts[:count], rows[d], names_)
            tokens, calls = [p[-1] for p in prompts[:count]], lean.compiled.calls
            for _ in range(3):
                a, b = lean(tokens, rows[lean], names_), eager(tokens, rows[eager], names_)
                assert torch.equal(a, b)
                tokens = a.argmax(-1).tolist()
            assert lean.compiled.calls == calls
    base_row = copy.deepcopy(rows[lean])  # (the last pass: one row on the adapter)
    calls = lean.compiled.calls
    assert not torch.equal(lean(tokens, rows[lean], ["quickstart"]), lean(tokens, base_row, None))
    assert lean.compiled.calls == calls + 1  # one base row beside a loaded adapter: compiled
    lean.forward([[5, 6, 7]], base_row, None)  # a prompt chunk on one row: eager
    assert lean.compiled.calls == calls + 1


def test_an_engine_on_the_main_thread_compiles_its_step_and_gives_the_same_tokens(base, monkeypatch):
    """Engine.compile_step compiles only where the engine runs on its process's main thread and the rows split
    (not the tiny base: its step stays eager, and says why); with the gate lowered it compiles, and `run_here`
    streams transformers' greedy tokens through it. `compiled_step=False` (--no-compiled-step) keeps it eager."""
    import toolkit.engine.lean_decode as lean_decode

    def engine(**options):
        return Engine(base.model, device="cpu", dtype=base.dtype, pad_id=0, stop_ids=[1, 106], batch_wait_s=0,
                      start=False, **options)  # fmt: skip

    plain = engine()
    assert plain.compile_step().startswith("eager (only a CPU engine") and plain._lean.compiled is None
    monkeypatch.setattr(lean_decode, "PARALLEL_MATMUL_MAIN", 1)
    assert engine(compiled_step=False).compile_step() == "eager (turned off)"
    e = engine()
    assert e.compile_step().startswith("compiled (") and e.step_kind.startswith("compiled (")
    prompt = _prompt(base, "Tell me about the sea and the ships on it.")
    expected = generate_greedy(base, prompt.tensors(), max_new_tokens=12)
    got = Collector()

    def on_event(kind, value):
        got(kind, value)
        if kind in ("done", "error"):
            e.close()

    _submit(e, prompt, 12, on_event)
    before = e._lean.compiled.calls  # (compile_step's own check took one)
    e.run_here()
    assert got.tokens == expected
    assert e._lean.compiled.calls - before == 11  # every step after the prompt's own


def test_a_compiled_step_that_disagrees_or_fails_leaves_the_eager_step(base, monkeypatch):
    """compile_step checks one compiled step against the eager one before it serves: logits that differ are
    refused (Engine.compile_step then reports eager and why). A compiled step that raises while serving gives its
    pass the error and leaves later passes to the eager step."""
    import toolkit.engine.lean_decode as lean_decode
    from toolkit.engine.compiled_step import CompiledLayers, NotCompiled

    layout = KVLayout.of(base.model, base.dtype)
    real = CompiledLayers.__call__
    monkeypatch.setattr(CompiledLayers, "__call__", lambda self, d, h, *a: real(self, d, h, *a).flip(-1))
    lean = LeanDecoder(base.model)
    with pytest.raises(NotCompiled, match="differ from the eager step"):
        lean.compile_step(layout)
    assert lean.compiled is None
    monkeypatch.setattr(lean_decode, "PARALLEL_MATMUL_MAIN", 1)
    e = Engine(base.model, device="cpu", dtype=base.dtype, pad_id=0, stop_ids=[1], start=False)
    assert e.compile_step().startswith("eager (NotCompiled: the compiled step's logits differ")
    assert e._lean.row_gate is None  # (run_here sets it; compile_step leaves it as it was)

    monkeypatch.setattr(CompiledLayers, "__call__", real)
    chunk = CompiledLayers.chunk  # a prompt chunk that disagrees: the step serves, prompt chunks go eager
    monkeypatch.setattr(CompiledLayers, "chunk", lambda self, d, h, *a: chunk(self, d, h, *a).flip(-1))
    lean.compile_step(layout)
    assert lean.compiled is not None and "differ from the eager prompt chunk's" in lean.compiled.chunks_off
    before = lean.compiled.chunks  # (compile_step's check took one)
    lean.forward([[2, 300, 301]], [RowKV(layout)], None)
    assert lean.compiled.chunks == before
    assert "prompt chunks eager: its logits differ" in e.compile_step()
    monkeypatch.setattr(CompiledLayers, "chunk", lambda *a: 1 / 0)  # one failing its check: the same
    lean.compile_step(layout)
    assert lean.compiled is not None and lean.compiled.chunks_off == "failed its check: ZeroDivisionError"
    monkeypatch.setattr(CompiledLayers, "chunk", chunk)
    lean.compile_step(layout)
    assert lean.compiled.chunks_off is None
    monkeypatch.setattr(CompiledLayers, "chunk", lambda *a: 1 / 0)  # or while serving: its pass gets the error
    with pytest.raises(ZeroDivisionError):
        lean.forward([[2, 300, 301]], [RowKV(layout)], None)
    assert lean.compiled is not None and lean.compiled.chunks_off == "failed while serving: ZeroDivisionError"
    monkeypatch.setattr(CompiledLayers, "chunk", chunk)
    lean.compile_step(layout)
    row = RowKV(layout)
    lean.forward([[2, 300, 301]], [row], None)
    monkeypatch.setattr(CompiledLayers, "__call__", lambda *a: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        lean([302], [row], None)
    assert lean.compiled is None
    fresh = RowKV(layout)
    lean.forward([[2, 300, 301]], [fresh], None)
    assert lean([302], [fresh], None).shape[0] == 1  # eager from now on


@pytest.mark.parametrize("length", [ROPE_TABLE - 3, LONG_ROW_KEYS - 4])
def test_long_rows_past_the_rope_table_and_up_to_the_long_row_limit(base, compiled, length):
    """A row whose steps cross the lean step's rotary table (ROPE_TABLE positions: past it the rotary module computes
    cos / sin), and one that reaches LONG_ROW_KEYS (from there a step takes the long-row layers, not the compiled
    ones), both far past the sliding window: each step gives the generic forward's greedy token and logits within the
    lean step's tolerance, and the compiled layers serve exactly the steps below the long-row limit."""
    lean, _ = compiled
    prompt = [2] + [300 + i % 500 for i in range(length - 1)]
    rows = _prefill(base.model, base.dtype, [prompt], None)
    generic = copy.deepcopy(rows)
    token, calls, expected = prompt[-1], lean.compiled.calls, 0
    for _ in range(6):
        expected += rows[0].seen < LONG_ROW_KEYS - 1
        a = lean([token], rows, None)
        b = _generic_step(base.model, [token], generic, None)
        assert torch.equal(a.argmax(-1), b.argmax(-1))
        assert ((a.float() - b.float()).abs().max() / b.float().abs().max()).item() < 0.02
        token = b.argmax(-1).item()
    assert rows[0].seen == length + 6
    assert lean.compiled.calls == calls + expected
    assert 0 < expected < 6 if length > ROPE_TABLE else expected == 6
