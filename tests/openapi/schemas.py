"""OpenAI's published schemas (openai_subset.json, see README.md) as strict JSON Schema validators.

OpenAPI is turned into JSON Schema 2020-12 here: `nullable: true` becomes "or null", and every object schema
with `properties` gets `unevaluatedProperties: false` (OpenAI's document leaves extra fields open; a body is
only "as OpenAI's" when it has no field the schema does not name), except schemas that are allOf members
(their siblings add the rest). `$ref`s resolve inside the one document. The card's deliberate deviations
(deviations.py) are taken out of a body before it is validated, each only in the form the card gives it, so
the validator allows exactly those and nothing else. Validation is jsonschema_rs (already locked for
schemathesis; a maintained Draft 2020-12 validator).
"""

from __future__ import annotations

import copy
import json
from functools import cache
from pathlib import Path
from typing import Any

from openapi.deviations import DEVIATIONS, DROP, Deviation

SUBSET = Path(__file__).with_name("openai_subset.json")
DRAFT = "https://json-schema.org/draft/2020-12/schema"


@cache
def document() -> dict:
    """The subset as one JSON Schema document: {"components": {"schemas": {...}}} in JSON Schema terms."""
    schemas = json.loads(SUBSET.read_text())["schemas"]
    open_ = _allof_members(schemas)
    converted = {name: _convert(s, strict=name not in open_) for name, s in schemas.items()}
    return {"$schema": DRAFT, "components": {"schemas": converted}}


def raw_schema(name: str) -> dict:
    """A schema as published (annotations dropped), before any conversion."""
    return json.loads(SUBSET.read_text())["schemas"][name]


@cache
def _validator(name: str) -> Any:
    import jsonschema_rs

    return jsonschema_rs.validator_for({**document(), "$ref": f"#/components/schemas/{name}"})


def errors(instance: Any, name: str) -> list[str]:
    """Every way `instance` differs from OpenAI's schema `name` ("Name/stream": a streamed chunk of Name), after
    the card's deviations are taken out."""
    body = without_deviations(instance, name)
    schema = name.split("/")[0]
    return [
        f"{name} at /{'/'.join(map(str, e.instance_path))}: {e.message}" for e in _validator(schema).iter_errors(body)
    ]


def assert_valid(instance: Any, name: str) -> None:
    found = errors(instance, name)
    assert not found, "\n".join(found[:20]) + f"\nbody: {json.dumps(instance)[:2000]}"


def without_deviations(instance: Any, name: str) -> Any:
    body = copy.deepcopy(instance)
    for d in DEVIATIONS:
        if d.schema in (name, name.split("/")[0]):
            _drop(body, d.path.split("."), d)
    return body


def _drop(node: Any, parts: list[str], d: Deviation) -> None:
    """Delete the deviation's field (or first list item) under `node` where its value has the allowed form."""
    key, rest = parts[0], parts[1:]
    key, _, index = key.partition("[")  # "key", "key[]" (every item) or "key[0]" (the first item)
    if not isinstance(node, dict) or key not in node:
        return
    if not index:
        if rest:
            _drop(node[key], rest, d)
        elif d.allows(node[key]):
            if d.stand_in is DROP:
                del node[key]
            else:
                node[key] = d.stand_in
        return
    items = node[key]
    if not isinstance(items, list) or not items:
        return
    if index == "]":
        for item in items:
            if rest:
                _drop(item, rest, d)
    elif rest:
        _drop(items[0], rest, d)
    elif d.allows(items[0]):
        del items[0]


def request_properties(name: str = "CreateChatCompletionRequest") -> set[str]:
    """Every field a request schema names, through its allOf parts and $refs."""
    schemas = json.loads(SUBSET.read_text())["schemas"]
    found: set[str] = set()

    def walk(s: dict) -> None:
        if "$ref" in s:
            walk(schemas[s["$ref"].rsplit("/", 1)[-1]])
        for part in s.get("allOf", []):
            walk(part)
        found.update(s.get("properties", {}))

    walk(schemas[name])
    return found


# ------------------------------------------------------------------------------------------- OpenAPI -> JSON Schema
def _allof_members(schemas: dict) -> set[str]:
    members: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for part in node.get("allOf", []):
                if "$ref" in part:
                    members.add(part["$ref"].rsplit("/", 1)[-1])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schemas)
    return members


def _convert(node: Any, strict: bool = True, in_properties: bool = False) -> Any:
    if isinstance(node, list):
        return [_convert(v) for v in node]
    if not isinstance(node, dict):
        return node
    if in_properties:  # a map of field names to schemas: the names are not keywords
        return {k: _convert(v) for k, v in node.items()}
    out = {}
    for key, value in node.items():
        if key == "allOf":
            out[key] = [_convert(v, strict=False) for v in value]  # siblings add the rest: no strictness inside
        else:
            out[key] = _convert(value, in_properties=key in ("properties", "patternProperties"))
    if strict and ("properties" in out or "allOf" in out) and "additionalProperties" not in out:
        out["unevaluatedProperties"] = False
    if out.pop("nullable", False):
        out = {"anyOf": [out, {"type": "null"}]}
    return out
