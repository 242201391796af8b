"""Recipes: YAML files mapped one-to-one onto typed sections (base, data, lora, training, eval, output).

Unknown keys are refused with the closest valid key suggested; wrong types are refused with the field path
and the YAML line. `--set a.b=value` overrides any field (the value is read as YAML). Relative paths in a
recipe are relative to the directory the command runs from. docs/RECIPES.md is generated from these models
(`toolkit recipe-reference`); a test keeps it in sync.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from toolkit.errors import ToolkitError

DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_default=True)


class BaseSection(_Section):
    path: str
    """Base checkpoint: a local folder or a hub id of a 4-bit Gemma 3 (compressed-tensors or GPTQ format)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to run: auto picks CUDA when present, else CPU (the kernel picks the dtype: bfloat16 or float32)."""
    tiny_seed: int | None = None
    """Quickstart and tests: when set and `path` does not exist, build the tiny random base there with this seed."""
    kernel: Literal[
        "auto", "torch", "torch_aten", "torch_fused", "cpu_avx512", "marlin", "exllama_v2", "machete", "triton"
    ] = "auto"
    """GPTQ kernel for the 4-bit layers: auto (measured per device and phase; `toolkit info` shows it) or one."""
    lm_head: Literal["auto", "exact", "int8", "int8-weight-only", "int8-dynamic"] = "auto"
    """LM head for evaluation and serving: auto (int8 rows on a CPU for a large head, the top candidates rescored
    exactly; `toolkit info` shows it), exact, int8 (its faster kernel, timed once per machine), int8-weight-only or
    int8-dynamic (int8 x int8, CPUs with VNNI). Training always uses the exact head."""


# the fields a dataset format reads (toolkit/data/formats.py), which data.columns may rename
DataColumn = Literal[
    "messages",
    "role",
    "content",
    "images",
    "system",
    "instruction",
    "input",
    "output",
    "history",
    "prompt",
    "completion",
    "chosen",
    "rejected",
    "label",
    "regex",
]


class DataSection(_Section):
    train: str
    """Training rows: a .jsonl, .json or .parquet file, a datasets.save_to_disk folder, or a hub dataset name."""
    eval: str | None = None
    """Held-out rows in the same forms; when absent, eval_fraction of the training rows is held out."""
    format: Literal["auto", "messages", "sharegpt", "alpaca", "prompt_completion", "prompt", "preference", "kto"] = (
        "auto"
    )
    """Row shape of train/eval files (docs/DATA.md); auto: from the first row's fields (`toolkit validate` says).
    preference: pairs (chosen and rejected answers to one prompt); kto: one answer with a true / false label;
    prompt: TRL's prompt-only rows (`prompt`, a string or messages), for grpo."""
    columns: dict[DataColumn, str] = Field(default_factory=dict)
    """Your field names for the format's fields, e.g. {messages: dialog, role: speaker, content: text, images: pics}."""
    roles: dict[str, Literal["system", "developer", "user", "assistant"]] = Field(default_factory=dict)
    """Your role names -> the schema's roles, e.g. {human: user, bot: assistant} (ShareGPT's human/gpt are known)."""
    eval_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    """Fraction of training rows held out for evaluation when no eval file is given."""
    split_seed: int = 0
    """Seed of the train/eval split (the same seed gives the same split)."""
    hub_split: str = "train"
    """Split to read when `train` or `eval` is a hub dataset name."""
    max_seq_len: int = Field(2048, ge=16, le=32768)
    """Longest conversation in tokens (images count 256 tokens each on the real base). Up to 32768."""
    overlong: Literal["error", "truncate", "drop"] = "error"
    """Rows over max_seq_len: error (a bad row), truncate (keep the start; counted), or drop (counted)."""
    on_bad_row: Literal["error", "skip"] = "error"
    """Bad rows stop with file:row and field (error), or are skipped, counted and listed (skip)."""
    max_images_per_conversation: int = Field(8, ge=0)
    """Most images one conversation may hold."""
    max_image_pixels: int = Field(50_000_000, ge=1)
    """Largest image in pixels (width x height); guards against decompression bombs."""
    max_image_bytes: int = Field(20 * 2**20, ge=1)
    """Largest image file or download in bytes."""
    image_timeout_s: float = Field(10.0, gt=0)
    """Timeout for fetching an http(s) image (fetched images are cached on disk)."""


