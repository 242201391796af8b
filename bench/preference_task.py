"""A preference task the base does not already have: a required answer style, as DPO / KTO / SimPO / SFT data.

    .venv/bin/python bench/preference_task.py [--dir build/preference-task] [--seed 0] [--eval-share 0.2]
                                              [--out docs/BENCHMARKS.md]

About 300 templated factual questions (capitals, arithmetic, colours of things, opposites, plural forms, the young
of animals, the next weekday / month). Every answer is correct on both sides of a pair; only the style differs:
  chosen    "Answer: Paris. Over."   (the required style: the "Answer: " prefix, a full stop, the "Over." sign-off)
  rejected  "Paris"                  (the same answer, plain)
so a model that learns the pairs has learnt the style, not the facts. The greedy answer is checked with STYLE_REGEX
(also written per row as `regex` in the SFT eval rows, for `eval.metrics: [regex]`). A pretrained 270M base does
not answer this way on its own: the eval's base column shows it (regex ~0).

Held-out rows are unseen: each topic's entities (a country, an arithmetic question, a word...) are split
train / eval by a seeded shuffle, and each topic has phrasings used only for eval rows (eval rows take one of those
half of the time, a training phrasing otherwise). Deterministic: the same --seed writes the same bytes.

Written to --dir (default build/preference-task/, which the recipes in bench/recipes/ read):
  train.jsonl, eval.jsonl          pairs in TRL's explicit conversational form:
                                   {"prompt": [{"role": "user", ...}], "chosen": [{"role": "assistant", ...}],
                                    "rejected": [{"role": "assistant", ...}]}
  sft_train.jsonl, sft_eval.jsonl  the chosen answers as `messages` rows (SFT, or SFT then DPO); eval rows add
                                   "regex": STYLE_REGEX
  kto_train.jsonl, kto_eval.jsonl  TRL's unpaired form ({"prompt", "completion", "label"}): each pair as one
                                   desirable and one undesirable row
  manifest.json                    counts, the style, and each topic's train / eval entities
Prints the table per topic; with --out, writes the section of that markdown file. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DIR = ROOT / "build" / "preference-task"

PREFIX, SIGN_OFF = "Answer: ", "Over."
# re.search on the greedy answer (the toolkit's `regex` metric): the prefix, some answer, a full stop, the sign-off,
# nothing after it but whitespace
STYLE_REGEX = r"^\s*Answer: \S.*\. Over\.\s*$"


def styled(answer: str) -> str:
    """The required style (chosen)."""
    return f"{PREFIX}{answer}. {SIGN_OFF}"


def plain(answer: str) -> str:
    """The plain style (rejected): the same answer, nothing around it."""
    return answer


# --------------------------------------------------------------------------------------------------- the facts

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Japan": "Tokyo", "China": "Beijing", "India": "New Delhi", "Russia": "Moscow", "Canada": "Ottawa",
    "Australia": "Canberra", "Brazil": "Brasilia", "Argentina": "Buenos Aires", "Mexico": "Mexico City",
    "Egypt": "Cairo", "Kenya": "Nairobi", "Nigeria": "Abuja", "Greece": "Athens", "Turkey": "Ankara",
    "Poland": "Warsaw", "Sweden": "Stockholm", "Norway": "Oslo", "Finland": "Helsinki", "Denmark": "Copenhagen",
    "Ireland": "Dublin", "Austria": "Vienna", "Hungary": "Budapest", "the Czech Republic": "Prague",
    "the Netherlands": "Amsterdam", "Belgium": "Brussels", "Switzerland": "Bern", "Peru": "Lima", "Chile": "Santiago",
    "Colombia": "Bogota", "Thailand": "Bangkok", "Vietnam": "Hanoi", "South Korea": "Seoul", "Indonesia": "Jakarta",
    "Iran": "Tehran", "Iraq": "Baghdad", "Cuba": "Havana", "Morocco": "Rabat", "Ukraine": "Kyiv",
    "Romania": "Bucharest", "Bulgaria": "Sofia", "the Philippines": "Manila", "New Zealand": "Wellington",
    "Saudi Arabia": "Riyadh", "Pakistan": "Islamabad", "Ethiopia": "Addis Ababa",
}  # fmt: skip
COLOURS = {
    "a ripe banana": "yellow", "fresh grass": "green", "the clear daytime sky": "blue", "fresh snow": "white",
    "coal": "black", "blood": "red", "a ripe tomato": "red", "a lemon": "yellow", "a carrot": "orange",
    "milk": "white", "milk chocolate": "brown", "a ripe strawberry": "red", "a lime": "green", "a plum": "purple",
    "a pumpkin": "orange", "a polar bear's fur": "white", "a crow": "black", "a flamingo": "pink",
    "an emerald": "green", "a sapphire": "blue", "a ruby": "red", "an eggplant": "purple", "a fire truck": "red",
    "a cucumber": "green", "raw cotton": "white", "a raven": "black", "tree bark": "brown", "a lettuce leaf": "green",
    "an egg yolk": "yellow", "a blueberry": "blue", "soot": "black", "a ripe orange": "orange",
}  # fmt: skip
OPPOSITES = {
    "hot": "cold", "big": "small", "up": "down", "fast": "slow", "happy": "sad", "open": "closed", "early": "late",
    "full": "empty", "hard": "soft", "high": "low", "long": "short", "rich": "poor", "strong": "weak", "wet": "dry",
    "thick": "thin", "loud": "quiet", "push": "pull", "win": "lose", "inside": "outside", "above": "below",
    "buy": "sell", "day": "night", "north": "south", "east": "west", "left": "right", "first": "last",
    "true": "false", "love": "hate", "enter": "exit", "accept": "reject", "increase": "decrease", "always": "never",
    "visible": "invisible", "clean": "dirty", "cheap": "expensive", "asleep": "awake", "ancient": "modern",
    "arrive": "depart", "question": "answer", "remember": "forget",
}  # fmt: skip
PLURALS = {
    "mouse": "mice", "child": "children", "man": "men", "woman": "women", "tooth": "teeth", "foot": "feet",
    "goose": "geese", "person": "people", "ox": "oxen", "cactus": "cacti", "leaf": "leaves", "knife": "knives",
    "wolf": "wolves", "half": "halves", "box": "boxes", "church": "churches", "city": "cities", "baby": "babies",
    "bus": "buses", "potato": "potatoes", "tomato": "tomatoes", "hero": "heroes", "sheep": "sheep", "deer": "deer",
    "cat": "cats", "dog": "dogs", "book": "books", "apple": "apples", "chair": "chairs", "wife": "wives",
    "life": "lives", "loaf": "loaves", "shelf": "shelves", "fox": "foxes", "dish": "dishes", "party": "parties",
    "story": "stories", "key": "keys", "toy": "toys", "louse": "lice",
}  # fmt: skip
YOUNG = {
    "cat": "kitten", "dog": "puppy", "cow": "calf", "horse": "foal", "sheep": "lamb", "goat": "kid",
    "duck": "duckling", "frog": "tadpole", "kangaroo": "joey", "lion": "cub", "deer": "fawn", "swan": "cygnet",
    "goose": "gosling", "pig": "piglet", "hen": "chick", "owl": "owlet", "eagle": "eaglet", "bear": "cub",
    "tiger": "cub", "rabbit": "kit",
}  # fmt: skip
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = [
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
]  # fmt: skip


@dataclass
class Topic:
    name: str
    items: list[tuple[dict, str]]  # (template fields, answer); the fields identify the entity
    train_templates: list[str]
    eval_templates: list[str]  # phrasings only held-out rows use


def _arithmetic(seed: int, n: int = 90) -> list[tuple[dict, str]]:
    rng = random.Random(f"arithmetic-{seed}")
    seen: set[tuple] = set()
    items: list[tuple[dict, str]] = []
    ops: list[tuple[str, str, Callable[[int, int], int]]] = [
        ("plus", "+", lambda a, b: a + b),
        ("minus", "-", lambda a, b: a - b),
        ("times", "x", lambda a, b: a * b),
    ]
    while len(items) < n:
        word, sign, fn = ops[len(items) % 3]
        a, b = rng.randint(2, 20), rng.randint(2, 12)
        if word == "minus" and a <= b:
            a, b = b + a, a  # a positive difference
        if (word, a, b) in seen:
            continue
        seen.add((word, a, b))
        items.append(({"a": a, "b": b, "op": word, "sign": sign}, str(fn(a, b))))
    return items


def topics(seed: int) -> list[Topic]:
    return [
        Topic(
            "capitals",
            [({"x": c}, city) for c, city in CAPITALS.items()],
            [
                "What is the capital of {x}?",
                "Name the capital city of {x}.",
                "Which city is the capital of {x}?",
                "What city serves as the capital of {x}?",
            ],
            ["Tell me the capital of {x}.", "{x}: what is its capital city?"],
        ),
        Topic(
            "arithmetic",
            _arithmetic(seed),
            ["What is {a} {op} {b}?", "Compute {a} {sign} {b}.", "How much is {a} {op} {b}?"],
            ["Work out {a} {op} {b}.", "What do you get for {a} {sign} {b}?"],
        ),
        Topic(
            "colours",
            [({"x": thing}, colour) for thing, colour in COLOURS.items()],
            ["What colour is {x}?", "What is the usual color of {x}?", "Name the colour of {x}."],
            ["Which colour does {x} usually have?", "Tell me the color of {x}."],
        ),
        Topic(
            "opposites",
            [({"x": w}, o) for w, o in OPPOSITES.items()],
            ["What is the opposite of {x}?", "Give the antonym of '{x}'.", "What word means the opposite of {x}?"],
            ["Which word is the reverse of '{x}'?", "Name an antonym of the word {x}."],
        ),
        Topic(
            "plurals",
            [({"x": w}, p) for w, p in PLURALS.items()],
            ["What is the plural of {x}?", "Write the plural form of '{x}'.", "One {x}, two what?"],
            ["Give the plural of the noun '{x}'.", "How do you say more than one {x}?"],
        ),
        Topic(
            "animal young",
            [({"x": a}, y) for a, y in YOUNG.items()],
            ["What is a baby {x} called?", "What do you call a young {x}?", "Name the young of a {x}."],
            ["A young {x} is called what?", "Which word names a baby {x}?"],
        ),
        Topic(
            "next in order",
            [({"x": d, "kind": "day"}, DAYS[(i + 1) % 7]) for i, d in enumerate(DAYS)]
            + [({"x": m, "kind": "month"}, MONTHS[(i + 1) % 12]) for i, m in enumerate(MONTHS)],
            ["Which {kind} comes after {x}?", "What {kind} follows {x}?", "Name the {kind} after {x}."],
            ["What is the next {kind} after {x}?", "After {x}, which {kind} comes next?"],
        ),
    ]


# ------------------------------------------------------------------------------------------------- the rows


def _fill(template: str, fields: dict) -> str:
    text = template.format(**fields)
    return text[0].upper() + text[1:]  # "{x}: ..." with x = "the Netherlands"


def _entity(fields: dict) -> str:
    return fields["x"] if "x" in fields else "{a} {op} {b}".format(**fields)


def _pair(question: str, answer: str) -> dict:
    return {
        "prompt": [{"role": "user", "content": question}],
        "chosen": [{"role": "assistant", "content": styled(answer)}],
        "rejected": [{"role": "assistant", "content": plain(answer)}],
    }


def build(seed: int = 0, eval_share: float = 0.2) -> dict:
    """Every row and the manifest, deterministically from `seed`."""
    rng = random.Random(seed)
    train: list[dict] = []
    held_out: list[dict] = []
    per_topic: dict[str, dict] = {}
    for topic in topics(seed):
        order = list(range(len(topic.items)))
        rng.shuffle(order)
        n_eval = max(1, round(len(order) * eval_share))
        eval_ids, train_ids = sorted(order[:n_eval]), sorted(order[n_eval:])
        for i in train_ids:
            fields, answer = topic.items[i]
            train.append({"topic": topic.name, "q": _fill(rng.choice(topic.train_templates), fields), "a": answer})
        for i in eval_ids:
            fields, answer = topic.items[i]
            pool = topic.eval_templates if rng.random() < 0.5 else topic.train_templates
            held_out.append({"topic": topic.name, "q": _fill(rng.choice(pool), fields), "a": answer})
        per_topic[topic.name] = {
            "train": len(train_ids),
            "eval": len(eval_ids),
            "eval_entities": [_entity(topic.items[i][0]) for i in eval_ids],
            "example_eval": held_out[-1]["q"],
        }
    rng.shuffle(train)  # topics interleaved: a batch sees several
    train_qs = {r["q"] for r in train}
    assert not any(r["q"] in train_qs for r in held_out), "a held-out prompt is also a training prompt"
    return {"train": train, "eval": held_out, "topics": per_topic}


def _jsonl(path: Path, rows: list[dict]) -> str:
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    path.write_text(text)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def write(out_dir: Path = DEFAULT_DIR, seed: int = 0, eval_share: float = 0.2) -> dict:
    """Write every file into `out_dir`; return the manifest."""
    data = build(seed, eval_share)
    out_dir.mkdir(parents=True, exist_ok=True)
    hashes = {}
    for split in ("train", "eval"):
        rows = data[split]
        pairs = [_pair(r["q"], r["a"]) for r in rows]
        hashes[f"{split}.jsonl"] = _jsonl(out_dir / f"{split}.jsonl", pairs)
        sft = [
            {
                "messages": [p["prompt"][0], p["chosen"][0]],
                **({"regex": STYLE_REGEX} if split == "eval" else {}),
            }
            for p in pairs
        ]
        hashes[f"sft_{split}.jsonl"] = _jsonl(out_dir / f"sft_{split}.jsonl", sft)
        kto = []
        for p in pairs:
            kto.append({"prompt": p["prompt"], "completion": p["chosen"], "label": True})
            kto.append({"prompt": p["prompt"], "completion": p["rejected"], "label": False})
        hashes[f"kto_{split}.jsonl"] = _jsonl(out_dir / f"kto_{split}.jsonl", kto)
    manifest = {
        "seed": seed,
        "eval_share": eval_share,
        "style": {"chosen": styled("<answer>"), "rejected": plain("<answer>"), "regex": STYLE_REGEX},
        "rows": {"train": len(data["train"]), "eval": len(data["eval"])},
        "topics": data["topics"],
        "sha256_12": hashes,
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    return manifest


def ensure(out_dir: Path = DEFAULT_DIR, seed: int = 0) -> Path:
    """The task's files in `out_dir`, written if absent (the other benchmarks call this)."""
    if not (out_dir / "train.jsonl").exists() or not (out_dir / "eval.jsonl").exists():
        write(out_dir, seed)
    return out_dir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default=str(DEFAULT_DIR), help="where to write the files (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-share", type=float, default=0.2, help="share of each topic's entities held out")
    ap.add_argument("--out", default=None, help="markdown file whose section to write (e.g. docs/BENCHMARKS.md)")
    args = ap.parse_args()
    out_dir = Path(args.dir)
    m = write(out_dir, args.seed, args.eval_share)

    header = f"{'topic':<14} {'train':>5} {'eval':>5}  example held-out prompt"
    print(header)
    print("-" * len(header))
    for name, t in m["topics"].items():
        print(f"{name:<14} {t['train']:>5} {t['eval']:>5}  {t['example_eval']}")
    print(f"{'total':<14} {m['rows']['train']:>5} {m['rows']['eval']:>5}")
    print(f"chosen: {m['style']['chosen']!r}  rejected: {m['style']['rejected']!r}  regex: {STYLE_REGEX}")
    print(f"written to {out_dir}/ (train, eval, sft_*, kto_*, manifest.json)")

    if args.out:
        sys.path.insert(0, str(ROOT / "bench"))
        from report import replace_section

        rel = out_dir.resolve().relative_to(ROOT) if out_dir.resolve().is_relative_to(ROOT) else out_dir
        lines = [
            "## Preference task: a required answer style (`bench/preference_task.py`)",
            "",
            f"The data of the preference benchmarks (`bench/dpo_peer.py`, `bench/dpo_memory.py`) and of the recipes in "
            f"`bench/recipes/`, written to `{rel}/` (seed {m['seed']}). Every answer is correct on both sides; the "
            f"chosen one is in the required style `{m['style']['chosen']}`, the rejected one plain "
            f"(`{m['style']['rejected']}`). Greedy answers are checked with `{STYLE_REGEX}`. Held-out rows ask about "
            "entities never trained on, half of them in phrasings never trained on.",
            "",
            "| topic | train pairs | held-out pairs | example held-out prompt |",
            "|---|---|---|---|",
            *[f"| {name} | {t['train']} | {t['eval']} | {t['example_eval']} |" for name, t in m["topics"].items()],
            f"| total | {m['rows']['train']} | {m['rows']['eval']} | |",
            "",
        ]
        replace_section(Path(args.out), "## Preference task", "\n".join(lines))
        print(f"section written to {args.out}")


if __name__ == "__main__":
    main()
