"""Builds a small random-weight Gemma 3 (text decoder + SigLIP vision tower + projector) on disk.

The folder is in the SAME format as the real ISTA-DASLab/gemma-3-27b-it-GPTQ-4b-128g checkpoint:
compressed-tensors pack-quantized W4A16 (symmetric int4, group size 128) on the language model's linear
layers only, tensors under the real checkpoint's names (`language_model.model.*`, `vision_tower.vision_model.*`,
`multi_modal_projector.*`), a locally built Gemma-style tokenizer with Gemma 3's special tokens and chat
template, a Gemma3Processor and a generation config that stops on <end_of_turn> and <eos>.
`fmt="gptq"` writes the GPTQ (GPTQModel) layout of the same weights instead.

Weights are quantised round-to-nearest through compressed-tensors (the real checkpoint used a GPTQ pass; the
format on disk is the same). Nothing here loads a model for use: that is base.py's job.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from toolkit import constants as C
from toolkit.errors import ToolkitError


@dataclass(frozen=True)
class TinySize:
    """Shapes of a built base. Language-model dims are multiples of 128 (the quantisation group size)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    context: int
    vision_hidden: int
    vision_intermediate: int
    vision_layers: int
    vision_heads: int
    image_size: int
    patch_size: int
    tokens_per_image: int


SIZES: dict[str, TinySize] = {
    # Default: tests, quickstart, benchmarks. About 4M parameters, builds in seconds.
    "tiny": TinySize(256, 768, 4, 2, 1, 128, 4096, 64, 128, 2, 2, 64, 8, 16),
    # Large enough that the quantised linears dominate: used for the memory criterion (QLoRA stays 4-bit).
    "small": TinySize(1024, 4096, 4, 8, 4, 128, 4096, 64, 128, 2, 2, 64, 8, 16),
    # The 27B's layer shapes (text and vision) with few layers: for GPU kernel, speed and memory checks.
    "27b-shapes": TinySize(5376, 21504, 2, 32, 16, 128, 32768, 1152, 4304, 2, 16, 896, 14, 256),
}

# Words that get a single token each (word-initial, "▁" = space), so short answers are short sequences.
_WORDS = """
the a an and or of to in on at for with is are was be it this that what which who where when how why yes no
not name color colour shape image picture word letter number first last reverse upper lower count answer
question capital country city red green blue yellow black white orange purple square circle triangle cross
stripe left right top bottom big small one two three four five six seven eight nine ten zero hello hi you i
me my your please thanks thank assistant user system model helpful say said repeat copy spell tell city
shape color colour which
france paris italy rome spain madrid germany berlin japan tokyo egypt cairo peru lima kenya nairobi
cat dog sun moon tree fish bird car book star house water fire apple
""".split()


# Words that start turns or answers in the quickstart data: their bare forms get merge priority.
_TURN_START_WORDS = """
user model paris rome madrid berlin tokyo cairo lima nairobi red green blue yellow black purple orange white
what name which tell
""".split()


