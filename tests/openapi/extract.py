"""Rebuild openai_subset.json from a full copy of OpenAI's published OpenAPI document (see README.md).

    .venv/bin/python tests/openapi/extract.py PATH/TO/openapi.documented.yml

Keeps the schemas in ROOTS and every schema they $ref, drops annotations (descriptions, examples, x-*
extensions) and keeps every validation keyword as published. Not run by the suite.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).parent
ROOTS = [
    "CreateChatCompletionRequest",
    "CreateChatCompletionResponse",
    "CreateChatCompletionStreamResponse",
    "CreateCompletionRequest",
    "CreateCompletionResponse",
    "ErrorResponse",
    "ListModelsResponse",
    "Model",
    "Response",  # the Responses API, for /v1/responses
    "ResponseStreamEvent",
]
ANNOTATIONS = {"description", "example", "examples", "title", "deprecated", "$comment"}


def strip(node, in_properties: bool = False):
    """Drop annotation keys of schemas; a `properties` map's own keys are field names and always stay."""
    if isinstance(node, list):
        return [strip(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if not in_properties and (key in ANNOTATIONS or key.startswith("x-")):
            continue
        out[key] = strip(value, in_properties=(key in ("properties", "patternProperties") and not in_properties))
    return out


def refs(node, found: set[str]) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                found.add(value.rsplit("/", 1)[-1])
            else:
                refs(value, found)
    elif isinstance(node, list):
        for value in node:
            refs(value, found)


def main(source: str) -> None:
    raw = Path(source).read_bytes()
    doc = yaml.load(raw, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    schemas = doc["components"]["schemas"]
    keep, todo = {}, list(ROOTS)
    while todo:
        name = todo.pop()
        if name in keep:
            continue
        keep[name] = strip(schemas[name])
        found: set[str] = set()
        refs(keep[name], found)
        todo += sorted(found)
    subset = {
        "source": {
            "document": "openapi.documented.yml",
            "openapi": doc["openapi"],
            "info_version": doc["info"]["version"],
            "sha256": hashlib.sha256(raw).hexdigest(),
            "roots": ROOTS,
        },
        "schemas": dict(sorted(keep.items())),
    }
    (HERE / "openai_subset.json").write_text(json.dumps(subset, indent=1, sort_keys=False) + "\n")
    print(f"{len(keep)} schemas -> {HERE / 'openai_subset.json'}")


if __name__ == "__main__":
    main(sys.argv[1])
