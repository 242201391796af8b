"""The serving LM head (base/lm_head.py, kernels.choose_head): int8 rows with the top candidates rescored exactly.

The quality gate runs on the real Gemma 3 270M through the server, as a client measures it: perplexity of held-out
text through /v1/completions (echo, prompt logprobs) within 0.5% of the exact bfloat16 head, and greedy
continuations of held-out prompts equal token for token at >= 99% of positions.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from toolkit.base import kernels
from toolkit.base.lm_head import DYNAMIC_ROWS, INT8_ROWS, RESCORE, Int8Head, dynamic_unavailable
from toolkit.errors import ToolkitError

# the int8 kernels this machine has: the weight-only one everywhere, the int8 x int8 one with VNNI
MATMULS = ["weight_only"] + (["dynamic"] if dynamic_unavailable() is None else [])


@pytest.fixture(autouse=True)
def kept_choices(tmp_path, monkeypatch):
    """auto's kernel choice kept in a file of the test's own (not the machine's cache, where the real base lives)."""
    from toolkit.base import kept_choices

    path = tmp_path / "kernel-choice.json"
    monkeypatch.setattr(kept_choices, "cache_file", lambda: path)
    return path


def _head(rows: int = 4096, cols: int = 64, dtype=torch.bfloat16) -> torch.nn.Linear:
    head = torch.nn.Linear(cols, rows, bias=False)
    head.weight.data = torch.randn(rows, cols, generator=torch.Generator().manual_seed(0)).to(dtype)
    return head


@pytest.mark.parametrize("matmul", MATMULS)
def test_the_top_candidates_are_the_exact_heads_logits_and_the_rest_within_int8_rounding(matmul):
    exact = _head()
    hidden = torch.randn(3, 64, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    want = exact(hidden).float()
    head = Int8Head(exact, matmul)
    assert head.matmul == matmul
    got = head(hidden).float()
    top = want.topk(RESCORE // 2, dim=1).indices  # well inside the int8 top RESCORE
    torch.testing.assert_close(got.gather(1, top), want.gather(1, top), rtol=0, atol=1e-2)  # bf16 rounding only
    assert torch.equal(got.argmax(1), want.argmax(1))
    rest = (got - want).abs().max() / want.abs().max()
    assert 0 < rest < 0.02  # the tail carries int8 rounding: not the exact head, but close


@pytest.mark.parametrize("matmul", MATMULS)
def test_many_rows_go_in_chunks_with_the_same_logits_as_one_by_one(matmul):
    head = Int8Head(_head(), matmul)
    n = 2 * max(INT8_ROWS, DYNAMIC_ROWS) + 3
    hidden = torch.randn(1, n, 64, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    scale = torch.ones(1, n, 1)
    scale[0, 1] = 50  # a row of another scale: with the int8 x int8 kernel each row's activations get their own
    hidden = hidden * scale.to(hidden.dtype)
    together = head(hidden)
    assert together.shape == (1, n, 4096)
    alone = torch.cat([head(hidden[:, i : i + 1]) for i in range(hidden.shape[1])], dim=1)
    if matmul == "dynamic":  # a row's quantisation is its own (the pinned range): bit for bit the same
        assert torch.equal(together, alone)
    # each row within bf16 rounding of its own logits' scale (the 50x row's logits are 50x larger)
    torch.testing.assert_close(together.float() / scale, alone.float() / scale, rtol=0, atol=1e-2)
    assert torch.equal(together.argmax(-1), alone.argmax(-1))


@pytest.mark.parametrize("matmul", MATMULS)
def test_a_nan_row_gets_nan_logits_wherever_it_sits_and_the_other_rows_keep_theirs(matmul):
    head = Int8Head(_head(), matmul)
    hidden = torch.randn(3, 64, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    clean = head(hidden[1:])
    for at in (0, 2):  # first (where the int8 x int8 kernel's range search starts) and last
        bad = hidden.clone()
        bad[at, 5] = float("nan")
        logits = head(bad)
        assert logits[at].isnan().all()
        others = [i for i in range(3) if i != at]
        assert not logits[others].isnan().any()
        torch.testing.assert_close(logits[others].float(), head(hidden[others]).float(), rtol=0, atol=1e-2)
    assert not clean.isnan().any()


def test_without_vnni_the_int8_x_int8_kernel_is_refused_and_auto_takes_the_weight_only_one(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_vnni_supported", lambda: False)
    assert "VNNI" in dynamic_unavailable()
    assert Int8Head(_head()).matmul == "weight_only"
    with pytest.raises(ToolkitError, match="not available here.*VNNI"):
        Int8Head(_head(), "dynamic")
    with pytest.raises(ToolkitError, match="int8 x int8 LM head is not available"):
        kernels.choose_head("cpu", "int8-dynamic", elements=262_208 * 640)
    assert kernels.choose_head("cpu", "int8-weight-only").matmul == "weight_only"
    assert kernels.choose_head("cpu", "int8").matmul == "auto"


def test_auto_times_the_kernels_once_per_machine_and_keeps_the_answer(kept_choices, monkeypatch):
    from toolkit.base import lm_head

    # both kernels available and timed at fixed seconds, whatever this CPU has: what is tested is the keeping
    monkeypatch.setattr(lm_head, "dynamic_unavailable", lambda: None)
    packed, timed = [], []
    monkeypatch.setattr(lm_head, "_prepack", lambda codes, scales: packed.append(1) or ("packed", "pin"))
    seconds = {"weight_only": 0.004, "dynamic": 0.002}
    monkeypatch.setattr(Int8Head, "_timed", lambda self: timed.append(1) or dict(seconds))
    first = Int8Head(_head())
    assert (first.matmul, len(timed), len(packed)) == ("dynamic", 1, 1)
    timings = "int8-weight-only 4.00 ms, int8-dynamic 2.00 ms for one row"
    assert first.describe() == f"int8-dynamic, auto (timed now: {timings})"
    second = Int8Head(_head())
    assert (second.matmul, len(timed)) == ("dynamic", 1)  # kept: not timed again
    assert second.describe() == first.describe().replace("timed now", "timed on this machine")
    [(key, entry)] = json.loads(kept_choices.read_text()).items()
    assert key.startswith("lm head") and key.endswith("4096x64") and entry["matmul"] == "dynamic"
    assert lm_head.auto_kernel(4096, 64) == second.describe()  # what `toolkit info` shows before a load
    # a kept weight-only answer serves without packing an int8 x int8 copy
    kept_choices.write_text(json.dumps({key: {**entry, "matmul": "weight_only"}}))
    packed.clear()
    kept = Int8Head(_head())
    assert (kept.matmul, packed, len(timed)) == ("weight_only", [], 1)
    seconds["weight_only"] = 0.001
    assert Int8Head(_head(rows=2048)).matmul == "weight_only" and len(timed) == 2  # another shape: timed on its own
    kept_choices.write_text("[1, 2]")  # a cache file that is not the toolkit's: timed again, not a failed load
    assert Int8Head(_head()).matmul == "weight_only" and len(timed) == 3


def test_a_float32_model_over_a_bfloat16_matrix_gets_float32_logits():
    exact = _head()
    weight = exact.weight

    class Tiles(torch.nn.Module):  # the loader's bfloat16_token_matrix: bf16 weight, float32 math
        def __init__(self):
            super().__init__()
            self.weight = weight

        def forward(self, x):
            return x.float() @ self.weight.float().t()

    hidden = torch.randn(2, 64, generator=torch.Generator().manual_seed(3))
    got = Int8Head(Tiles())(hidden)
    assert got.dtype == torch.float32
    want = Tiles()(hidden)
    top = want.topk(8, dim=1).indices
    torch.testing.assert_close(got.gather(1, top), want.gather(1, top))


def test_the_head_stays_tied_to_the_token_embedding():
    exact = _head()
    head = Int8Head(exact)
    assert head.weight is exact.weight
    replacement = torch.nn.Parameter(exact.weight.detach().clone())
    head.weight = replacement  # what re-tying does
    assert exact.weight is replacement


def test_auto_picks_int8_for_a_large_head_on_a_cpu_only():
    assert kernels.choose_head("cpu", elements=262_208 * 640).name == "int8"
    assert kernels.choose_head("cpu", elements=1773 * 256).name == "exact"  # the tiny base's head
    assert kernels.choose_head("cpu", "exact", elements=262_208 * 640).name == "exact"
    assert kernels.choose_head("cpu", elements=262_208 * 640, training=True).name == "exact"
    assert kernels.choose_head("cuda", elements=262_208 * 5376).name == "exact"
    with pytest.raises(ToolkitError, match="not available here"):
        kernels.choose_head("cuda", "int8")
    with pytest.raises(ToolkitError, match="unknown LM head"):
        kernels.choose_head("cpu", "int4")


def test_loading_with_the_int8_head_serves_it_and_training_keeps_the_exact_one(tiny_ct):
    from toolkit.base.loader import load_base

    served = load_base(tiny_ct, device="cpu", lm_head="int8")
    assert served.head == "int8" and isinstance(served.model.get_output_embeddings(), Int8Head)
    assert served.model.get_output_embeddings().weight is served.model.get_input_embeddings().weight
    trained = load_base(tiny_ct, device="cpu", training=True, lm_head="int8")
    assert trained.head == "exact" and not isinstance(trained.model.get_output_embeddings(), Int8Head)


# ---------------------------------------------------------------------------------------------- the real 270M gate
@pytest.fixture(scope="module")
def real_servers():
    from helpers import LiveServer

    from toolkit.base import real_weights
    from toolkit.serve.app import build_state

    path = str(real_weights.cached_base())
    servers = {}
    # each int8 kernel this machine has, gated on its own (auto serves whichever is faster here)
    for head in [f"int8-{m.replace('_', '-')}" for m in MATMULS] + ["exact"]:
        state = build_state(base=path, device="cpu", adapters=[], prefill_pacing=None, lm_head=head)
        assert state.base.head == head.split("-")[0]
        # what `toolkit serve` prints: the kernel serving the int8 product, from the engine's process
        assert state.base.head_kernel == ("" if head == "exact" else f"{head}, asked for")
        servers[head] = LiveServer(state)
    yield servers
    for server in servers.values():
        server.stop()


def _passages(words: int, count: int, skip: int = 0) -> list[str]:
    from toolkit.base import real_weights

    text = real_weights.heldout_text().split()[skip:]
    return [" ".join(text[i * words : (i + 1) * words]) for i in range(count)]


def _completion(server, **body) -> dict:
    import httpx

    model = httpx.get(server.url + "/v1/models").json()["data"][0]["id"]
    r = httpx.post(server.url + "/v1/completions", json={"model": model, **body}, timeout=600)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


@pytest.mark.real_base
def test_the_int8_heads_perplexity_through_completions_is_within_half_a_percent(real_servers):
    passages = _passages(300, 4)  # ~1,600 held-out tokens
    nll = {}
    for head, server in real_servers.items():
        logprobs = []
        for text in passages:
            choice = _completion(server, prompt=text, echo=True, logprobs=0, max_tokens=0)
            logprobs += [lp for lp in choice["logprobs"]["token_logprobs"] if lp is not None]
        assert len(logprobs) > 1000
        nll[head] = -sum(logprobs) / len(logprobs)
    for head in nll.keys() - {"exact"}:
        ratio = math.exp(nll[head]) / math.exp(nll["exact"])
        print(f"perplexity {head} / exact: {ratio:.5f}")
        assert abs(ratio - 1) <= 0.005, (head, ratio)
        assert ratio != 1  # the int8 head's tail is not the exact head's: the gate measures something


@pytest.mark.real_base
def test_greedy_continuations_with_the_int8_head_agree_at_99_percent_of_tokens(real_servers):
    prompts = _passages(40, 24, skip=2000)  # held-out openings, away from the perplexity passages
    int8 = [head for head in real_servers if head != "exact"]
    same, total = dict.fromkeys(int8, 0), 0
    for prompt in prompts:
        tokens = {
            head: _completion(server, prompt=prompt, max_tokens=32, temperature=0, logprobs=1)["logprobs"]["tokens"]
            for head, server in real_servers.items()
        }
        total += len(tokens["exact"])
        for head in int8:
            same[head] += sum(a == b for a, b in zip(tokens[head], tokens["exact"], strict=False))
    assert total >= 24 * 16
    for head in int8:
        print(f"greedy agreement, {head}: {same[head]} of {total}")
        assert same[head] / total >= 0.99, (head, same[head], total)
