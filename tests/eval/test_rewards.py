"""GRPO rewards (toolkit/eval/rewards.py): every built-in on hand-made completions, user functions from a file, the
weighted total, and the errors a recipe or a reward function can cause. No model."""

from __future__ import annotations

import json
import math
import textwrap

import pytest

from toolkit.errors import ToolkitError
from toolkit.eval.rewards import Reward, build_rewards, completion_text, score_rewards, weighted_total
from toolkit.recipe import RewardSpec

SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}


def _rewards(tmp_path, *specs: dict) -> list[Reward]:
    return build_rewards([RewardSpec(**s) for s in specs], tmp_path)


def _score(rewards, texts, columns=None, ids=None, conversational=False, **extra):
    n = len(texts)
    completions = [[{"role": "assistant", "content": t}] for t in texts] if conversational else list(texts)
    prompts = [[{"role": "user", "content": "q"}]] * n if conversational else ["q"] * n
    return score_rewards(
        rewards,
        prompts,
        completions,
        ids or [[5, 6, 1]] * n,
        columns or [{}] * n,
        [f"data/train.jsonl:{k + 1}" for k in range(n)],
        **extra,
    )


def _write(tmp_path, name: str, source: str):
    (tmp_path / name).write_text(textwrap.dedent(source))


# ------------------------------------------------------------------------------------------------- completions


def test_completion_text_of_strings_and_messages():
    assert completion_text("Paris") == "Paris"
    assert completion_text([{"role": "assistant", "content": "Paris"}]) == "Paris"
    tool_then_answer = [{"role": "assistant", "content": "thinking"}, {"role": "assistant", "content": "Rome"}]
    assert completion_text(tool_then_answer) == "Rome"  # the last message is the answer
    parts = [{"type": "text", "text": "Par"}, {"type": "image"}, {"type": "text", "text": "is"}]
    assert completion_text([{"role": "assistant", "content": parts}]) == "Paris"
    assert completion_text([{"role": "assistant", "content": None}]) == ""


# ------------------------------------------------------------------------------------------------- built-ins


@pytest.mark.parametrize("conversational", [False, True])
def test_exact_and_contains(tmp_path, conversational):
    rewards = _rewards(tmp_path, {"type": "exact"}, {"type": "contains"}, {"type": "exact", "column": "city"})
    columns = [{"answer": "Paris", "city": "Paris"}, {"answer": "Paris"}, {"answer": 42}, {}]
    texts = [" Paris\n", "It is PARIS.", "42", "Paris"]
    exact, contains, city = _score(rewards, texts, columns, conversational=conversational)
    assert exact[:3] == [1.0, 0.0, 1.0]  # the column's value as a string: 42 == "42"
    assert contains[:3] == [1.0, 1.0, 1.0]
    assert city[0] == 1.0
    # rows without the column: NaN (None from the built-in), not a zero
    assert math.isnan(exact[3]) and math.isnan(contains[3]) and math.isnan(city[1]) and math.isnan(city[3])


@pytest.mark.parametrize("conversational", [False, True])
def test_regex_with_a_pattern_and_with_a_column(tmp_path, conversational):
    rewards = _rewards(tmp_path, {"type": "regex", "pattern": r"^[A-Z ]+$"}, {"type": "regex", "column": "re"})
    columns = [{"re": r"\d+"}, {"re": r"^no"}, {}]
    fixed, per_row = _score(rewards, ["SHOUT IT", "quiet 12", "X"], columns, conversational=conversational)
    assert fixed == [1.0, 0.0, 1.0]
    assert per_row[:2] == [0.0, 0.0] and math.isnan(per_row[2])
    assert _score(rewards, ["a 7", "no"], [{"re": r"\d+"}, {"re": r"^no"}])[1] == [1.0, 1.0]


def test_regex_bad_row_pattern_names_the_row_and_column(tmp_path):
    rewards = _rewards(tmp_path, {"type": "regex", "column": "re"})
    with pytest.raises(ToolkitError, match=r"data/train\.jsonl:2: reward regex: .*column 're' .*regular expression"):
        _score(rewards, ["a", "b", "c"], [{"re": "a"}, {"re": "(unclosed"}, {"re": "c"}])


@pytest.mark.parametrize("conversational", [False, True])
def test_json_schema_with_dict_and_string_schemas(tmp_path, conversational):
    rewards = _rewards(tmp_path, {"type": "json_schema"})
    texts = [
        '{"city": "Paris"}',  # valid, dict schema
        ' {"city": "Paris"} \n',  # valid, string schema, surrounding whitespace
        '```json\n{"city": "Rome"}\n```',  # the whole answer is one fenced block
        '```\n{"city": "Rome"}\n```',  # a fence without a language
        '{"city": 3}',  # JSON, but not valid against the schema
        "The answer is Paris",  # not JSON
        '```json\n{"city": "A"}\n```\n```json\n{"city": "B"}\n```',  # two blocks: not one JSON document
        'Here: ```json\n{"city": "Rome"}\n```',  # text around the block: not JSON
        '{"city": "Paris"}',  # no schema in the row
    ]
    schemas = [SCHEMA, json.dumps(SCHEMA)] + [SCHEMA] * 6
    columns = [{"schema": s} for s in schemas] + [{}]
    (values,) = _score(rewards, texts, columns, conversational=conversational)
    assert values[:8] == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    assert math.isnan(values[8])


