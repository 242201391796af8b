"""Evaluation of the base and adapters on held-out rows: metrics per model, deltas, a gate.

In-process, generation goes through the serving `Engine` (batched, greedy), so the numbers describe what
`toolkit serve` answers; the loss is teacher-forced over assistant tokens (scoring.py). Against a URL, the
same rows go to any OpenAI-compatible server and only generation metrics are computed. (Preference pairs are
scored by preference.py, on this module's Outcome, groups and gate.) Metrics are reported
over all rows and, when both kinds are present, over text-only rows (`metric.text`) and rows with images
(`metric.image`). Requests are submitted in a fixed order before the engine starts, so two runs batch the
same rows together and give identical numbers. Writing the report files is report.py's job.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from toolkit.data import template as chat
from toolkit.data.schema import text_of
from toolkit.errors import ToolkitError
from toolkit.eval import metrics, scoring


@dataclass
class Outcome:
    """Per model label ("base", adapter names): metric values, and per row the answer and its scores."""

    metrics: dict[str, dict[str, float | None]] = field(default_factory=dict)
    rows: dict[str, list[dict]] = field(default_factory=dict)


def reference(row: Any) -> str:
    return text_of(row.messages[-1].content).strip()


def prompt_messages(row: Any) -> list:
    """What the model answers: a conversation's messages before its answer, or a GRPO prompt row whole."""
    return row.messages if row.is_prompt else row.messages[:-1]


def last_question(item: Any) -> tuple[str, int]:
    """The text of the user turn an eval row (or preference item) answers, and the images in its prompt: what a
    reader of answers.jsonl needs beside the answers."""
    messages = item.row.messages if hasattr(item, "row") else (item.chosen or item.rejected).row.messages
    users = [m for m in messages if m.role == "user"]
    return (text_of(users[-1].content).strip() if users else ""), num_images(item)


def num_images(item: Any) -> int:
    """Images in an eval row, or in a preference item's prompt (both sides carry the same prompt)."""
    encoded = getattr(item, "encoded", None)
    if encoded is None:
        encoded = (item.chosen or item.rejected).encoded
    return encoded.num_images


def _groups(rows: list) -> dict[str, list[int]]:
    """Row indices of each group: all, and text / image when both kinds are present."""
    text = [i for i, r in enumerate(rows) if not num_images(r)]
    image = [i for i, r in enumerate(rows) if num_images(r)]
    groups = {"": list(range(len(rows)))}
    if text and image:
        groups.update({".text": text, ".image": image})
    return groups


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def generation_metrics(rows: list, answers: list[str], selected: list[str]) -> tuple[dict, list[dict]]:
    """Summary over groups, and per row the answer and its scores, of the selected generation metrics."""
    per_row = [
        {"answer": a, **metrics.score_answer(selected, a, reference(r.row), r.row.regex)}
        for r, a in zip(rows, answers, strict=True)
    ]
    names = [m for m in selected if m in metrics.GENERATION_METRICS]
    summary = {
        f"{m}{suffix}": _mean([per_row[i][m] for i in idx]) for m in names for suffix, idx in _groups(rows).items()
    }
    return summary, per_row


def loss_metrics(losses: list[tuple[float, int]], rows: list) -> dict:
    per_group = {suffix: scoring.mean_loss([losses[i] for i in idx]) for suffix, idx in _groups(rows).items()}
    return {f"{name}{suffix}": per_group[suffix][name] for name in ("loss", "perplexity") for suffix in per_group}


# ------------------------------------------------------------------------------------------------ in-process


