"""Writes the quickstart dataset beside this file: train.jsonl, eval.jsonl and images/*.png.

    python recipes/data/quickstart/generate.py

Two tasks a tiny model can learn in minutes on CPU, each with a held-out eval split:
- text: the capital of a country. Train rows use four phrasings, eval rows two phrasings never trained on.
- image: the colour of a square on a plain background. Eval images have positions and sizes never trained on.
The same tasks as preference pairs for recipes/quickstart-dpo.yaml (preference_train.jsonl, preference_eval.jsonl,
TRL's explicit conversational form; image rows as TRL's vision rows: an `images` column and `{"type": "image"}`
placeholders): the right answer is chosen, a wrong one (another capital, another colour) rejected. And as GRPO's
prompt rows for recipes/quickstart-grpo.yaml (grpo_train.jsonl, grpo_eval.jsonl): the prompt, the answer in a column.
Deterministic (seeded); tests/test_quickstart_data.py checks that the committed files match this script.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # run from anywhere in the repo

from toolkit.data.images import make_square_image  # noqa: E402

CAPITALS = {
    "France": "Paris",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Germany": "Berlin",
    "Japan": "Tokyo",
    "Egypt": "Cairo",
    "Peru": "Lima",
    "Kenya": "Nairobi",
}
TRAIN_PHRASES = [
    "What is the capital of {c}?",
    "Name the capital of {c}.",
    "Tell me the capital of {c}.",
    "What city is the capital of {c}?",
]
EVAL_PHRASES = ["Which city is the capital of {c}?", "{c}: what is the capital?"]
COLOURS = ["red", "green", "blue", "yellow", "black", "purple"]
COLOUR_QUESTIONS = ["What color is the square?", "Which color is the shape?", "Name the color of the square."]
SYSTEM = "Answer with one word."
TRAIN_IMAGES_PER_COLOUR, EVAL_IMAGES_PER_COLOUR = 8, 2


def _row(user, answer, system=None, regex=None):
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": user},
        {"role": "assistant", "content": answer},
    ]
    return {"messages": messages, **({"regex": regex} if regex else {})}


def _image_part(rel):
    return {"type": "image_url", "image_url": {"url": rel}}


def generate(out: Path) -> None:
    rng = random.Random(0)
    (out / "images").mkdir(parents=True, exist_ok=True)
    train, evals = [], []
    for i, (country, capital) in enumerate(CAPITALS.items()):
        for j, phrase in enumerate(TRAIN_PHRASES):
            train.append(_row(phrase.format(c=country), capital, SYSTEM if (i + j) % 3 == 0 else None))
        for phrase in EVAL_PHRASES:
            evals.append(_row(phrase.format(c=country), capital, regex=f"^{capital}\\b"))
    countries = list(CAPITALS.items())
    for k in range(4):  # two-turn rows: every assistant turn is trained on
        (c1, a1), (c2, a2) = countries[2 * k], countries[2 * k + 1]
        train.append(
            {
                "messages": [
                    {"role": "user", "content": TRAIN_PHRASES[0].format(c=c1)},
                    {"role": "assistant", "content": a1},
                    {"role": "user", "content": TRAIN_PHRASES[1].format(c=c2)},
                    {"role": "assistant", "content": a2},
                ]
            }
        )
    for colour in COLOURS:
        for n in range(TRAIN_IMAGES_PER_COLOUR + EVAL_IMAGES_PER_COLOUR):
            held_out = n >= TRAIN_IMAGES_PER_COLOUR
            side = rng.randint(24, 40) if not held_out else rng.choice([18, 46])
            x, y = rng.randint(0, 64 - side), rng.randint(0, 64 - side)
            background = rng.choice(["white", "lightgray"])
            rel = f"images/{colour}-{n}.png"
            make_square_image(
                out / rel, color=colour, size=64, background=background, box=(x, y, x + side - 1, y + side - 1)
            )
            question = COLOUR_QUESTIONS[n % len(COLOUR_QUESTIONS)]
            content = [{"type": "text", "text": question}, _image_part(rel)]
            row = _row(
                content,
                colour,
                SYSTEM if n % 4 == 0 and not held_out else None,
                regex=f"^{colour}\\b" if held_out else None,
            )
            (evals if held_out else train).append(row)
    rng.shuffle(train)
    pref_train, pref_eval = _pairs(train, rng), _pairs(evals, rng)
    for name, rows in (
        ("train.jsonl", train),
        ("eval.jsonl", evals),
        ("preference_train.jsonl", pref_train),
        ("preference_eval.jsonl", pref_eval),
        ("grpo_train.jsonl", _prompts(train)),
        ("grpo_eval.jsonl", _prompts(evals)),
    ):
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in rows))


def _prompt(messages: list[dict]) -> tuple[list[dict], list[str]]:
    """A prompt in TRL's form, and its images: image parts become placeholders, the files go to `images`."""
    prompt, images = [], []
    for m in messages:
        content = m["content"]
        if isinstance(content, list):
            images += [p["image_url"]["url"] for p in content if p["type"] == "image_url"]
            content = [p if p["type"] == "text" else {"type": "image"} for p in content]
        prompt.append({"role": m["role"], "content": content})
    return prompt, images


def _prompts(rows: list[dict]) -> list[dict]:
    """Single-answer rows as GRPO's prompt rows: the prompt, and the answer in a column for the rewards."""
    out = []
    for row in rows:
        messages = row["messages"]
        if len(messages) > 3:
            continue
        prompt, images = _prompt(messages[:-1])
        item = {"prompt": prompt, "answer": messages[-1]["content"]}
        out.append({**item, "images": images} if images else item)
    return out


def _pairs(rows: list[dict], rng: random.Random) -> list[dict]:
    """Single-answer rows as preference pairs: the answer chosen, another answer of the same task rejected."""
    pairs = []
    for row in rows:
        messages = row["messages"]
        if len(messages) > 3:
            continue  # the two-turn rows stay SFT's
        answer = messages[-1]["content"]
        pool = COLOURS if answer in COLOURS else list(CAPITALS.values())
        wrong = rng.choice([a for a in pool if a != answer])
        prompt, images = _prompt(messages[:-1])  # TRL's vision rows: placeholders in the prompt, files in `images`
        pair = {
            "prompt": prompt,
            "chosen": [{"role": "assistant", "content": answer}],
            "rejected": [{"role": "assistant", "content": wrong}],
        }
        pairs.append({**pair, "images": images} if images else pair)
    return pairs


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent)
    print("wrote the quickstart dataset")