def _vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A deterministic Gemma-style BPE vocabulary: real special-token ids for 0-6 and 105-106, byte fallback."""
    tokens = [C.PAD, C.EOS, C.BOS, C.UNK, C.MASK, "[multimodal]"]
    tokens += [f"<unused{i}>" for i in range(C.END_OF_TURN_ID - 1 - len(tokens))]
    tokens += [C.START_OF_TURN, C.END_OF_TURN, C.START_OF_IMAGE, C.END_OF_IMAGE, C.IMAGE_SOFT_TOKEN]
    assert tokens.index(C.END_OF_TURN) == C.END_OF_TURN_ID
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    tokens += ["\n", "\n\n", "▁"] + [chr(c) for c in range(33, 127)]
    merges: list[tuple[str, str]] = []
    seen = set(tokens)

    def add_chain(first: str, rest: str) -> None:
        piece = first
        for ch in rest:
            merged = piece + ch
            if merged not in seen:
                merges.append((piece, ch))
                tokens.append(merged)
                seen.add(merged)
            piece = merged

    def bpe(word: str) -> list[str]:
        ranks = {m: i for i, m in enumerate(merges)}
        parts = list(word)
        while len(parts) > 1:
            pairs = [(ranks.get((a, b), len(ranks)), i) for i, (a, b) in enumerate(zip(parts, parts[1:], strict=False))]
            rank, i = min(pairs)
            if rank == len(ranks):
                break
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
        return parts

    words = sorted(set(_WORDS))
    # Word-initial ("▁word") chains rank first and always merge whole. Bare words (turn starts such as "user",
    # "model" or an answer's first word, which have no leading space) are added after them, one at a time,
    # kept only if the word then merges whole; later merges cannot break a word that already merges whole.
    for word in words:
        for spelled in (word, word.capitalize()):
            add_chain("▁", spelled)
    first = sorted((w for w in _TURN_START_WORDS if w in words), key=lambda w: (-len(w), w))
    for word in first + sorted(set(words) - set(first), key=lambda w: (-len(w), w)):
        for spelled in (word, word.capitalize()):
            if len(spelled) < 2 or spelled in seen:
                continue
            n_merges, n_tokens = len(merges), len(tokens)
            add_chain(spelled[0], spelled[1:])
            if bpe(spelled) != [spelled]:
                for piece in tokens[n_tokens:]:
                    seen.discard(piece)
                del merges[n_merges:], tokens[n_tokens:]
    merges.append(("\n", "\n"))
    return {tok: i for i, tok in enumerate(tokens)}, merges


# Gemma 3's processor finds its image and turn tokens by these names; both bases write the same options.
TOKENIZER_OPTIONS = {
    "extra_special_tokens": {
        "boi_token": C.START_OF_IMAGE,
        "eoi_token": C.END_OF_IMAGE,
        "image_token": C.IMAGE_SOFT_TOKEN,
        "sot_token": C.START_OF_TURN,
        "eot_token": C.END_OF_TURN,
    },
    "add_bos_token": True,
    "add_eos_token": False,
}


def build_tokenizer():
    """The tiny base's tokenizer: Gemma's normaliser/decoder, Gemma 3's special tokens and chat template."""
    from transformers import GemmaTokenizer

    vocab, merges = _vocab_and_merges()
    template = (Path(__file__).parent / "gemma3.jinja").read_text()
    tok = GemmaTokenizer(
        vocab=vocab,
        merges=merges,
        **TOKENIZER_OPTIONS,
        padding_side="left",  # generation batches left-pad; the training collator pads explicitly
        chat_template=template,
    )
    return tok


def vision_config(size: TinySize) -> dict:
    """The SigLIP vision tower's config for a size (the real 270M base reuses the tiny one, random)."""
    return dict(
        hidden_size=size.vision_hidden,
        intermediate_size=size.vision_intermediate,
        num_hidden_layers=size.vision_layers,
        num_attention_heads=size.vision_heads,
        image_size=size.image_size,
        patch_size=size.patch_size,
        vision_use_head=False,
    )


def init_projector(model, size: TinySize) -> None:
    """Seeded random values for the image projector, which transformers initialises to zero (see build)."""
    projector = model.model.multi_modal_projector
    projector.mm_input_projection_weight.normal_(0.0, size.vision_hidden**-0.5)
    projector.mm_soft_emb_norm.weight.normal_(0.0, 0.1)


def build_config(size: TinySize, vocab: dict[str, int]):
    from transformers import Gemma3Config

    layer_types = ["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(size.layers)]
    layer_types[-1] = "full_attention"  # tiny stacks would otherwise never exercise a global layer
    text = dict(
        vocab_size=len(vocab),
        hidden_size=size.hidden,
        intermediate_size=size.intermediate,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.kv_heads,
        head_dim=size.head_dim,
        max_position_embeddings=size.context,
        sliding_window=C.SLIDING_WINDOW,
        layer_types=layer_types,
        query_pre_attn_scalar=size.head_dim,
        pad_token_id=vocab[C.PAD],
        bos_token_id=vocab[C.BOS],
        eos_token_id=vocab[C.EOS],
        tie_word_embeddings=True,
    )
    return Gemma3Config(
        text_config=text,
        vision_config=vision_config(size),
        mm_tokens_per_image=size.tokens_per_image,
        boi_token_index=vocab[C.START_OF_IMAGE],
        eoi_token_index=vocab[C.END_OF_IMAGE],
        image_token_index=vocab[C.IMAGE_SOFT_TOKEN],
        tie_word_embeddings=True,
    )


def build_processor(tokenizer, size: TinySize):
    from transformers import Gemma3Processor
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    image_processor = Gemma3ImageProcessorPil(
        size={"height": size.image_size, "width": size.image_size},
        image_mean=[0.5, 0.5, 0.5],  # SigLIP normalisation, as in the real preprocessor_config.json
        image_std=[0.5, 0.5, 0.5],
        do_pan_and_scan=False,
    )
    return Gemma3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=tokenizer.chat_template,
        image_seq_length=size.tokens_per_image,
    )