class LoraSection(_Section):
    r: int = Field(16, ge=1)
    """LoRA rank."""
    alpha: float = Field(32, gt=0)
    """LoRA scaling numerator (scale = alpha / r, or alpha / sqrt(r) with rslora)."""
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    """Dropout on the LoRA input."""
    target_modules: list[str] = Field(default_factory=lambda: list(DEFAULT_TARGETS))
    """Language-model linear layers to adapt (by name)."""
    include_vision: bool = False
    """Also adapt the vision tower and projector linears (off: only the language model is adapted)."""
    rslora: bool = False
    """Rank-stabilised LoRA scaling."""
    dora: bool = False
    """Weight-decomposed LoRA (DoRA), where peft supports it on GPTQ layers."""


METHODS = ("sft", "dpo", "kto", "orpo", "simpo", "grpo")
PAIRED_METHODS = ("dpo", "orpo", "simpo")  # they need a chosen and a rejected answer to the same prompt
# TRL 1.16's DPOTrainer loss types (DPOConfig.loss_type)
DPO_LOSS_NAMES = (
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
)
# TRL 1.16's GRPOTrainer loss types (GRPOConfig.loss_type); luspo and vespo need sequence-level settings not offered
GRPO_LOSSES = ("dapo", "grpo", "dr_grpo", "bnpo", "cispo", "sapo")
# beta when the recipe gives none: TRL's defaults (DPO, KTO, ORPO's lambda; GRPO's KL weight, 0: no reference pass);
# SimPO's paper range (2.0 to 2.5)
DEFAULT_BETA = {"dpo": 0.1, "kto": 0.1, "orpo": 0.1, "simpo": 2.0, "grpo": 0.0}
DEFAULT_LOSS = {"dpo": ["sigmoid"], "grpo": ["dapo"]}
# the training keys only grpo reads (a grpo recipe's other methods' keys, and these in theirs, are refused)
GRPO_KEYS = (
    "rewards",
    "num_generations",
    "max_completion_length",
    "temperature",
    "top_p",
    "top_k",
    "epsilon",
    "epsilon_high",
    "steps_per_generation",
    "num_iterations",
    "scale_rewards",
    "mask_truncated_completions",
)


class RewardSpec(_Section):
    """One reward of a grpo recipe (docs/TRAINING.md, "GRPO"): a built-in or your own Python function."""

    type: Literal["exact", "contains", "regex", "json_schema", "length", "function"]
    """exact / contains: the answer equals / contains a column's value; regex: `pattern` (or a column's pattern)
    matches (re.search); json_schema: the answer is JSON valid against a column's schema; length: near `target`
    tokens; function: `path: file.py:name` with TRL's signature (prompts, completions, **columns) -> list[float]."""
    weight: float = 1.0
    """Weight in the summed reward."""
    column: str | None = None
    """The row's column to compare with: exact / contains `answer`, json_schema `schema`; regex: instead of pattern."""
    pattern: str | None = None
    """regex: the pattern every answer should match."""
    target: int | None = Field(None, ge=1)
    """length: the answer's target length in tokens (reward 1 - |n - target| / target, at least 0)."""
    path: str | None = None
    """function: `file.py:function`, the file relative to the recipe."""
    name: str | None = None
    """Its name in metrics (default: the type, or the function's name)."""

    @model_validator(mode="after")
    def _fields_of_the_type(self) -> RewardSpec:
        allowed = {
            "exact": {"column"},
            "contains": {"column"},
            "regex": {"pattern", "column"},
            "json_schema": {"column"},
            "length": {"target"},
            "function": {"path"},
        }[self.type]
        for key in ("column", "pattern", "target", "path"):
            if key in self.model_fields_set and key not in allowed:
                takes = ", ".join(sorted(allowed))
                raise ValueError(f"{key} is not a setting of a {self.type} reward (it takes {takes})")
        if self.type == "regex":
            if (self.pattern is None) == (self.column is None):
                raise ValueError("a regex reward takes a pattern or a column (of per-row patterns), one of them")
            if self.pattern is not None:
                try:
                    re.compile(self.pattern)
                except re.error as exc:
                    raise ValueError(f"pattern is not a valid regular expression ({exc})") from None
        if self.type == "length" and self.target is None:
            raise ValueError("a length reward needs target: N (tokens)")
        if self.type == "function" and (self.path is None or ":" not in self.path):
            raise ValueError("a function reward needs path: file.py:function_name (the file relative to the recipe)")
        return self


