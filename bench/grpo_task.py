"""A GRPO task the real Gemma 3 270M base fails but can learn from its own samples: a strict answer line.

    .venv/bin/python bench/grpo_task.py [--dir build/grpo-task] [--seed 0] [--eval-share 0.2]

Every prompt is a short question whose answer is in the question itself (repeat a word, the bigger or smaller of
two numbers, the first or last word of a list, the one colour among three words), followed by the instruction
    "Reply with only the answer, in the form Answer: <answer>"
The reply must begin with one line `Answer: <the answer>` (what follows a newline is not judged). The pretrained
270M (4-bit) does not do this: greedily it repeats the question, and at temperature 1 a reply starts with "Answer"
well under 1% of the time. It does know enough to pick the answer out of the question, so what it has to learn is
to answer, at once and in the required form. Facts and arithmetic (capitals, 7 + 5) are out of its reach: its
samples are almost never right, which leaves GRPO nothing to reinforce.

Base model, so a warm start first (the usual recipe for RL on a pretrained model): the 270M here is PRETRAINED,
not instruction-tuned; it never starts a reply with "Answer" (<1% of samples) and never ends its turn, so GRPO from
the bare base had no reward variance in its groups (0.25 format + 0.5 correct + 0.25 shaping, lr 5e-4, 70 steps:
the policy collapsed into "AnAnan..." by step 18, entropy 3.4 -> 0.5, frac_reward_zero_std 1.0; that run is kept
in adapters/grpo-270m-from-base). Now:
  1. SFT warm start, bench/recipes/grpo-270m-warmup.yaml on warmup.jsonl: 28 chat rows of only TWO of the six
     question types (repeat, bigger; training rows), user prompt -> `Answer: <answer>`. It teaches the chat turn,
     the answer line and <end_of_turn>, not the other four types.
  2. GRPO on all six types from that adapter (bench/recipes/grpo-270m.yaml: init_adapter grpo-270m-warmup, which is
     also the KL reference, beta 0.04; 8 completions per prompt, 2 prompts per step, temperature 1.0).
The rewards of step 2 (weights sum to 1, so the summed reward is in [0, 1]):
  format     0.25  regex FORMAT_REGEX: the first line is `Answer: ` and a short answer (not the "<answer>" placeholder)
  correct    0.75  regex from the row's `pattern` column: the first line is exactly `Answer: <answer>` (the answer
                   case-insensitive, an optional full stop), then a newline or the end of the reply
(bench/recipes/grpo_270m_rewards.py:on_the_way, a dense shaping term, is no longer used: from the bare base it was
gamed with "AnAnan...".) The headline metric is `reward_correct` of the greedy answer on the 72 held-out prompts,
per `topic` (a column of every row, so answers.jsonl carries it): base, warm start, GRPO.

Rerun, from the repository root (2 CPU cores: ~3 min, ~18 min, ~5 min):
    .venv/bin/python bench/grpo_task.py
    .venv/bin/toolkit train bench/recipes/grpo-270m-warmup.yaml --overwrite
    .venv/bin/toolkit train bench/recipes/grpo-270m.yaml --overwrite
    .venv/bin/toolkit eval bench/recipes/grpo-270m.yaml --adapter grpo-270m-warmup --adapter grpo-270m
Measured (2 shared CPU cores; held-out greedy reward_correct, 72 prompts): base 0.00, warm start 0.60, GRPO (50
steps, 17 s/step, 15.5 min) 0.65, format 0 / 0.96 / 1.00. Most of the gain is the warm start: it already
transfers the answer line to the four unseen types (first word 0.90, colour 0.58, smaller 0.67, last word 0.00).
GRPO's +0.05 (4 of 72 rows) is within noise and mixed per type: colour 0.58 -> 0.92, bigger 0.33 -> 0.75,
last word 0 -> 0.50, but first word 0.90 -> 0.00 and smaller 0.67 -> 0.50 (it shifted which list position it
picks rather than learning to read the question); the training reward is flat-ish and noisy (2 prompts per step:
mean 0.46 over steps 1-10, 0.59 over 41-50). A 4-epoch warm start (loss 0.005) was too sharp for GRPO (rollout
entropy 0.02, frac_reward_zero_std 0.75-1.0; build/grpo-task/pilot1/), hence 2 epochs. Files: build/grpo-task/
eval-final/ (report.md, answers.jsonl), adapters/grpo-270m/metrics.jsonl.

Held-out rows are unseen: the words, the number pairs and the colours are split train / eval by a seeded shuffle
(a held-out prompt's word, number pair or colour is never a training row's answer or pair), and half the held-out rows
use a phrasing never trained on. Deterministic: the same --seed writes the same bytes.

Written to --dir (default build/grpo-task/, which bench/recipes/grpo-270m.yaml reads):
  train.jsonl, eval.jsonl  prompt rows {"prompt": "...", "answer": "...", "pattern": "...", "topic": "..."}
                           (answer and pattern reach the rewards as columns; topic is the question type)
  warmup.jsonl             the SFT warm start: {"messages": [user prompt, assistant "Answer: <answer>"], "topic"},
                           the first 14 training rows of each of WARMUP_TOPICS (repeat, bigger)
  manifest.json            counts, the format, each topic's held-out entities, the files' hashes
Not part of the test suite.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DIR = ROOT / "build" / "grpo-task"

INSTRUCTION = "Reply with only the answer, in the form Answer: <answer>"
PREFIX = "Answer: "
# re.search on the reply: its first line is the prefix and a short answer (not the "<answer>" placeholder)
FORMAT_REGEX = r"^\s*Answer: (?!<)[^\n]{1,40}(?:\n|$)"


def answer_pattern(answer: str) -> str:
    """The row's `pattern` column: the first line is exactly `Answer: <answer>` (answer case-insensitive, an
    optional full stop, trailing spaces), whatever follows a newline."""
    return r"^\s*Answer: (?i:" + re.escape(answer) + r")\.?[ \t]*(?:\n|$)"


# ------------------------------------------------------------------------------------------------ vocabularies

WORDS = [
    "apple", "river", "candle", "garden", "window", "pencil", "mountain", "bottle", "carpet", "forest",
    "ladder", "mirror", "basket", "castle", "dragon", "engine", "feather", "guitar", "hammer", "island",
    "jacket", "kettle", "lemon", "marble", "needle", "ocean", "pillow", "rabbit", "saddle", "tiger",
    "umbrella", "violin", "wallet", "anchor", "blanket", "cookie", "desert", "falcon", "helmet", "jungle",
    "lantern", "meadow", "orchard", "parrot", "rocket", "spoon", "tunnel", "walnut", "bridge", "cabin",
    "dolphin", "harbor", "igloo", "jewel", "kitten", "lizard", "monkey", "napkin", "oven", "puzzle",
    "quilt", "robot", "shovel", "teapot", "valley", "wagon", "zebra", "button", "cherry", "donkey",
    "button", "planet", "pocket", "silver", "tomato", "turtle", "winter", "yogurt", "cactus", "pepper",
]  # fmt: skip
COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "pink", "brown", "black", "white", "grey", "violet"]
NOT_COLOURS = [
    "table", "run", "chair", "sleep", "door", "jump", "bread", "sing", "stone", "paper", "swim", "cloud", "horse",
    "write", "shoe", "laugh", "glass", "drive", "spoon", "think",
]  # fmt: skip


@dataclass
class Topic:
    name: str
    train_templates: list[str]
    eval_templates: list[str]  # phrasings only held-out rows use


TOPICS = {
    "repeat": Topic(
        "repeat",
        ["Repeat this word: {w}", "Say the word {w}.", "Echo back this word: {w}"],
        ["Write the word {w} once.", "Please repeat the word '{w}'."],
    ),
    "bigger": Topic(
        "bigger",
        ["Which is bigger, {a} or {b}?", "Which number is larger: {a} or {b}?", "Pick the larger number: {a}, {b}."],
        ["Of {a} and {b}, which is greater?", "What is the maximum of {a} and {b}?"],
    ),
    "smaller": Topic(
        "smaller",
        ["Which is smaller, {a} or {b}?", "Which number is less: {a} or {b}?", "Pick the smaller number: {a}, {b}."],
        ["Of {a} and {b}, which is lower?", "What is the minimum of {a} and {b}?"],
    ),
    "first word": Topic(
        "first word",
        ["What is the first word in this list: {l}?", "Name the first item of: {l}."],
        ["Which word comes first here: {l}?"],
    ),
    "last word": Topic(
        "last word",
        ["What is the last word in this list: {l}?", "Name the last item of: {l}."],
        ["Which word comes last here: {l}?"],
    ),
    "colour": Topic(
        "colour",
        ["Which of these words is a colour: {l}?", "Pick the colour from this list: {l}."],
        ["One of these is a color: {l}. Which one?"],
    ),
}


def _split(items: list, rng: random.Random, eval_share: float) -> tuple[list, list]:
    items = sorted(set(items), key=str)
    rng.shuffle(items)
    n_eval = max(1, round(len(items) * eval_share))
    return items[n_eval:], items[:n_eval]


def _number_pairs(rng: random.Random, n: int) -> list[tuple[int, int]]:
    """Distinct unordered pairs (a held-out pair is never a training pair in either order), in a random order."""
    pairs: dict[frozenset, tuple[int, int]] = {}
    while len(pairs) < n:
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        if a != b:
            pairs.setdefault(frozenset((a, b)), (a, b))
    return sorted(pairs.values())


def build(seed: int = 0, eval_share: float = 0.2) -> dict:
    """Every row and the manifest, deterministically from `seed`."""
    rng = random.Random(seed)
    words_train, words_eval = _split(WORDS, rng, eval_share)
    colours_train, colours_eval = _split(COLOURS, rng, max(eval_share, 0.25))
    pairs_train, pairs_eval = _split(_number_pairs(rng, 150), rng, eval_share)

    def rows(split: str, n_per_topic: dict[str, int]) -> list[dict]:
        words = words_train if split == "train" else words_eval
        colours = colours_train if split == "train" else colours_eval
        pairs = pairs_train if split == "train" else pairs_eval
        out = []
        for name, count in n_per_topic.items():
            topic = TOPICS[name]
            for i in range(count):
                if split == "eval" and rng.random() < 0.5:
                    template = rng.choice(topic.eval_templates)
                else:
                    template = rng.choice(topic.train_templates)
                if name == "repeat":
                    w = words[i % len(words)]
                    question, answer = template.format(w=w), w
                elif name in ("bigger", "smaller"):
                    a, b = pairs[(i * 2 + (name == "smaller")) % len(pairs)]
                    question = template.format(a=a, b=b)
                    answer = str(max(a, b) if name == "bigger" else min(a, b))
                elif name in ("first word", "last word"):
                    chosen = rng.sample(words, 3)
                    question = template.format(l=", ".join(chosen))
                    answer = chosen[0] if name == "first word" else chosen[-1]
                else:  # colour
                    colour = colours[i % len(colours)]
                    others = rng.sample(NOT_COLOURS, 2)
                    listed = [*others]
                    listed.insert(rng.randrange(3), colour)
                    question, answer = template.format(l=", ".join(listed)), colour
                out.append(
                    {
                        "prompt": f"{question}\n{INSTRUCTION}",
                        "answer": answer,
                        "pattern": answer_pattern(answer),
                        "topic": name,
                    }
                )
        return out

    train = rows("train", {"repeat": 64, "bigger": 48, "smaller": 48, "first word": 48, "last word": 48, "colour": 44})
    held_out = rows(
        "eval", {"repeat": 16, "bigger": 12, "smaller": 12, "first word": 10, "last word": 10, "colour": 12}
    )
    rng.shuffle(train)  # topics interleaved: a batch sees several
    train_prompts = {r["prompt"] for r in train}
    assert not any(r["prompt"] in train_prompts for r in held_out), "a held-out prompt is also a training prompt"
    per_topic = {
        name: {
            "train": sum(r["topic"] == name for r in train),
            "eval": sum(r["topic"] == name for r in held_out),
            "example_eval": next(r["prompt"].split("\n")[0] for r in held_out if r["topic"] == name),
        }
        for name in TOPICS
    }
    entities = {"words": words_eval, "colours": colours_eval, "number_pairs": [list(p) for p in pairs_eval]}
    return {"train": train, "eval": held_out, "topics": per_topic, "eval_entities": entities}


WARMUP_TOPICS = ("repeat", "bigger")  # the only question types the SFT warm start sees
WARMUP_PER_TOPIC = 14


def warmup_rows(train: list[dict], per_topic: int = WARMUP_PER_TOPIC) -> list[dict]:
    """The SFT warm start (bench/recipes/grpo-270m-warmup.yaml): the first `per_topic` training rows of each of
    WARMUP_TOPICS as chat turns, user prompt -> assistant `Answer: <answer>`. It teaches the turn, the answer line
    and to stop; the other four question types are left to GRPO."""
    out = []
    for name in WARMUP_TOPICS:
        for r in [r for r in train if r["topic"] == name][:per_topic]:
            out.append(
                {
                    "messages": [
                        {"role": "user", "content": r["prompt"]},
                        {"role": "assistant", "content": f"{PREFIX}{r['answer']}"},
                    ],
                    "topic": name,
                }
            )
    return out


def _jsonl(path: Path, rows: list[dict]) -> str:
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    path.write_text(text)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def write(out_dir: Path = DEFAULT_DIR, seed: int = 0, eval_share: float = 0.2) -> dict:
    """Write the files into `out_dir`; return the manifest."""
    data = build(seed, eval_share)
    out_dir.mkdir(parents=True, exist_ok=True)
    hashes = {f"{split}.jsonl": _jsonl(out_dir / f"{split}.jsonl", data[split]) for split in ("train", "eval")}
    warmup = warmup_rows(data["train"])
    hashes["warmup.jsonl"] = _jsonl(out_dir / "warmup.jsonl", warmup)
    manifest = {
        "seed": seed,
        "eval_share": eval_share,
        "instruction": INSTRUCTION,
        "format_regex": FORMAT_REGEX,
        "correct_pattern_example": answer_pattern("apple"),
        "rows": {"train": len(data["train"]), "eval": len(data["eval"]), "warmup": len(warmup)},
        "warmup_topics": {name: sum(r["topic"] == name for r in warmup) for name in WARMUP_TOPICS},
        "topics": data["topics"],
        "eval_entities": data["eval_entities"],
        "sha256_12": hashes,
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    return manifest


def ensure(out_dir: Path = DEFAULT_DIR, seed: int = 0) -> Path:
    """The task's files in `out_dir`, written if absent."""
    if not all((out_dir / f).exists() for f in ("train.jsonl", "eval.jsonl", "warmup.jsonl")):
        write(out_dir, seed)
    return out_dir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default=str(DEFAULT_DIR), help="where to write the files (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-share", type=float, default=0.2, help="share of the words / pairs / colours held out")
    args = ap.parse_args()
    out_dir = Path(args.dir)
    m = write(out_dir, args.seed, args.eval_share)
    header = f"{'topic':<11} {'train':>5} {'eval':>5}  example held-out prompt"
    print(header)
    print("-" * len(header))
    for name, t in m["topics"].items():
        print(f"{name:<11} {t['train']:>5} {t['eval']:>5}  {t['example_eval']}")
    print(f"{'total':<11} {m['rows']['train']:>5} {m['rows']['eval']:>5}")
    print(f"instruction: {INSTRUCTION!r}  format: {FORMAT_REGEX}")
    print(f"warm-up SFT rows: {m['rows']['warmup']} ({', '.join(f'{k} {v}' for k, v in m['warmup_topics'].items())})")
    print(f"written to {out_dir}/ (train.jsonl, eval.jsonl, warmup.jsonl, manifest.json)")


if __name__ == "__main__":
    main()