def test_json_schema_from_another_column(tmp_path):
    rewards = _rewards(tmp_path, {"type": "json_schema", "column": "shape"})
    assert _score(rewards, ["[1, 2]", "[1]"], [{"shape": {"type": "array", "minItems": 2}}] * 2) == [[1.0, 0.0]]


@pytest.mark.parametrize(
    ("schema", "why"),
    [({"type": "nope"}, "not a valid JSON schema"), ("{not json", "not a valid JSON schema .not JSON")],
)
def test_json_schema_invalid_schema_in_a_row(tmp_path, schema, why):
    rewards = _rewards(tmp_path, {"type": "json_schema"})
    columns = [{"schema": SCHEMA}, {"schema": SCHEMA}, {"schema": schema}]
    with pytest.raises(ToolkitError, match=rf"data/train\.jsonl:3: reward json_schema: .*column 'schema' is {why}"):
        _score(rewards, ["{}", "{}", "not JSON"], columns)  # an error even where the answer is not JSON


def test_length(tmp_path):
    rewards = _rewards(tmp_path, {"type": "length", "target": 4})
    ids = [[7, 7, 7, 7, 106], [7, 7, 7, 7, 1], [7, 7, 7, 7], [7, 7], [7] * 8, [7] * 12, [], [106]]
    (values,) = _score(rewards, ["x"] * len(ids), ids=ids)
    # the trailing stop token (<end_of_turn> 106, <eos> 1) is not counted; at most 0 below
    assert values == [1.0, 1.0, 1.0, 0.5, 0.0, 0.0, 0.0, 0.0]
    (values,) = _score(rewards, ["x", "x"], ids=[[7, 7, 7], [7, 7, 7, 7, 7, 106]], conversational=True)
    assert values == [0.75, 0.75]


# ------------------------------------------------------------------------------------------------- names, weights


def test_names_are_unique_and_default_to_the_type(tmp_path):
    rewards = _rewards(
        tmp_path,
        {"type": "regex", "pattern": "a"},
        {"type": "regex", "pattern": "b"},
        {"type": "regex", "pattern": "c", "name": "regex"},
        {"type": "exact", "name": "right", "weight": 2},
        {"type": "length", "target": 3},
    )
    assert [r.name for r in rewards] == ["regex", "regex_2", "regex_3", "right", "length"]
    assert [r.weight for r in rewards] == [1.0, 1.0, 1.0, 2.0, 1.0]
    assert [r.where for r in rewards] == [f"training.rewards[{i}]" for i in range(5)]


def test_weighted_total_skips_nan(tmp_path):
    rewards = _rewards(tmp_path, {"type": "exact", "weight": 2}, {"type": "regex", "pattern": "P", "weight": 0.5})
    per_reward = _score(rewards, ["Paris", "Lyon", "Paris"], [{"answer": "Paris"}, {"answer": "Paris"}, {}])
    assert per_reward[0][:2] == [1.0, 0.0] and math.isnan(per_reward[0][2])
    assert per_reward[1] == [1.0, 0.0, 1.0]
    assert weighted_total(rewards, per_reward) == [2.5, 0.0, 0.5]
    total = weighted_total(rewards, [[math.nan, 1.0], [math.nan, math.nan]])
    assert math.isnan(total[0]) and total[1] == 2.0  # all NaN stays NaN (no reward applies)


# ------------------------------------------------------------------------------------------------- user functions


def test_a_user_function_loads_and_scores(tmp_path):
    _write(
        tmp_path,
        "my_rewards.py",
        """
        def right_city(prompts, completions, completion_ids, answer, **kwargs):
            seen.append(sorted(kwargs))
            return [None if a is None else float(c[-1]["content"] == a) for c, a in zip(completions, answer)]

        def short(completions, **kwargs):
            return [len(c[-1]["content"]) < 6 for c in completions]  # bools count as 0 / 1

        seen = []
        """,
    )
    (tmp_path / "sub").mkdir()
    specs = [
        {"type": "function", "path": "my_rewards.py:right_city", "weight": 3},
        {"type": "function", "path": "my_rewards.py:short", "name": "brief"},
    ]
    rewards = _rewards(tmp_path, *specs)
    assert [(r.name, r.weight) for r in rewards] == [("right_city", 3.0), ("brief", 1.0)]
    columns = [{"answer": "Paris", "id": 1}, {"answer": "Paris"}, {"id": 3}]
    per_reward = _score(rewards, ["Paris", "Lyon!!", "Paris"], columns, conversational=True, trainer_state="S")
    assert per_reward[0][:2] == [1.0, 0.0] and math.isnan(per_reward[0][2])  # row 3 lacks `answer`: None
    assert per_reward[1] == [1.0, 0.0, 1.0]
    assert weighted_total(rewards, per_reward) == [4.0, 0.0, 1.0]
    module = __import__("sys").modules[rewards[0].fn.__module__]
    assert module.seen == [["id", "trainer_state"]]  # every column, None where a row lacks it, and the extras
    # the same file name in another recipe's folder is another module
    _write(
        tmp_path / "sub", "my_rewards.py", "def right_city(completions, **kw):\n    return [0.5] * len(completions)\n"
    )
    other = build_rewards([RewardSpec(type="function", path="my_rewards.py:right_city")], tmp_path / "sub")
    assert _score(other, ["x"]) == [[0.5]] and other[0].fn.__module__ != rewards[0].fn.__module__
    assert _score(rewards[:1], ["Paris"], [{"answer": "Paris"}], conversational=True) == [
        [1.0]
    ]  # the first one is still itself


