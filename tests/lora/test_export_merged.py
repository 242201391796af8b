"""The merged export: the 4-bit base dequantised (bit for bit as the kernels do) with the LoRA added, written as a
plain transformers folder that a fresh interpreter loads without toolkit, peft, GPTQModel or compressed-tensors and
that gives the toolkit's base + adapter logits and greedy answers, text and image prompts alike."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import ROOT

from toolkit.errors import ToolkitError
from toolkit.lora.export_merged import merged_problems, write_merged
from toolkit.lora.weights import load_lora

EVAL = ROOT / "recipes" / "data" / "quickstart" / "eval.jsonl"
# Tolerances on the logits (tiny base: logits up to ~20). float32: the merged matmul (W + s B A) x against peft's
# W x + s B (A x), float32 rounding only (measured ~1e-5). bfloat16: the merged weights rounded to bfloat16 and the
# whole forward computed in it, as a user loading that folder gets (measured max 0.12, mean 0.008).
F32_MAX = 1e-4
BF16_MAX, BF16_MEAN = 0.5, 0.05

# Runs in a fresh interpreter: these packages cannot be imported there, and none is in sys.modules at the end.
PLAIN = textwrap.dedent(
    """
    import importlib.abc, importlib.machinery, json, sys

    BLOCKED = {"toolkit", "peft", "gptqmodel", "compressed_tensors", "cli"}

    class Block(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                return importlib.machinery.ModuleSpec(name, self)
        def create_module(self, spec):
            raise ImportError(f"{spec.name} is blocked: the merged folder must load without it")
        def exec_module(self, module):
            pass

    sys.meta_path.insert(0, Block())
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    jobs, out_file = json.load(open(sys.argv[1])), sys.argv[2]
    results = {}
    for folder, prompts in jobs.items():
        model = AutoModelForImageTextToText.from_pretrained(folder).eval()
        processor = AutoProcessor.from_pretrained(folder)
        linears = {type(m).__module__ + "." + type(m).__name__ for n, m in model.named_modules() if n.endswith("proj")}
        rows = []
        for messages in prompts:
            inputs = processor.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
            )
            with torch.no_grad():
                logits = model(**inputs).logits[0].float()
                ids = model.generate(**inputs, max_new_tokens=8, do_sample=False, top_p=None, top_k=None)
            rows.append({"inputs": dict(inputs), "logits": logits, "answer": ids[0, inputs["input_ids"].shape[1]:]})
        results[folder] = {"dtype": str(model.dtype), "linears": sorted(linears), "rows": rows}
    results["imported"] = sorted({m.split(".")[0] for m in sys.modules} & BLOCKED)
    torch.save(results, out_file)
    """
)


def _held_out() -> list[list[dict]]:
    """The quickstart's held-out questions as transformers chat messages (images as local paths)."""
    prompts = []
    for line in EVAL.read_text().splitlines():
        user = json.loads(line)["messages"][0]
        if isinstance(user["content"], list):
            parts = []
            for part in user["content"]:
                if part["type"] == "text":
                    parts.append({"type": "text", "text": part["text"]})
                else:
                    parts.append({"type": "image", "url": str(EVAL.parent / part["image_url"]["url"])})
            user = {"role": "user", "content": parts}
        prompts.append([user])
    return prompts


def _image_prompt(path: Path) -> list[dict]:
    return [
        {
            "role": "user",
            "content": [{"type": "text", "text": "What color is the square?"}, {"type": "image", "url": str(path)}],
        }
    ]


def _vision_adapter(trained_dir: Path, out: Path) -> Path:
    """The quickstart adapter plus random LoRA on two vision-tower layers (the quickstart adapts text only)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(trained_dir, out)
    tensors = load_file(out / "adapter_model.safetensors")
    g = torch.Generator().manual_seed(0)
    for name, (cols, rows) in {"self_attn.q_proj": (64, 64), "mlp.fc1": (64, 128)}.items():
        key = f"base_model.model.model.vision_tower.encoder.layers.0.{name}"
        tensors[f"{key}.lora_A.weight"] = torch.randn(16, cols, generator=g) * 0.2
        tensors[f"{key}.lora_B.weight"] = torch.randn(rows, 16, generator=g) * 0.2
    save_file(tensors, out / "adapter_model.safetensors")
    config = json.loads((out / "adapter_config.json").read_text())
    config["target_modules"] = (
        f"(?:{config['target_modules']})|.*vision_tower\\.encoder\\.layers\\.0\\.(self_attn\\.q_proj|mlp\\.fc1)"
    )
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


def _reference(base_dir: Path, adapter_dir: Path):
    """The toolkit's base + adapter: the 4-bit base on the float32 reference kernel, the adapter attached by peft."""
    from toolkit.base.loader import load_base
    from toolkit.lora.registry import attach

    return attach(load_base(base_dir, device="cpu", kernel="torch"), [("a", adapter_dir)])


