"""Ask a running `toolkit serve` two questions with the official openai SDK: one text, one with an image.

python examples/openai_client.py [--url http://127.0.0.1:8000/v1] [--model quickstart] [--image FILE]
"""

from __future__ import annotations

import argparse
import base64
import os
import time
from pathlib import Path

import openai


def _wait_until_up(url: str, seconds: float) -> None:
    import httpx

    deadline = time.monotonic() + seconds
    while True:
        try:
            if httpx.get(url.removesuffix("/v1") + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"no server answered at {url} within {seconds:.0f} s")
        time.sleep(0.5)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8000/v1")
    ap.add_argument("--model", default="quickstart")
    ap.add_argument("--image", default="build/red-square.png")
    ap.add_argument("--wait", type=float, default=0, help="seconds to wait for the server to come up")
    args = ap.parse_args()
    _wait_until_up(args.url, args.wait)
    client = openai.OpenAI(base_url=args.url, api_key=os.environ.get("TOOLKIT_API_KEY", "none"))

    question = "Which city is the capital of Japan?"
    reply = client.chat.completions.create(
        model=args.model, messages=[{"role": "user", "content": question}], temperature=0
    )
    print(f"[{args.model}] {question} -> {reply.choices[0].message.content!r}")

    uri = "data:image/png;base64," + base64.b64encode(Path(args.image).read_bytes()).decode()
    content = [{"type": "text", "text": "What color is the square?"}, {"type": "image_url", "image_url": {"url": uri}}]
    stream = client.chat.completions.create(
        model=args.model, messages=[{"role": "user", "content": content}], temperature=0, stream=True
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    print(f"[{args.model}] What color is the square? [+ {args.image}] -> {text!r} (streamed)")


if __name__ == "__main__":
    main()