def generate(
    base: Any, model: Any, rows: list, adapters: list[str | None], max_new_tokens: int, batch_size: int
) -> dict[str | None, list[str]]:
    """Greedy answers of each adapter (None: the base) to every row's prompt, through the serving engine."""
    from tqdm.auto import tqdm

    from toolkit.engine.engine import Engine, Request, SamplingParams

    prompts = []
    for r in rows:
        if r.row.is_prompt:  # its encoding is the prompt
            prompts.append(r.encoded)
            continue
        messages = r.row.messages[:-1]
        images = chat.load_images(messages, base_dir=r.row.base_dir, policy=None, where=r.row.where)
        prompts.append(chat.encode_prompt(base.processor, messages, images))
    total = len(rows) * len(adapters)
    engine = Engine.for_base(base, model, max_batch=batch_size, max_queue=total + 1, start=False)
    tokens: dict[tuple, list[int]] = {}
    errors: list[Exception] = []
    finished = threading.Semaphore(0)

    def collector(key: tuple):
        tokens[key] = []

        def on_event(kind: str, value: Any) -> None:
            if kind == "token":
                tokens[key].append(value)
            elif kind in ("done", "error"):
                if kind == "error":
                    errors.append(value)
                finished.release()

        return on_event

    for adapter in adapters:
        for i, p in enumerate(prompts):
            params = SamplingParams(max_tokens=max_new_tokens, temperature=0)
            engine.submit(
                Request(p.input_ids, p.token_type_ids, p.pixel_values, adapter, params, collector((adapter, i)))
            )
    engine.start()
    try:
        for _ in tqdm(range(total), desc="generating", unit="answer", leave=False):
            finished.acquire()
    finally:
        engine.close()
    if errors:
        raise errors[0]
    decode = base.tokenizer.decode
    return {a: [decode(tokens[(a, i)], skip_special_tokens=True).strip() for i in range(len(rows))] for a in adapters}


def active(model: Any, adapter: str | None) -> Any:
    """A context in which `model` computes as `adapter` (None: the base, its adapters disabled)."""
    import contextlib

    if adapter is None:
        return model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
    model.set_adapter(adapter)
    return contextlib.nullcontext()


def score_in_process(base: Any, model: Any, rows: list, models: dict[str, str | None], cfg: Any) -> Outcome:
    """Loss and generation metrics of each model label -> adapter name (None: the base, adapters disabled)."""
    out = Outcome()
    was_training = model.training
    model.eval()  # peft refuses per-row adapters in training mode; dropout off
    selected = list(cfg.metrics)
    gen_names = [m for m in selected if m in metrics.GENERATION_METRICS]
    answers = (
        generate(base, model, rows, list(models.values()), cfg.max_new_tokens, cfg.batch_size) if gen_names else {}
    )
    pad = base.tokenizer.pad_token_id
    for label, adapter in models.items():
        values: dict[str, float | None] = {}
        if "loss" in selected:
            with active(model, adapter):
                losses = scoring.row_losses(model, rows, pad, base.device, base.dtype, cfg.batch_size)
            values.update(loss_metrics(losses, rows))
        per_row = [{} for _ in rows]
        if gen_names:
            summary, per_row = generation_metrics(rows, answers[adapter], gen_names)
            values.update(summary)
        if "loss" in selected:
            for d, (s, c) in zip(per_row, losses, strict=True):
                d["loss"] = s / c if c else None
        out.metrics[label] = values
        out.rows[label] = per_row
    model.train(was_training)
    return out


def reward_metrics(rows: list, answers: list[str], rewards: list, tokenizer: Any) -> tuple[dict, list[dict]]:
    """GRPO's rewards of greedy answers to prompt rows: `reward` (their weighted sum) and `reward_NAME` per reward,
    averaged over rows (and text / image groups); per row the answer and each value (None: not applicable)."""
    import math

    from toolkit.eval.rewards import reward_completion, reward_prompt, score_rewards, weighted_total

    per_reward = score_rewards(
        rewards,
        [reward_prompt(r.row) for r in rows],
        [reward_completion(r.row, a) for r, a in zip(rows, answers, strict=True)],
        [tokenizer(a, add_special_tokens=False)["input_ids"] for a in answers],
        [r.row.columns for r in rows],
        [r.row.where for r in rows],
        trainer_state=None,  # TRL's signature has it; functions written for TRL may name it
    )
    totals = weighted_total(rewards, per_reward)
    columns = {"reward": totals, **{f"reward_{r.name}": v for r, v in zip(rewards, per_reward, strict=True)}}
    per_row = [
        {"answer": a, **{k: (None if math.isnan(v[i]) else v[i]) for k, v in columns.items()}}
        for i, a in enumerate(answers)
    ]
    summary = {
        f"{k}{suffix}": _mean([per_row[i][k] for i in idx]) for k in columns for suffix, idx in _groups(rows).items()
    }
    return summary, per_row


