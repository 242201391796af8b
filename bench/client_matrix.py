"""The client matrix: the libraries people build on, each against `toolkit serve` on the tiny base with the
quickstart adapter, one row per call, printed as a table (docs/CLIENTS.md records a run).

    .venv/bin/python bench/client_matrix.py            # or: make client-matrix

Set-up (all automatic): the clients go into their own virtual environment (build/client-venv, about 0.5 GB,
pinned below; they are not project dependencies); the tiny base and the quickstart adapter are built and trained
if adapters/quickstart is missing (`toolkit train recipes/quickstart.yaml`); the server is started on a free
port and stopped at the end. The rows run in the client environment (this file, `--rows URL`), so they import
only the clients. Exit status 1 if any row fails.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / "build" / "client-venv"
CLIENTS = [  # exact pins: the versions the table in docs/CLIENTS.md was measured with
    "openai==3.57.0",
    "openai-agents==0.24.0",
    "langchain-openai==1.7.4",
    "langchain-core==1.8.3",
    "litellm==1.110.2",
    "pydantic-ai-slim[openai]==2.68.0",
]
VERSIONS = ["openai", "openai-agents", "langchain-openai", "langchain-core", "litellm", "pydantic-ai-slim"]
QUESTION = "What is the capital of Japan?"
ANSWER = "Tokyo"


# ------------------------------------------------------------------------------------------------ the rows
def rows(url: str) -> list[tuple[str, str, object]]:
    """(client, call, function returning a short result that the call passed) for every row. Runs in the
    client environment: imports only the clients."""
    from typing import Literal

    from pydantic import BaseModel

    class City(BaseModel):
        city: Literal["Tokyo", "Paris"]

    v1 = url + "/v1"
    messages = [{"role": "user", "content": QUESTION}]

    def check(value: object, ok: bool) -> object:
        if not ok:
            raise AssertionError(f"unexpected result: {value!r}")
        return value

    import openai

    client = openai.OpenAI(base_url=v1, api_key="none", max_retries=0)

    def chat():
        r = client.chat.completions.create(model="quickstart", messages=messages, temperature=0)
        return check(r.choices[0].message.content, r.choices[0].message.content == ANSWER)

    def chat_stream():
        chunks = list(
            client.chat.completions.create(
                model="quickstart",
                messages=messages,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        usage = chunks[-1].usage
        return check(f"{text} (usage {usage.total_tokens})", text == ANSWER and usage.completion_tokens > 0)

    def chat_parse():
        r = client.chat.completions.parse(model="quickstart", messages=messages, response_format=City, temperature=0)
        return check(r.choices[0].message.parsed, isinstance(r.choices[0].message.parsed, City))

    def chat_logprobs():
        r = client.chat.completions.create(
            model="quickstart", messages=messages, temperature=0, logprobs=True, top_logprobs=2
        )
        content = r.choices[0].logprobs.content
        return check(f"{len(content)} tokens, top 2", len(content) > 0 and len(content[0].top_logprobs) == 2)

    def completions():
        r = client.completions.create(model="quickstart", prompt="The capital of Japan is", max_tokens=3, echo=True)
        return check(repr(r.choices[0].text), r.choices[0].text.startswith("The capital") and r.usage.completion_tokens)

    def responses():
        r = client.responses.create(model="quickstart", input=QUESTION, temperature=0)
        return check(r.output_text, r.output_text == ANSWER and r.status == "completed")

    def responses_stream():
        events = list(client.responses.create(model="quickstart", input=QUESTION, temperature=0, stream=True))
        text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
        return check(f"{text} ({len(events)} events)", text == ANSWER and events[-1].type == "response.completed")

    def responses_parse():
        r = client.responses.parse(model="quickstart", input=QUESTION, text_format=City, temperature=0)
        return check(r.output_parsed, isinstance(r.output_parsed, City))

    def tools_400():
        tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
        try:
            client.chat.completions.create(model="quickstart", messages=messages, tools=[tool])
        except openai.BadRequestError as err:
            return check(err.body["message"][:60], "tool calling is not supported" in err.body["message"])
        raise AssertionError("tools were accepted")

    def responses_tools_400():
        tool = {"type": "function", "name": "f", "parameters": {"type": "object", "properties": {}}}
        try:
            client.responses.create(model="quickstart", input=QUESTION, tools=[tool])
        except openai.BadRequestError as err:
            return check(f"param={err.body['param']}", err.body["param"] == "tools")
        raise AssertionError("tools were accepted")

    def agents():
        from agents import Agent, ModelSettings, OpenAIResponsesModel, Runner, set_tracing_disabled

        set_tracing_disabled(True)
        model = OpenAIResponsesModel(model="quickstart", openai_client=openai.AsyncOpenAI(base_url=v1, api_key="none"))
        agent = Agent(name="capitals", instructions="", model=model, model_settings=ModelSettings(temperature=0))
        out = Runner.run_sync(agent, QUESTION).final_output
        return check(out, out == ANSWER)

    def langchain_chat():
        from langchain_openai import ChatOpenAI

        return ChatOpenAI(model="quickstart", base_url=v1, api_key="none", temperature=0, max_retries=0)

    def lc_invoke():
        out = langchain_chat().invoke(QUESTION).content
        return check(out, out == ANSWER)

    def lc_stream():
        out = "".join(c.content for c in langchain_chat().stream(QUESTION))
        return check(out, out == ANSWER)

    def lc_batch():
        out = [m.content for m in langchain_chat().batch([QUESTION, QUESTION])]
        return check(out, out == [ANSWER, ANSWER])

    def lc_ainvoke():
        import asyncio

        out = asyncio.run(langchain_chat().ainvoke(QUESTION)).content
        return check(out, out == ANSWER)

    def lc_structured():
        out = langchain_chat().with_structured_output(City).invoke(QUESTION)
        return check(out, isinstance(out, City))

    def litellm_call(prefix: str, stream: bool = False):
        os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no cost-map download
        import litellm

        r = litellm.completion(
            model=f"{prefix}/quickstart", api_base=v1, api_key="none", messages=messages, temperature=0, stream=stream
        )
        out = "".join(c.choices[0].delta.content or "" for c in r) if stream else r.choices[0].message.content
        return check(out, out == ANSWER)

    def pydantic_ai(output_type=str):
        from pydantic_ai import Agent
        from pydantic_ai.models.openai import OpenAIChatModel
        from pydantic_ai.providers.openai import OpenAIProvider

        model = OpenAIChatModel("quickstart", provider=OpenAIProvider(base_url=v1, api_key="none"))
        return Agent(model, output_type=output_type).run_sync(QUESTION, model_settings={"temperature": 0}).output

    def pai_text():
        out = pydantic_ai()
        return check(out, out == ANSWER)

    def pai_native():
        from pydantic_ai import NativeOutput

        out = pydantic_ai(NativeOutput(City))
        return check(out, isinstance(out, City))

    return [
        ("openai", "chat.completions.create", chat),
        ("openai", "chat stream + usage", chat_stream),
        ("openai", "chat.completions.parse", chat_parse),
        ("openai", "chat logprobs (top 2)", chat_logprobs),
        ("openai", "completions.create (echo)", completions),
        ("openai", "responses.create", responses),
        ("openai", "responses.create stream", responses_stream),
        ("openai", "responses.parse", responses_parse),
        ("openai", "chat with tools -> 400", tools_400),
        ("openai", "responses with tools -> 400", responses_tools_400),
        ("openai-agents", "Runner.run_sync (Responses model, tracing off)", agents),
        ("langchain-openai", "ChatOpenAI.invoke", lc_invoke),
        ("langchain-openai", "ChatOpenAI.stream", lc_stream),
        ("langchain-openai", "ChatOpenAI.batch", lc_batch),
        ("langchain-openai", "ChatOpenAI.ainvoke", lc_ainvoke),
        ("langchain-openai", "with_structured_output", lc_structured),
        ("litellm", "completion openai/", lambda: litellm_call("openai")),
        ("litellm", "completion hosted_vllm/", lambda: litellm_call("hosted_vllm")),
        ("litellm", "completion openai/ stream", lambda: litellm_call("openai", stream=True)),
        ("pydantic-ai", "Agent text output", pai_text),
        ("pydantic-ai", "Agent NativeOutput", pai_native),
    ]


def run_rows(url: str) -> None:
    """Client-environment side: run every row, print one JSON line per row."""
    from importlib.metadata import version

    print(json.dumps({"versions": {name: version(name) for name in VERSIONS}}), flush=True)
    for client, call, fn in rows(url):
        try:
            result, ok = str(fn())[:60], True
        except Exception as exc:  # a failing row is a result, not a crash of the matrix
            last = traceback.format_exception_only(exc)[-1].strip()
            result, ok = last[:160], False
        print(json.dumps({"client": client, "call": call, "ok": ok, "result": result}), flush=True)


# ------------------------------------------------------------------------------------------------ set-up
def ensure_clients() -> Path:
    python = VENV / "bin" / "python"
    marker = VENV / ".clients"
    if not marker.exists() or marker.read_text() != "\n".join(CLIENTS):
        if not python.exists():
            subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", *CLIENTS], check=True)
        marker.write_text("\n".join(CLIENTS))
    return python


def ensure_adapter() -> Path:
    adapter = ROOT / "adapters" / "quickstart"
    if not (adapter / "adapter_config.json").exists():
        print("training the quickstart adapter (toolkit train recipes/quickstart.yaml) ...", flush=True)
        subprocess.run([sys.executable, "-m", "cli", "train", "recipes/quickstart.yaml"], cwd=ROOT, check=True)
    return adapter


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(port: int, log: Path) -> subprocess.Popen:
    import httpx

    base = str(ROOT / "build" / "tiny-base")  # recipes/quickstart.yaml's base (built by `toolkit train` if missing)
    command = [sys.executable, "-m", "cli", "serve", "--base", base, "--adapter", "quickstart", "--port", str(port)]
    command += ["--device", "cpu"]
    proc = subprocess.Popen(command, cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited ({proc.returncode}); see {log}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(1)
    proc.kill()
    raise SystemExit(f"the server did not come up in 600 s; see {log}")


def table(versions: dict, results: list[dict]) -> str:
    lines = ["| client | version | call | result | |", "|---|---|---|---|---|"]
    for r in results:
        name = "pydantic-ai-slim" if r["client"] == "pydantic-ai" else r["client"]
        result = r["result"].replace("|", "\\|")
        lines.append(
            f"| {r['client']} | {versions.get(name, '?')} | {r['call']} | {result} | {'pass' if r['ok'] else 'FAIL'} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", metavar="URL", help="(internal) run the rows against URL in the client environment")
    ap.add_argument("--url", help="use a running server instead of starting one (it must serve 'quickstart')")
    args = ap.parse_args()
    if args.rows:
        return run_rows(args.rows)
    python = ensure_clients()
    server = None
    url = args.url
    if url is None:
        ensure_adapter()
        port = free_port()
        server = start_server(port, ROOT / "build" / "client-matrix-server.log")
        url = f"http://127.0.0.1:{port}"
    try:
        env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "OPENAI_AGENTS_DISABLE_TRACING": "1"}
        out = subprocess.run(
            [str(python), __file__, "--rows", url], capture_output=True, text=True, env=env, cwd=ROOT, timeout=1800
        )
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
    lines = [json.loads(x) for x in out.stdout.splitlines() if x.startswith("{")]
    if not lines:
        raise SystemExit(f"the client rows did not run:\n{out.stderr[-3000:]}")
    versions, results = lines[0]["versions"], lines[1:]
    print(table(versions, results))
    passed = sum(r["ok"] for r in results)
    print(f"\n{passed}/{len(results)} rows pass ({time.strftime('%Y-%m-%d')}, server {url})")
    sys.exit(0 if passed == len(results) else 1)


if __name__ == "__main__":
    main()
