"""Per-token cost of structured-output masks on CPU with a 262,144-token vocabulary: xgrammar vs llguidance vs
outlines-core (the comparison behind the choice in docs/DEPENDENCIES.md).

No real Gemma 3 tokenizer can be downloaded here, so the vocabulary is synthetic but Gemma-shaped: a
GemmaTokenizer (byte fallback, "▁" for spaces, Gemma 3's special tokens) whose 262,144 entries are BPE merge
chains of seeded pseudo-words, JSON punctuation and digits. Each library drives the same JSON document token
by token: compute the next-token mask, check the token is allowed, accept it. Prints the grammar compile
time and the median / p90 mask time per token.

    pip install --target /tmp/gram xgrammar==0.2.8 llguidance==1.9.1 outlines-core==0.2.14
    PYTHONPATH=/tmp/gram .venv/bin/python bench/grammar_mask.py [--vocab 262144]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "address": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
    "required": ["name", "age", "tags", "address"],
    "additionalProperties": False,
}
DOC = {"name": "Ada Lovelace", "age": 36, "tags": ["math", "poetry", "engines"], "address": {"city": "London"}}


def synthetic_tokenizer(size: int):
    from transformers import GemmaTokenizer

    from toolkit import constants as C

    tokens = [C.PAD, C.EOS, C.BOS, C.UNK, C.MASK, "[multimodal]"]
    tokens += [f"<unused{i}>" for i in range(C.END_OF_TURN_ID - 1 - len(tokens))]
    tokens += [C.START_OF_TURN, C.END_OF_TURN, C.START_OF_IMAGE, C.END_OF_IMAGE, C.IMAGE_SOFT_TOKEN]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    alphabet = [chr(c) for c in range(33, 127)] + ["▁", "\n"]
    tokens += alphabet
    seen, merges = set(tokens), []
    rng = random.Random(0)
    letters = "etaoinshrdlucmfwypvbgkjqxz"
    pieces = ['"', '":', '",', "{", "}", "[", "]", ",", ":", '{"', '"}', '["', '"]']

    def add_chain(word: str) -> None:
        piece = word[0]
        for ch in word[1:]:
            if len(tokens) >= size:
                return
            merged = piece + ch
            if merged not in seen:
                merges.append((piece, ch))
                tokens.append(merged)
                seen.add(merged)
            piece = merged

    for word in ["▁" + w for w in DOC["name"].split()] + ["London", "math", "poetry", "engines", "name", "age"]:
        add_chain(word)
    while len(tokens) < size:
        kind = rng.random()
        if kind < 0.7:
            word = "".join(rng.choices(letters, k=rng.randint(2, 10)))
            word = ("▁" if rng.random() < 0.6 else "") + (word.capitalize() if rng.random() < 0.2 else word)
        elif kind < 0.85:
            word = "".join(rng.choices("0123456789", k=rng.randint(2, 5)))
        else:
            word = "".join(rng.choices(pieces, k=rng.randint(2, 3)))
        add_chain(word)
    vocab = {t: i for i, t in enumerate(tokens)}
    return GemmaTokenizer(vocab=vocab, merges=merges, add_bos_token=False)


def run_llguidance(tok, doc_ids, schema):
    import llguidance
    import llguidance.hf
    import numpy as np

    t0 = time.perf_counter()
    lltok = llguidance.hf.from_tokenizer(tok, n_vocab=len(tok))
    t_tok = time.perf_counter() - t0
    t0 = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(schema)
    m = llguidance.LLMatcher(lltok, grammar)
    t_compile = time.perf_counter() - t0
    times = []
    for t in doc_ids:
        t0 = time.perf_counter()
        bits = np.unpackbits(np.frombuffer(m.compute_bitmask(), dtype=np.uint8), bitorder="little")[: len(tok)]
        times.append(time.perf_counter() - t0)
        assert bits[t], ("llguidance refused", t, tok.decode([t]))
        assert m.consume_token(t), m.get_error()
    return t_tok, t_compile, times


def run_xgrammar(tok, doc_ids, schema):
    import xgrammar as xgr

    t0 = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=len(tok))
    compiler = xgr.GrammarCompiler(info, max_threads=1)
    t_tok = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiled = compiler.compile_json_schema(json.dumps(schema), strict_mode=True)
    t_compile = time.perf_counter() - t0
    m = xgr.GrammarMatcher(compiled)
    mask = xgr.allocate_token_bitmask(1, len(tok))
    times = []
    for t in doc_ids:
        t0 = time.perf_counter()
        m.fill_next_token_bitmask(mask)
        allowed = ((mask[0, t // 32] >> (t % 32)) & 1).item()
        times.append(time.perf_counter() - t0)
        assert allowed, ("xgrammar refused", t, tok.decode([t]))
        assert m.accept_token(t)
    return t_tok, t_compile, times


def run_outlines(tok, doc_ids, schema):
    import outlines_core as oc

    t0 = time.perf_counter()
    by_text: dict[str, list[int]] = {}
    for text, i in tok.get_vocab().items():
        if i == tok.eos_token_id or (text.startswith("<") and text.endswith(">")):
            continue
        by_text.setdefault(text.replace("▁", " "), []).append(i)
    vocab = oc.Vocabulary(tok.eos_token_id, by_text)
    t_tok = time.perf_counter() - t0
    t0 = time.perf_counter()
    index = oc.Index(oc.json_schema.build_regex_from_schema(json.dumps(schema)), vocab)
    t_compile = time.perf_counter() - t0
    guide = oc.Guide(index)
    times = []
    for t in doc_ids:
        t0 = time.perf_counter()
        allowed = set(guide.get_tokens())
        times.append(time.perf_counter() - t0)
        assert t in allowed, ("outlines refused", t, tok.decode([t]))
        guide.advance(t)
    return t_tok, t_compile, times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--vocab", type=int, default=262_144)
    args = parser.parse_args()
    t0 = time.perf_counter()
    tok = synthetic_tokenizer(args.vocab)
    print(f"synthetic Gemma-style tokenizer: {len(tok)} tokens ({time.perf_counter() - t0:.1f} s to build)")
    doc_ids = tok.encode(json.dumps(DOC, separators=(",", ":")), add_special_tokens=False)
    print(f"document: {len(doc_ids)} tokens")
    for name, fn in (("llguidance", run_llguidance), ("xgrammar", run_xgrammar), ("outlines-core", run_outlines)):
        try:
            t_tok, t_compile, times = fn(tok, doc_ids, SCHEMA)
        except Exception as exc:  # report and go on: one library failing is a finding, not a crash
            print(f"{name:14s} FAILED: {type(exc).__name__}: {str(exc)[:200]}")
            continue
        us = sorted(x * 1e6 for x in times)
        print(
            f"{name:14s} tokenizer setup {t_tok:7.2f} s  schema compile {t_compile * 1e3:9.1f} ms  "
            f"mask per token median {statistics.median(us):8.0f} us  p90 {us[int(0.9 * len(us))]:8.0f} us  "
            f"max {us[-1]:8.0f} us"
        )


if __name__ == "__main__":
    main()