def score_rewards_in_process(
    base: Any, model: Any, rows: list, models: dict[str, str | None], rewards: list, cfg: Any
) -> Outcome:
    """The recipe's rewards of each model label's greedy answers to GRPO prompt rows."""
    was_training = model.training
    model.eval()
    answers = generate(base, model, rows, list(models.values()), cfg.max_new_tokens, cfg.batch_size)
    model.train(was_training)
    out = Outcome()
    for label, adapter in models.items():
        out.metrics[label], out.rows[label] = reward_metrics(rows, answers[adapter], rewards, base.tokenizer)
    return out


# ---------------------------------------------------------------------------------------------------- HTTP


def _request_messages(row: Any) -> list[dict]:
    """The prompt messages as an HTTP request carries them: local images become PNG data URIs."""
    import base64
    import io

    from toolkit.data.images import load_image

    out = []
    for i, m in enumerate(prompt_messages(row)):
        d = m.model_dump(exclude_none=True)
        if isinstance(d["content"], list):
            for j, part in enumerate(d["content"]):
                if part["type"] == "image_url" and not part["image_url"]["url"].startswith("data:"):
                    where = f"{row.where}: messages[{i}].content[{j}]"
                    img = load_image(part["image_url"]["url"], base_dir=row.base_dir, policy=None, where=where)
                    buf = io.BytesIO()
                    img.save(buf, format="PNG")
                    part["image_url"] = {"url": "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()}
        out.append(d)
    return out


def served_models(url: str, api_key: str | None) -> list[dict]:
    import requests

    try:
        r = requests.get(url.rstrip("/") + "/models", headers=_auth(api_key), timeout=30)
    except requests.RequestException as exc:
        raise ToolkitError(
            f"cannot reach {url} ({type(exc).__name__})", where="--url", fix="start the server"
        ) from None
    if r.status_code != 200:
        raise ToolkitError(f"GET /models answered {r.status_code}: {r.text[:200]}", where="--url")
    return r.json()["data"]


def _auth(api_key: str | None) -> dict:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def generate_http(
    url: str, api_key: str | None, rows: list, model_names: list[str], max_new_tokens: int, clients: int
) -> dict[str, list[str]]:
    """Greedy answers of each served model to every row, `clients` requests at a time."""
    from concurrent.futures import ThreadPoolExecutor

    import requests
    from tqdm.auto import tqdm

    bodies = [_request_messages(r.row) for r in rows]
    session = requests.Session()
    endpoint = url.rstrip("/") + "/chat/completions"

    def ask(job: tuple[str, int]) -> str:
        model, i = job
        body = {"model": model, "messages": bodies[i], "temperature": 0, "max_tokens": max_new_tokens, "seed": 0}
        try:
            r = session.post(endpoint, json=body, headers=_auth(api_key), timeout=600)
        except requests.RequestException as exc:
            raise ToolkitError(f"request failed ({type(exc).__name__}: {exc})", where=rows[i].row.where) from None
        if r.status_code != 200:
            raise ToolkitError(f"{model} answered {r.status_code}: {r.text[:300]}", where=rows[i].row.where)
        return (r.json()["choices"][0]["message"]["content"] or "").strip()

    jobs = [(m, i) for m in model_names for i in range(len(rows))]
    with ThreadPoolExecutor(clients) as pool:
        results = list(tqdm(pool.map(ask, jobs), total=len(jobs), desc="asking", unit="answer", leave=False))
    return {m: results[k * len(rows) : (k + 1) * len(rows)] for k, m in enumerate(model_names)}


def score_rewards_http(
    url: str, api_key: str | None, rows: list, models: dict[str, str], rewards: list, cfg: Any, tokenizer: Any
) -> Outcome:
    """The recipe's rewards of each served model's greedy answers to GRPO prompt rows."""
    answers = generate_http(url, api_key, rows, list(models.values()), cfg.max_new_tokens, cfg.batch_size)
    out = Outcome()
    for label, name in models.items():
        out.metrics[label], out.rows[label] = reward_metrics(rows, answers[name], rewards, tokenizer)
    return out


def score_http(url: str, api_key: str | None, rows: list, models: dict[str, str], cfg: Any) -> Outcome:
    """Generation metrics of each label -> served model name."""
    gen_names = [m for m in cfg.metrics if m in metrics.GENERATION_METRICS]
    if not gen_names:
        raise ToolkitError(
            "over HTTP only generation metrics can be computed, and the recipe selects none",
            where="eval.metrics",
            fix=f"add some of {list(metrics.GENERATION_METRICS)}",
        )
    answers = generate_http(url, api_key, rows, list(models.values()), cfg.max_new_tokens, cfg.batch_size)
    out = Outcome()
    for label, name in models.items():
        out.metrics[label], out.rows[label] = generation_metrics(rows, answers[name], gen_names)
    return out


# ---------------------------------------------------------------------------------------------------- gate


@dataclass
class Threshold:
    metric: str
    value: float
    kind: str  # "min" or "max"

    @classmethod
    def parse(cls, text: str, kind: str) -> Threshold:
        name, sep, raw = text.partition("=")
        try:
            value = float(raw)
        except ValueError:
            value = None
        if not sep or not name or value is None:
            raise ToolkitError(f"{text!r} is not METRIC=VALUE", where=f"--{kind}", fix=f"e.g. --{kind} exact_match=0.5")
        if kind == "min" and not metrics.higher_is_better(name):
            raise ToolkitError(
                f"{name} is lower-is-better; a minimum makes no sense", where="--min", fix=f"use --max {text}"
            )
        return cls(name, value, kind)

    def validate(self, selected: list[str], *, preference: bool = False, reference: bool = False) -> None:
        """Refuse, before any model is loaded, a threshold on a metric the run will not compute: `selected` (the
        recipe's eval.metrics) on conversations; on preference pairs the pair metrics, and the reward metrics
        when there is a `reference` model."""
        name, _, group = self.metric.partition(".")
        if preference:
            known = list(metrics.PREFERENCE_METRICS) + (list(metrics.REWARD_METRICS) if reference else [])
            why = "preference pairs give these; reward_* need a reference model (--reference, or adapters)"
        elif selected and selected[0] == "reward":  # a grpo recipe: its rewards
            known, why = selected, "a grpo recipe is scored by its rewards"
        else:
            known = [m for m in selected if m in metrics.GENERATION_METRICS]
            known += list(metrics.LOSS_METRICS) if "loss" in selected else []
            why = "eval.metrics selects what runs"
        if name not in known or group not in ("", "text", "image"):
            raise ToolkitError(
                f"metric {self.metric!r} is not computed by this run",
                where=f"--{self.kind}",
                fix=f"use one of {known}, optionally with .text or .image ({why})",
            )

    def check(self, label: str, values: dict) -> str | None:
        """None if met, else the line that says why not."""
        if self.metric not in values or values[self.metric] is None:
            known = ", ".join(k for k, v in values.items() if v is not None)
            raise ToolkitError(
                f"metric {self.metric!r} was not computed", where=f"--{self.kind}", fix=f"use one of: {known}"
            )
        actual = values[self.metric]
        ok = actual >= self.value if self.kind == "min" else actual <= self.value
        sign = "<" if self.kind == "min" else ">"
        return None if ok else f"FAILED {label}: {self.metric} = {actual:.4g} {sign} {self.value:g} (--{self.kind})"


def gate(outcome: Outcome, thresholds: list[Threshold], gated: list[str]) -> list[str]:
    """Failure lines for every gated model label and threshold (empty: passed)."""
    return [line for label in gated for t in thresholds if (line := t.check(label, outcome.metrics[label]))]