def generation_config(vocab: dict[str, int]):
    from transformers import GenerationConfig

    # Mirrors the real generation_config.json: stop on <end_of_turn> and <eos>, sample top-k 64 / top-p 0.95.
    return GenerationConfig(
        bos_token_id=vocab[C.BOS],
        eos_token_id=[vocab[C.END_OF_TURN], vocab[C.EOS]],
        pad_token_id=vocab[C.PAD],
        do_sample=True,
        top_k=64,
        top_p=0.95,
    )


def resolve_size(name: str, layers: int | None = None, context: int | None = None) -> TinySize:
    if name not in SIZES:
        raise ToolkitError(f"unknown size {name!r}", where="--size", fix=f"use one of: {', '.join(SIZES)}")
    size = SIZES[name]
    if layers is not None:
        if layers < 1:
            raise ToolkitError("layers must be >= 1", where="--layers", fix="pass a positive number")
        size = replace(size, layers=layers)
    if context is not None:  # the 27B's 32,768 positions on a tiny model: long-context tests and benchmarks
        if not C.SLIDING_WINDOW < context <= 131072:
            raise ToolkitError(
                f"context {context} is out of range", where="--context", fix=f"use {C.SLIDING_WINDOW + 1}..131072"
            )
        size = replace(size, context=context)
    return size


def build(
    out_dir: str | Path,
    *,
    seed: int = 0,
    size: str = "tiny",
    layers: int | None = None,
    context: int | None = None,
    fmt: str = "compressed-tensors",
    overwrite: bool = False,
) -> Path:
    """Build a random-weight 4-bit Gemma 3 in `out_dir`; same seed and size give identical tensors."""
    import torch

    from toolkit.base import quant_format

    if fmt not in ("compressed-tensors", "gptq"):
        raise ToolkitError(f"unknown format {fmt!r}", where="--format", fix="use compressed-tensors or gptq")
    shape = resolve_size(size, layers, context)
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ToolkitError(f"{out} exists and is not empty", where="DIR", fix="pick a new folder or pass --overwrite")

    tokenizer = build_tokenizer()
    vocab = tokenizer.get_vocab()
    config = build_config(shape, vocab)

    from transformers import Gemma3ForConditionalGeneration

    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config)
    # transformers initialises Gemma's (1 + w) norms and the image projector to zero, as for a model about to be
    # trained; a zero projector would make every image invisible. Give both seeded random values instead.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "language_model" in name and "norm" in name:
                p.normal_(0.0, 0.1)
        # Tied embeddings at transformers' std 0.02 cap every logit margin near 5 behind the final RMSNorm
        # (|h| ~ sqrt(hidden), |e| ~ 0.02 sqrt(hidden)), so no adapter could make an answer confident; a trained
        # model's embeddings are far larger.
        model.model.language_model.embed_tokens.weight.normal_(0.0, 0.1)
        init_projector(model, shape)
    model = model.to(torch.bfloat16)  # the real checkpoint's dtype

    with tempfile.TemporaryDirectory(dir=out.parent if out.parent.exists() else None) as tmp:
        stage = Path(tmp) / "base"
        quant_format.save_compressed_tensors(model, stage)
        processor = build_processor(tokenizer, shape)
        processor.save_pretrained(stage)
        generation_config(vocab).save_pretrained(stage)
        (stage / "toolkit_tiny_base.json").write_text(
            json.dumps({"seed": seed, "size": size, "shape": asdict(shape), "format": fmt}, indent=2) + "\n"
        )
        if fmt == "gptq":
            gptq_stage = Path(tmp) / "gptq"
            quant_format.repack_to_gptq(stage, gptq_stage)
            stage = gptq_stage
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(stage), str(out))
    return out
