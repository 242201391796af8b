"""Rebuild openai_subset.json from a full copy of OpenAI's published OpenAPI document (see README.md).

    .venv/bin/python tests/openapi/extract.py PATH/TO/openapi.yaml [--document NAME] [--origin WHERE]

Keeps the schemas in ROOTS and every schema they $ref, drops annotations (descriptions, examples, x-*
extensions) and keeps every validation keyword as published. The JSON's `source` records where the subset came
from: the document's file name (the given file's own name unless --document names the published one, e.g. when
the copy was saved under another name), --origin when given (e.g. "github.com/openai/openai-openapi@COMMIT"),
its size and sha256. Not run by the suite.
"""

from __future__ import annotations

import argparse
import hashlib
import json
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


def main(source: str, document: str | None = None, origin: str | None = None) -> None:
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
            "document": document or Path(source).name,
            **({"origin": origin} if origin else {}),
            "openapi": doc["openapi"],
            "info_version": doc["info"]["version"],
            "bytes": len(raw),
            "sha256": hashlib.sha256(raw).hexdigest(),
            "roots": ROOTS,
        },
        "schemas": dict(sorted(keep.items())),
    }
    (HERE / "openai_subset.json").write_text(json.dumps(subset, indent=1, sort_keys=False) + "\n")
    print(f"{len(keep)} schemas -> {HERE / 'openai_subset.json'}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("path", help="a full copy of the OpenAPI document (YAML or JSON)")
    parser.add_argument("--document", help="the document's published file name (default: PATH's own name)")
    parser.add_argument("--origin", help="where the copy came from, recorded as given")
    args = parser.parse_args()
    main(args.path, document=args.document, origin=args.origin)
