"""Serving logic of /v1/completions (OpenAI's legacy text completions, as vLLM serves them): prompts as text or
token ids -> engine rows -> body or SSE chunks. This is what log-likelihood benchmarks need (lm-evaluation-
harness's `local-completions`: echo + logprobs + max_tokens 0 or 1 scores a continuation).

A text prompt is tokenized as is, with <bos> and no chat template (a base-model prompt); a token-id prompt is
taken exactly. `echo` puts the prompt before the generated text and, with `logprobs`, the prompt tokens'
log probabilities (the first token has none) before the generated ones: both come from the engine's
prompt_logprobs, computed from the same prefill that generates. Choices are ordered prompt by prompt, n each.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from toolkit.serve import logprobs as lp
from toolkit.serve.protocol import CompletionChoice, CompletionRequest, CompletionResponse, completion_id
from toolkit.serve.serving import (
    ChoiceStream,
    Row,
    ServerState,
    check_model,
    each_event,
    fit_max_tokens,
    run_all,
    sampling_params,
    sse,
    sse_error,
    submit,
    usage,
)
from toolkit.serve.serving import _check_token_ids as check_token_ids


class _Prompt:
    def __init__(self, ids: list[int], text: str) -> None:
        self.ids, self.text = ids, text


def _prompts(state: ServerState, req: CompletionRequest) -> list[_Prompt]:
    tok = state.base.tokenizer
    out = []
    for i, p in enumerate(req.prompts()):
        if isinstance(p, str):
            out.append(_Prompt(tok(p).input_ids, p))
        else:
            check_token_ids(state, p, "prompt" if len(req.prompts()) == 1 else f"prompt[{i}]")
            out.append(_Prompt(list(p), tok.decode(p, skip_special_tokens=req.skip_special_tokens)))
    return out


def _prepare(state: ServerState, req: CompletionRequest) -> tuple[list[_Prompt], int, list[Any]]:
    prompts = _prompts(state, req)
    max_tokens = min(fit_max_tokens(state, len(p.ids), req.max_tokens, 16, "prompt") for p in prompts)
    k = req.logprobs
    want_prompt = req.prompt_logprobs if req.prompt_logprobs is not None else (k if req.echo else None)
    params = sampling_params(state, req, max_tokens, req.n * len(prompts), logprobs=k, prompt_logprobs=want_prompt)
    for i, p in enumerate(params):
        p.seed = None if req.seed is None else req.seed + i % req.n  # each prompt's n choices: seeds seed..seed+n-1
    return prompts, max_tokens, params


async def start(state: ServerState, req: CompletionRequest) -> tuple[list[_Prompt], list[ChoiceStream]]:
    check_model(state, req.model)
    prompts, max_tokens, params = await asyncio.to_thread(_prepare, state, req)
    loop = asyncio.get_running_loop()
    streams = [ChoiceStream(i, state, req, loop, bool(req.stream)) for i in range(len(params))]
    if max_tokens == 0 and params[0].prompt_logprobs is None:  # echo only: nothing for the engine to compute
        for s in streams:
            s.finish = ("length", None)
        return prompts, streams
    rows = [Row(prompts[i // req.n].ids, p) for i, p in enumerate(params)]
    submit(state, req.model, rows, streams)
    if state.metrics is not None:
        state.metrics.prompt(req.model or state.served_name, sum(len(p.ids) for p in prompts))
    return prompts, streams


def _logprobs(state: ServerState, req: CompletionRequest, prompt: _Prompt, s: ChoiceStream) -> Any:
    if req.logprobs is None:
        return None
    texts = state.texts()
    ids, entries = s.logprob_ids(), list(s.logprobs)  # the stop token too, as vLLM lists it
    if req.echo:
        first = s.prompt_logprobs or [None] * len(prompt.ids)
        ids, entries = prompt.ids + ids, list(first) + entries
    return lp.completion_logprobs(texts, ids, entries)


async def complete(state: ServerState, req: CompletionRequest, is_disconnected: Any) -> CompletionResponse:
    prompts, streams = await start(state, req)
    await run_all(streams, is_disconnected)
    texts = state.texts()
    choices = []
    for s in streams:
        prompt = prompts[s.index // req.n]
        choices.append(
            CompletionChoice(
                index=s.index,
                text=(prompt.text if req.echo else "") + s.emitted,
                logprobs=_logprobs(state, req, prompt, s),
                finish_reason=s.finish[0],
                stop_reason=s.finish[1],
                prompt_logprobs=lp.prompt_logprobs(texts, s.prompt_logprobs)
                if req.prompt_logprobs is not None and s.prompt_logprobs is not None
                else None,
            )
        )
    return CompletionResponse(
        model=req.model or state.served_name,
        choices=choices,
        usage=usage(sum(len(p.ids) for p in prompts), streams),
    )


async def stream(state: ServerState, req: CompletionRequest, is_disconnected: Any) -> AsyncIterator[str]:
    """SSE: per choice, the echoed prompt first (if asked), then text deltas, then a finish chunk; usage if
    asked; [DONE]. Admission errors happen before the response starts (plain HTTP errors)."""
    prompts, streams = await start(state, req)
    cid, created, model = completion_id("cmpl"), int(time.time()), req.model or state.served_name
    texts = state.texts()
    offsets = [0] * len(streams)

    def chunk(choices: list, usage_: dict | None = None) -> str:
        body = {"id": cid, "object": "text_completion", "created": created, "model": model, "choices": choices}
        if usage_ is not None:
            body["usage"] = usage_
        return sse(body)

    def piece(s: ChoiceStream, text: str, logprobs: Any, finish: Any = None) -> dict:
        return {
            "index": s.index,
            "text": text,
            "logprobs": None if logprobs is None else logprobs.model_dump(),
            "finish_reason": finish,
            "stop_reason": s.finish[1] if finish else None,
        }

    async def events() -> AsyncIterator[str]:
        try:
            echoed = [False] * len(streams)

            def echo(s: ChoiceStream) -> str | None:
                if not req.echo or echoed[s.index]:
                    return None
                echoed[s.index] = True
                prompt = prompts[s.index // req.n]
                logprobs = None
                if req.logprobs is not None:
                    first = s.prompt_logprobs or [None] * len(prompt.ids)
                    logprobs = lp.completion_logprobs(texts, prompt.ids, list(first))
                    offsets[s.index] = sum(len(t) for t in logprobs.tokens)
                return chunk([piece(s, prompt.text, logprobs)])

            for s in streams:
                if s.done:  # echo-only choices
                    if (c := echo(s)) is not None:
                        yield c
                    yield chunk([piece(s, "", None, s.finish[0])])
            live = [s for s in streams if not s.done]
            async for s, delta, before in each_event(live, is_disconnected):
                if (c := echo(s)) is not None:  # after the first events: they bring the prompt's log probabilities
                    yield c
                scored = s.logprob_ids() if req.logprobs is not None else s.ids  # the stop token: scored, not text
                new_ids, new = scored[before:], s.logprobs[before:]
                if delta or new_ids:
                    logprobs = None
                    if req.logprobs is not None:
                        logprobs = lp.completion_logprobs(texts, new_ids, new, offsets[s.index])
                        offsets[s.index] += sum(len(t) for t in logprobs.tokens)
                    yield chunk([piece(s, delta, logprobs)])
                if s.done:
                    yield chunk([piece(s, "", None, s.finish[0])])
            if req.stream_options and req.stream_options.include_usage:
                yield chunk([], usage(sum(len(p.ids) for p in prompts), streams).model_dump())
            yield "data: [DONE]\n\n"
        except Exception as exc:
            yield sse_error(exc)
        finally:
            for s in streams:
                if s.request is not None and not s.done:
                    s.request.cancel()

    return events()