@pytest.fixture(scope="module")
def exported(trained, tiny_ct, tiny_gptq, images, tmp_path_factory):
    """Merged folders (float32, bfloat16, both base formats, a vision LoRA) and what plain transformers made of them."""
    root = tmp_path_factory.mktemp("merged")
    adapter = load_lora(trained.adapter_dir)
    vision_dir = _vision_adapter(Path(trained.adapter_dir), root / "vision-adapter")
    folders = {}
    lines: list[str] = []
    for key, (lora, base, dtype) in {
        "f32": (adapter, tiny_ct, "float32"),
        "bf16": (adapter, tiny_ct, "bfloat16"),
        "f32-gptq": (adapter, tiny_gptq, "float32"),
        "vision": (load_lora(vision_dir), tiny_ct, "float32"),
    }.items():
        (root / key).mkdir()
        files = write_merged(lora, root / key, base=base, dtype=dtype, progress=lines.append)
        folders[key] = (root / key, files)
    held_out = _held_out()
    image_prompts = [_image_prompt(images["red"]), _image_prompt(images["blue"])]
    jobs = {
        str(folders["f32"][0]): held_out + image_prompts,
        str(folders["bf16"][0]): held_out + image_prompts,
        str(folders["vision"][0]): image_prompts,
    }
    (root / "jobs.json").write_text(json.dumps(jobs))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    done = subprocess.run(
        [sys.executable, "-c", PLAIN, str(root / "jobs.json"), str(root / "plain.pt")],
        cwd=root,  # not the repository: `toolkit` is not importable from the working directory either
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    plain = torch.load(root / "plain.pt", weights_only=False)
    return {
        "folders": folders,
        "plain": plain,
        "lines": lines,
        "vision_dir": vision_dir,
        "jobs": jobs,
    }


@pytest.fixture(scope="module")
def reference(trained, tiny_ct):
    return _reference(tiny_ct, Path(trained.adapter_dir))


def _teacher_forced(model, row: dict) -> torch.Tensor:
    """The model's float32 logits over a plain-transformers row's prompt followed by its greedy answer: one forward
    gives the prompt's logits and, position by position, the token greedy decoding would pick after each prefix
    of the answer (so equal argmaxes mean an equal greedy answer, without a generate loop)."""
    inputs = row["inputs"]
    answer = row["answer"][None]
    forced = {
        "input_ids": torch.cat([inputs["input_ids"], answer], 1),
        "attention_mask": torch.ones(1, inputs["input_ids"].shape[1] + answer.shape[1], dtype=torch.long),
        "token_type_ids": torch.cat([inputs["token_type_ids"], torch.zeros_like(answer)], 1),
    }
    if "pixel_values" in inputs:
        forced["pixel_values"] = inputs["pixel_values"].float()
    with torch.no_grad():
        return model(**forced).logits[0].float()


def _compare(model, row: dict) -> tuple[torch.Tensor, bool]:
    """|logit difference| over the prompt, and whether `model` decodes the row's greedy answer too."""
    logits = _teacher_forced(model, row)
    prompt = row["inputs"]["input_ids"].shape[1]
    picks = logits[prompt - 1 : prompt - 1 + row["answer"].shape[0]].argmax(-1)
    return (logits[:prompt] - row["logits"]).abs(), torch.equal(picks, row["answer"])


def test_folder_is_plain_transformers(exported):
    folder, files = exported["folders"]["f32"]
    names = {p.name for p in folder.iterdir()}
    assert names == set(files)
    assert not names & {"adapter_config.json", "adapter_model.safetensors", "toolkit.json"}
    assert not [n for n in names if n.startswith("toolkit") or n.startswith(".")]
    assert {"model-00001-of-00001.safetensors", "model.safetensors.index.json", "chat_template.jinja"} <= names
    assert {"tokenizer.json", "processor_config.json", "generation_config.json"} <= names
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == config["torch_dtype"] == "float32"
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {"model-00001-of-00001.safetensors"}
    assert not [k for k in index["weight_map"] if k.endswith(("weight_packed", "weight_scale", "qweight", "scales"))]
    plain = exported["plain"]
    assert plain["imported"] == []  # loaded and ran with toolkit, peft, GPTQModel and compressed-tensors blocked
    for key in ("f32", "bf16", "vision"):
        assert plain[str(exported["folders"][key][0])]["linears"] == ["torch.nn.modules.linear.Linear"]
    assert plain[str(exported["folders"]["f32"][0])]["dtype"] == "torch.float32"
    assert plain[str(exported["folders"]["bf16"][0])]["dtype"] == "torch.bfloat16"
    assert any("shard" in line for line in exported["lines"])


def test_float32_logits_and_answers_equal_the_toolkits(exported, reference):
    """Every held-out prompt (text and image) and the red/blue squares: logits within F32_MAX, same greedy answer."""
    rows = exported["plain"][str(exported["folders"]["f32"][0])]["rows"]
    assert len(rows) == len(_held_out()) + 2 and any("pixel_values" in r["inputs"] for r in rows)
    for row in rows:
        diff, same_answer = _compare(reference, row)
        assert diff.max().item() < F32_MAX and same_answer


def test_bfloat16_logits_close_and_answers_equal(exported, reference):
    rows = exported["plain"][str(exported["folders"]["bf16"][0])]["rows"]
    for row in rows:
        diff, same_answer = _compare(reference, row)
        assert diff.max().item() < BF16_MAX and diff.mean().item() < BF16_MEAN and same_answer


def test_prompt_is_the_serving_prompt(exported, tiny_ct):
    """The chat template copied into the folder gives the very ids the toolkit serves, for text and image prompts."""
    from PIL import Image

    from toolkit.base.loader import load_processor
    from toolkit.data.schema import check_messages
    from toolkit.data.template import encode_prompt

    processor = load_processor(tiny_ct)
    rows = exported["plain"][str(exported["folders"]["f32"][0])]["rows"]
    for messages, row in zip(_held_out(), rows, strict=False):
        content = messages[0]["content"]
        if isinstance(content, str):
            toolkit_messages, images = messages, []
        else:  # the toolkit's schema names an image part image_url
            parts = [
                p if p["type"] == "text" else {"type": "image_url", "image_url": {"url": p["url"]}} for p in content
            ]
            toolkit_messages = [{"role": "user", "content": parts}]
            images = [Image.open(p["url"]).convert("RGB") for p in content if p["type"] == "image"]
        parsed, problems = check_messages(toolkit_messages, purpose="request")
        assert not problems
        encoded = encode_prompt(processor, parsed, images)
        assert row["inputs"]["input_ids"][0].tolist() == encoded.input_ids


def test_vision_lora_is_merged(exported, tiny_ct, reference):
    """A LoRA on the vision tower is merged too: image logits equal peft's with it, and differ from without it."""
    vision = _reference(tiny_ct, exported["vision_dir"])
    rows = exported["plain"][str(exported["folders"]["vision"][0])]["rows"]
    for row in rows:
        assert _compare(vision, row)[0].max().item() < F32_MAX
        assert _compare(reference, row)[0].max().item() > 100 * F32_MAX  # the vision LoRA changes image logits


def test_both_base_formats_give_the_same_tensors(exported):
    from safetensors.torch import load_file

    ct = load_file(exported["folders"]["f32"][0] / "model-00001-of-00001.safetensors")
    gptq = load_file(exported["folders"]["f32-gptq"][0] / "model-00001-of-00001.safetensors")
    assert ct.keys() == gptq.keys()
    assert all(torch.equal(ct[k], gptq[k]) for k in ct)
    bf16 = load_file(exported["folders"]["bf16"][0] / "model-00001-of-00001.safetensors")
    assert {v.dtype for v in bf16.values()} == {torch.bfloat16}
    assert all(torch.equal(bf16[k], ct[k].to(torch.bfloat16)) for k in ct)  # one rounding, of the float32 sum


def test_dequantisation_is_the_kernels_bit_for_bit(exported, reference, trained):
    """Each merged linear minus the adapter's update is exactly the weight GPTQModel's reference kernel computes."""
    from safetensors.torch import load_file

    from toolkit.base.quant_format import checkpoint_name

    merged = load_file(exported["folders"]["f32"][0] / "model-00001-of-00001.safetensors")
    lora = {m.name: m for m in load_lora(trained.adapter_dir).modules}
    checked = 0
    for name, module in reference.named_modules():
        if not hasattr(module, "dequantize_weight"):
            continue
        module_name = name.removeprefix("base_model.model.").removesuffix(".base_layer")
        kernel = module.dequantize_weight().t().float()
        weight = merged[checkpoint_name(module_name) + ".weight"]
        assert torch.equal(weight, kernel + lora[module_name].delta()), module_name
        checked += 1
    assert checked == 4 * 7


def _variant(trained_dir: Path, out: Path, config: dict, tensors: dict | None = None) -> Path:
    from safetensors.torch import load_file, save_file

    shutil.copytree(trained_dir, out)
    cfg = {**json.loads((out / "adapter_config.json").read_text()), **config}
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    if tensors:
        save_file({**load_file(out / "adapter_model.safetensors"), **tensors}, out / "adapter_model.safetensors")
    return out


@pytest.mark.parametrize(
    ("config", "tensors", "reason"),
    [
        (
            {"use_dora": True},
            {"base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_magnitude_vector": torch.ones(256)},
            "DoRA",
        ),
        ({"modules_to_save": ["lm_head"]}, None, "modules_to_save"),
        ({"bias": "all"}, None, "LoRA biases"),
        (
            {},
            {
                "base_model.model.model.language_model.layers.9.self_attn.q_proj.lora_A.weight": torch.zeros(16, 256),
                "base_model.model.model.language_model.layers.9.self_attn.q_proj.lora_B.weight": torch.zeros(256, 16),
            },
            "layers.9.self_attn.q_proj: LoRA module whose weight is not in the base",
        ),
    ],
)
def test_what_cannot_be_merged_is_refused_by_name(trained, tiny_ct, tmp_path, config, tensors, reason):
    adapter = load_lora(_variant(Path(trained.adapter_dir), tmp_path / "variant", config, tensors))
    assert any(reason in r for r in merged_problems(adapter, base=tiny_ct))
    (tmp_path / "out").mkdir()
    with pytest.raises(ToolkitError, match=reason.split(":")[0].replace(".", r"\.")):
        write_merged(adapter, tmp_path / "out", base=tiny_ct)
    assert not any((tmp_path / "out").iterdir())


def test_plain_adapter_has_no_problems_and_float16_is_refused(trained, tiny_ct, tmp_path):
    adapter = load_lora(trained.adapter_dir)
    assert merged_problems(adapter) == [] and merged_problems(adapter, base=tiny_ct) == []
    with pytest.raises(ToolkitError, match="float16"):
        write_merged(adapter, tmp_path, base=tiny_ct, dtype="float16")
    assert not any(tmp_path.iterdir())


def test_quantize_writes_a_base_the_toolkit_loads(trained, tiny_ct, tmp_path):
    """--quantize gptq: the merge GPTQ-quantised again into the 27B's format, a new base with its own fingerprint
    that the toolkit loads, each layer within 4-bit rounding of the float32 merge."""
    from safetensors.torch import load_file

    from toolkit.base.loader import load_base
    from toolkit.base.quant_format import dequantize_packed
    from toolkit.lora.registry import check_base_matches

    adapter = load_lora(trained.adapter_dir)
    (tmp_path / "q").mkdir()
    (tmp_path / "f32").mkdir()
    files = write_merged(adapter, tmp_path / "q", base=tiny_ct, quantize=True)
    write_merged(adapter, tmp_path / "f32", base=tiny_ct, dtype="float32")
    assert "model-00001-of-00001.safetensors" in files and not list(tmp_path.glob(".*"))  # temporaries removed
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization_config"]["format"] == "pack-quantized"
    assert config["toolkit_merged"]["adapter"] == Path(trained.adapter_dir).name
    q = load_file(tmp_path / "q" / "model-00001-of-00001.safetensors")
    merged = load_file(tmp_path / "f32" / "model-00001-of-00001.safetensors")
    layers = [k.removesuffix(".weight_packed") for k in q if k.endswith(".weight_packed")]
    assert len(layers) == 4 * 7
    for layer in layers:
        weight = dequantize_packed(q[layer + ".weight_packed"], q[layer + ".weight_scale"])
        exact = merged[layer + ".weight"]
        step = q[layer + ".weight_scale"].float().repeat_interleave(128, dim=1)  # one 4-bit step per weight
        # int4 keeps ~12% relative error on these random weights (measured 0.12-0.13); GPTQ's error feedback moves a
        # weight by up to ~2.5 steps (measured), never to another part of the grid
        assert ((weight - exact).abs() <= 4 * step).all(), layer
        assert (weight - exact).norm() < 0.2 * exact.norm(), layer
    loaded = load_base(tmp_path / "q", device="cpu")
    assert loaded.spec.format == "compressed-tensors"
    with pytest.raises(ToolkitError, match="was trained on base"):  # the adapter is inside it already
        check_base_matches(Path(trained.adapter_dir), loaded)


def test_calibration_runs_come_from_the_training_rows(trained, tiny_ct, tmp_path):
    from toolkit.lora.export_merged import calibration_ids

    runs = calibration_ids(load_lora(trained.adapter_dir), tiny_ct, samples=4, tokens=64)
    assert len(runs) == 4 and {len(r) for r in runs} == {64} and {r[0] for r in runs} == {2}  # <bos>
    rows = tmp_path / "few.jsonl"
    rows.write_text(
        json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "red"}]})
    )
    with pytest.raises(ToolkitError, match="fewer than one calibration run"):
        calibration_ids(load_lora(trained.adapter_dir), tiny_ct, rows, samples=4, tokens=64)