@pytest.mark.parametrize(
    ("files", "path", "match"),
    [
        ({}, "missing.py:f", r"training\.rewards\[0\]\.path: reward file missing\.py not found"),
        ({"r.txt": "def f(): pass"}, "r.txt:f", r"training\.rewards\[0\]\.path: .*not a Python file"),
        ({"r.py": "def g(**kw):\n    return []\n"}, "r.py:f", r"training\.rewards\[0\]\.path: r\.py has no 'f' .*g"),
        ({"r.py": "f = 3\n"}, "r.py:f", r"r\.py:f is a int, not a function"),
        ({"r.py": "x = 1\n\ndef f(:\n    pass\n"}, "r.py:f", r"r\.py line 3: syntax error"),
        ({"r.py": "import os\nraise ValueError('no key')\n"}, "r.py:f", r"raised ValueError \(line 2\): no key"),
        ({"r.py": "import not_a_module_xyz\n"}, "r.py:f", r"raised ModuleNotFoundError \(line 1\)"),
    ],
)
def test_loading_errors(tmp_path, files, path, match):
    for name, source in files.items():
        _write(tmp_path, name, source)
    with pytest.raises(ToolkitError, match=match):
        _rewards(tmp_path, {"type": "exact"}) + _rewards(tmp_path, {"type": "function", "path": path})


def test_the_error_names_the_reward_index(tmp_path):
    with pytest.raises(ToolkitError, match=r"training\.rewards\[1\]\.path"):
        _rewards(tmp_path, {"type": "exact"}, {"type": "function", "path": "nope.py:f"})


def _user(tmp_path, body: str) -> list[Reward]:
    _write(tmp_path, "r.py", "def f(prompts, completions, completion_ids, **kwargs):\n" + textwrap.indent(body, "    "))
    return _rewards(tmp_path, {"type": "function", "path": "r.py:f"})


def test_a_function_raising_on_one_row_names_that_row(tmp_path):
    rewards = _user(tmp_path, "return [1.0 / len(a) for a in kwargs['answer']]\n")
    columns = [{"answer": "Paris"}, {"answer": "Rome"}, {"answer": ""}, {"answer": ""}]
    with pytest.raises(ToolkitError, match=r"^data/train\.jsonl:3: reward function f raised ZeroDivisionError"):
        _score(rewards, ["a", "b", "c", "d"], columns)


def test_a_function_raising_on_every_row_names_the_batch(tmp_path):
    _write(tmp_path, "r.py", "def f(completions):\n    return [1.0] * len(completions)\n")  # no **kwargs
    rewards = _rewards(tmp_path, {"type": "function", "path": "r.py:f"})
    with pytest.raises(ToolkitError, match=r"^data/train\.jsonl:1, data/train\.jsonl:2: reward function f raised Type"):
        _score(rewards, ["a", "b"])


def test_a_function_raising_only_on_the_batch_names_the_batch(tmp_path):
    rewards = _user(tmp_path, "assert len(completions) == 1, 'one at a time'\nreturn [1.0]\n")
    with pytest.raises(ToolkitError, match=r"^data/train\.jsonl:1, data/train\.jsonl:2: .*AssertionError: one at a"):
        _score(rewards, ["a", "b"])


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ("return [1.0]\n", r"^data/train\.jsonl:1, data/train\.jsonl:2: reward function f returned a list of length 1"),
        ("return 'good'\n", r"returned a str of length 4 'good', expected a list of 2 values"),
        ("return 1.0\n", r"returned a float 1\.0, expected a list of 2"),
        ("return [1.0, 'x']\n", r"^data/train\.jsonl:2: reward function f returned 'x' \(str\) for completion 1"),
        ("return [float('inf'), 1]\n", r"^data/train\.jsonl:1: reward function f returned inf \(float\)"),
    ],
)
def test_bad_return_values(tmp_path, body, match):
    with pytest.raises(ToolkitError, match=match):
        _score(_user(tmp_path, body), ["a", "b"])


def test_return_values_that_are_fine(tmp_path):
    assert _score(_user(tmp_path, "return (True, None)\n"), ["a", "b"])[0][0] == 1.0
    (values,) = _score(_user(tmp_path, "return [0, None]\n"), ["a", "b"])
    assert values[0] == 0.0 and math.isnan(values[1])