class TrainingSection(_Section):
    method: Literal["sft", "dpo", "kto", "orpo", "simpo", "grpo"] = "sft"
    """sft (supervised, on conversations); a preference method: dpo, orpo, simpo (pairs: a chosen and a rejected
    answer) or kto (answers labelled desirable or not; pairs are split into one of each); or grpo (online RL on
    prompts, scored by `rewards`). docs/TRAINING.md."""
    init_adapter: str | None = None
    """Continue from an adapter (a name under output.dir, or a folder): its weights start the new adapter, and for
    dpo, kto and grpo (beta > 0) it is also the frozen reference (not the bare base). Same base (fingerprint)."""
    beta: float | None = Field(None, ge=0)
    """Preference strength: DPO / KTO's KL weight (default 0.1), ORPO's lambda (0.1), SimPO's reward scale (2.0);
    GRPO's KL weight (default 0: no reference pass)."""
    loss_type: list[str] | None = None
    """dpo: TRL's DPO loss types (one or several, summed), e.g. [sigmoid] (default), [ipo], [hinge], [sigmoid, sft].
    grpo: one of dapo (default), grpo, dr_grpo, bnpo, cispo, sapo (TRL's GRPO losses)."""
    rpo_alpha: float | None = Field(None, ge=0)
    """dpo: add the chosen answers' NLL with this weight (RPO: DPO + NLL; TRL's `sft` loss type)."""
    desirable_weight: float = Field(1.0, gt=0)
    """kto: weight of the desirable answers' loss (raise it when they are fewer than the undesirable ones)."""
    undesirable_weight: float = Field(1.0, gt=0)
    """kto: weight of the undesirable answers' loss."""
    gamma: float = Field(1.0, ge=0)
    """simpo: target reward margin (TRL's simpo_gamma); the paper's gamma / beta of 0.5 with beta 2.0."""
    rewards: list[RewardSpec] = Field(default_factory=list)
    """grpo: the rewards, summed with their weights, e.g. [{type: regex, pattern: '^[A-Z ]+$'}] (RewardSpec keys:
    type, weight, column, pattern, target, path, name; docs/TRAINING.md)."""
    num_generations: int = Field(8, ge=2)
    """grpo: completions sampled per prompt (the group whose rewards are compared)."""
    max_completion_length: int = Field(256, ge=1)
    """grpo: longest completion in tokens."""
    temperature: float = Field(1.0, gt=0)
    """grpo: sampling temperature of the rollouts (and of the log-probabilities trained on)."""
    top_p: float = Field(1.0, gt=0, le=1)
    """grpo: nucleus sampling of the rollouts (1: off)."""
    top_k: int = Field(0, ge=0)
    """grpo: top-k sampling of the rollouts (0: off)."""
    epsilon: float = Field(0.2, gt=0)
    """grpo: clipping range of the policy ratio (TRL's epsilon)."""
    epsilon_high: float | None = Field(None, gt=0)
    """grpo: upper clipping bound (DAPO's clip-higher; default: epsilon)."""
    steps_per_generation: int | None = Field(None, ge=1)
    """grpo: forward passes served by one rollout batch (default grad_accum: one rollout per optimizer step)."""
    num_iterations: int = Field(1, ge=1)
    """grpo: optimisation passes over each rollout batch (TRL's mu)."""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """grpo: advantages divided by the group's reward std (group), the batch's (batch) or not (none: Dr. GRPO)."""
    mask_truncated_completions: bool = False
    """grpo: leave completions cut at max_completion_length out of the loss (DAPO)."""
    epochs: float = Field(1.0, gt=0)
    """Passes over the training rows (ignored when max_steps > 0)."""
    max_steps: int = -1
    """Optimizer steps to run; -1 trains for `epochs`."""
    learning_rate: float = Field(2e-4, gt=0)
    """Peak learning rate."""
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "cosine"
    """Learning-rate schedule after warmup."""
    warmup_ratio: float = Field(0.03, ge=0.0, lt=1.0)
    """Fraction of steps spent warming up."""
    batch_size: int = Field(1, ge=1)
    """Conversations per device per forward pass."""
    grad_accum: int = Field(8, ge=1)
    """Forward passes per optimizer step."""
    gradient_checkpointing: bool = True
    """Recompute activations in the backward pass to save memory."""
    chunked_loss: Literal["auto", "on", "off"] = "auto"
    """Loss over the 262k vocabulary in chunks (TRL's fused LM head), never the full fp32 logits of a row: needed
    for long rows (32k tokens would hold 31 GB of logits). auto: on (off: the model's own loss, to compare)."""
    seed: int = 0
    """Seed for initialisation, dropout and data order."""
    eval_every: int = Field(0, ge=0)
    """Evaluate on the held-out rows every N steps (0: at the end only)."""
    save_every: int = Field(0, ge=0)
    """Write a resumable checkpoint every N steps (0: only at the end)."""
    logging_every: int = Field(10, ge=1)
    """Log metrics every N steps."""
    packing: bool = False
    """Pack conversations into one sequence: refused for Gemma 3 (needs flash-attention varlen kernels, and image
    tokens would attend across rows); batches are padded instead."""

    @field_validator("chunked_loss", mode="before")
    @classmethod
    def _yaml_on_off(cls, v: Any) -> Any:
        return {True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v  # YAML reads on/off as booleans

    @field_validator("loss_type", mode="before")
    @classmethod
    def _one_loss(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v  # TRL accepts one name or a list

    @model_validator(mode="after")
    def _settings_of_the_method(self) -> TrainingSection:
        # a setting of another method would be silently ignored: refuse it, naming the method it belongs to
        grpo = ("grpo",)
        owners = {
            "beta": ("dpo", "kto", "orpo", "simpo", "grpo"),
            "loss_type": ("dpo", "grpo"),
            "rpo_alpha": ("dpo",),
            "desirable_weight": ("kto",),
            "undesirable_weight": ("kto",),
            "gamma": ("simpo",),
            **dict.fromkeys(GRPO_KEYS, grpo),
        }
        for key, methods in owners.items():
            if key in self.model_fields_set and self.method not in methods:
                raise ValueError(
                    f"{key} is a setting of {' / '.join(methods)}, and training.method is {self.method} "
                    f"(remove {key}, or set training.method)"
                )
        if self.beta == 0 and self.method != "grpo":
            raise ValueError(f"beta must be greater than 0 for {self.method}")
        losses = self.losses
        if self.method == "dpo":
            wrong = [x for x in losses if x not in DPO_LOSS_NAMES]
            if wrong:
                raise ValueError(f"loss_type {wrong[0]!r} is not a DPO loss of TRL 1.16 ({', '.join(DPO_LOSS_NAMES)})")
        if self.method == "grpo":
            self._check_grpo()
        if self.method == "kto" and self.batch_size < 2:
            raise ValueError(
                "kto estimates its KL term from the other answers of a batch, so it needs training.batch_size >= 2 "
                "(TRL's rule); set training.batch_size: 2 or more"
            )
        return self

    def _check_grpo(self) -> None:
        if len(self.losses) != 1 or self.losses[0] not in GRPO_LOSSES:
            raise ValueError(f"grpo takes one loss_type, one of {', '.join(GRPO_LOSSES)} (got {self.loss_type!r})")
        if not self.rewards:
            raise ValueError(
                "grpo needs at least one reward: training.rewards: [{type: regex, pattern: '...'}] or "
                "[{type: function, path: rewards.py:my_reward}] (docs/TRAINING.md)"
            )
        if self.eval_every:
            raise ValueError(
                "grpo scores its held-out prompts once, at the end (the greedy answer's rewards, base vs adapter); "
                "remove eval_every"
            )
        per_generation = self.batch_size * (self.steps_per_generation or self.grad_accum)
        if per_generation % self.num_generations:
            raise ValueError(
                f"a rollout batch holds batch_size x steps_per_generation = {per_generation} completions, which must "
                f"be a multiple of num_generations ({self.num_generations}): whole groups of one prompt (TRL's rule; "
                "batch_size counts completions, not prompts). Set steps_per_generation or grad_accum accordingly"
            )

    @property
    def losses(self) -> list[str]:
        """loss_type as given, else the method's default."""
        return list(self.loss_type) if self.loss_type is not None else DEFAULT_LOSS.get(self.method, ["sigmoid"])

    @property
    def preference_beta(self) -> float:
        """beta as given, else the method's default."""
        return self.beta if self.beta is not None else DEFAULT_BETA.get(self.method, 0.1)


class EvalSection(_Section):
    metrics: list[Literal["loss", "exact_match", "contains", "regex", "rouge_l"]] = Field(
        default_factory=lambda: ["loss", "exact_match", "contains"]
    )
    """Metrics to compute: assistant-token loss (and perplexity) and greedy-answer metrics."""
    max_new_tokens: int = Field(64, ge=1)
    """Longest greedy answer generated per row."""
    batch_size: int = Field(8, ge=1)
    """Rows generated together."""


class OutputSection(_Section):
    name: str | None = None
    """Adapter name (default: the recipe file's name); written to <dir>/<name>/."""
    dir: str = "adapters"
    """Folder that holds adapters."""

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str | None) -> str | None:
        if v is not None and (not v or "/" in v or "\\" in v or v.startswith(".")):
            raise ValueError("must be a plain folder name (no '/', '\\' or leading '.')")
        return v


class Recipe(_Section):
    base: BaseSection
    """The frozen 4-bit base model."""
    data: DataSection
    """Chat-format training and evaluation data."""
    lora: LoraSection = Field(default_factory=LoraSection)
    """The adapter's shape."""
    training: TrainingSection = Field(default_factory=TrainingSection)
    """Optimisation settings."""
    eval: EvalSection = Field(default_factory=EvalSection)
    """Evaluation settings."""
    output: OutputSection = Field(default_factory=OutputSection)
    """Where the adapter is written."""

    source: str = Field("", exclude=True)
    """(set by the loader) the recipe file."""

    @property
    def adapter_name(self) -> str:
        return self.output.name or Path(self.source).stem


# ---------------------------------------------------------------------------------------------------- loading


def _fields(model: type[BaseModel]) -> dict[str, Any]:
    return {name: f for name, f in model.model_fields.items() if name != "source"}


def _model_at(path: tuple) -> type[BaseModel] | None:
    model: Any = Recipe
    for key in path:
        f = _fields(model).get(key) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if f is None:
            return None
        model = f.annotation
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _line_of(node: Any, loc: tuple) -> int | None:
    """YAML line of the value (or, for a missing key, of its parent) at `loc`."""
    import yaml

    line = node.start_mark.line + 1 if node is not None else None
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            match = next((v for k, v in node.value if k.value == key), None)
            if match is None:
                key_node = next((k for k, _ in node.value if k.value == key), None)
                return key_node.start_mark.line + 1 if key_node is not None else line
            node = match
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
        else:
            break
        line = node.start_mark.line + 1
    return line


def _key_line(node: Any, loc: tuple) -> int | None:
    """YAML line of the key at `loc` (for unknown keys)."""
    import yaml

    parent = node
    for key in loc[:-1]:
        if not isinstance(parent, yaml.MappingNode):
            return None
        parent = next((v for k, v in parent.value if k.value == key), None)
    if isinstance(parent, yaml.MappingNode):
        key_node = next((k for k, _ in parent.value if k.value == loc[-1]), None)
        if key_node is not None:
            return key_node.start_mark.line + 1
    return None


def _suggest(loc: tuple) -> str:
    model = _model_at(loc[:-1])
    if model is None:
        return ""
    close = difflib.get_close_matches(str(loc[-1]), list(_fields(model)), n=1, cutoff=0.5)
    return f" (did you mean {'.'.join(map(str, loc[:-1] + (close[0],)))!r}?)" if close else ""


def apply_overrides(data: dict, overrides: list[str]) -> set[tuple]:
    """Apply `a.b=value` overrides in place (value read as YAML); return the paths they set."""
    import yaml

    paths = set()
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ToolkitError(f"override {item!r} is not KEY=VALUE", where="--set", fix="e.g. --set training.seed=3")
        path = tuple(key.strip().split("."))
        node = data
        for part in path[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        try:
            node[path[-1]] = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError:
            node[path[-1]] = value
        paths.add(path)
    return paths


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe; raise one ToolkitError listing every problem with file:line."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ToolkitError(f"recipe {str(path)!r} not found", where="RECIPE", fix="check the path")
    text = path.read_text()
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ToolkitError(f"not valid YAML: {getattr(exc, 'problem', exc)}", where=where) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ToolkitError(
            "a recipe must be a mapping of sections", where=str(path), fix="start from recipes/quickstart.yaml"
        )
    overridden = apply_overrides(data, overrides or [])
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as err:
        problems = []
        for e in err.errors():
            loc = tuple(e["loc"])
            dotted = ".".join(map(str, loc))
            from_set = any(loc[: len(p)] == p for p in overridden)
            if e["type"] == "extra_forbidden":
                msg = f"unknown key{_suggest(loc)}"
                line = _key_line(node, loc)
            elif e["type"] == "missing":
                msg = "required key is missing"
                line = _line_of(node, loc[:-1])
            elif e["type"] == "value_error" and isinstance(e.get("input"), dict):
                # a section's own rule (a model validator): its message says it all, the section's dict would not
                msg = e["msg"].removeprefix("Value error, ")
                line = _line_of(node, loc)
            else:
                msg = e["msg"]
                if e.get("input") is not None and e["type"] not in ("model_type",):
                    msg += f" (got {e['input']!r})"
                line = _line_of(node, loc)
            where = "--set" if from_set else (f"{path}:{line}" if line else str(path))
            problems.append(f"{where}: {dotted}: {msg}")
        raise ToolkitError("; ".join(problems), fix="see docs/RECIPES.md for every key, its type and default") from None
    recipe.source = str(path)
    return recipe


# -------------------------------------------------------------------------------------------------- reference


def _type_name(annotation: Any) -> str:
    text = str(annotation).replace("typing.", "")
    return text.replace("<class '", "").replace("'>", "")


def reference_markdown() -> str:
    """docs/RECIPES.md: every section and key with its type, default and meaning, from the models above."""
    lines = [
        "# Recipe reference",
        "",
        "Generated from `toolkit/recipe.py` by `toolkit recipe-reference > docs/RECIPES.md`; a test keeps it in",
        "sync. Unknown keys are refused (the closest valid key is suggested); any key can be overridden on the",
        "command line with `--set section.key=value` (the value is read as YAML). Relative paths are relative to",
        "the directory the command runs from. Examples: `recipes/quickstart.yaml`, `recipes/gemma3-27b.yaml`.",
        "",
    ]
    for name, f in _fields(Recipe).items():
        section = f.annotation
        required = " (required)" if f.is_required() else ""
        lines += [
            f"## `{name}`{required}",
            "",
            f.description or "",
            "",
            "| key | type | default | meaning |",
            "|---|---|---|---|",
        ]
        for key, kf in _fields(section).items():
            default = "required" if kf.is_required() else repr(kf.get_default(call_default_factory=True))
            lines.append(f"| `{key}` | `{_type_name(kf.annotation)}` | `{default}` | {kf.description or ''} |")
        lines.append("")
    return "\n".join(lines)
