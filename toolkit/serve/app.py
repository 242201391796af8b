"""Routes of the OpenAI-compatible server and how it is built from a base and adapters."""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from toolkit import constants as C
from toolkit.engine.engine import PREFILL_STEP_RATIO
from toolkit.serve import completions, errors, openapi, responses, serving
from toolkit.serve.engine_process import EngineGone
from toolkit.serve.errors import APIError
from toolkit.serve.limits import BodyLimit
from toolkit.serve.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    LoadLoraRequest,
    ModelList,
    UnloadLoraRequest,
)
from toolkit.serve.responses_protocol import ResponsesRequest
from toolkit.serve.serving import ServerState, generation_error

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

# Every status a /v1 route answers with, documented (FastAPI's 422 is never sent: openapi.py drops it)
ERRORS = {code: errors.envelope_schema() for code in (400, 401, 404, 413, 415, 429)}
# with `stream: true`: each event's data is a chunk (an object), an error envelope, or [DONE]
SSE = {"text/event-stream": {"schema": {"anyOf": [{"type": "object"}, {"const": "[DONE]"}]}}}
GENERATING = {**ERRORS, 503: errors.envelope_schema(), 200: {"content": SSE}}  # 503: the engine process exited


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(
        title="Gemma 3 GPTQ LoRA toolkit",
        version="0.1.0",
        description="OpenAI-compatible chat and text completions for the 4-bit Gemma 3 base and its LoRA adapters.",
    )
    app.state.toolkit = state
    errors.install(app)
    openapi.install(app, state)  # /openapi.json names this server's models, token bound and vocabulary

    @app.exception_handler(EngineGone)
    async def _engine_gone(request: Request, exc: EngineGone) -> Response:
        return generation_error(exc).response()

    app.add_middleware(BodyLimit, max_bytes=state.max_body_bytes)
    if state.metrics is not None:
        from toolkit.serve.metrics import RequestCounter

        app.add_middleware(RequestCounter, metrics=state.metrics)

    def require_key(request: Request) -> None:
        if state.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip(), state.api_key):
            raise APIError(
                401, "Missing or invalid API key: send 'Authorization: Bearer <key>'", code="invalid_api_key"
            )

    if state.playground:
        from toolkit.serve import playground

        playground.install(app, state, require_key)

    @app.get("/health")
    async def health() -> Any:
        body = {"status": "ok", "engine": dict(state.engine.stats), "waiting": state.engine.waiting}
        if not state.engine.alive:  # a supervisor's cue to restart the server
            return JSONResponse({**body, "status": "engine process exited"}, status_code=503)
        return body

    @app.get("/v1/models", response_model=ModelList, responses=ERRORS, dependencies=[Depends(require_key)])
    async def models() -> ModelList:
        return state.models()

    async def generate(door: Any, body: Any, request: Request) -> Any:
        """Every generating route: the model for /metrics' label, then the door's SSE stream or its one body."""
        model = body.model or state.served_name
        known = model == state.served_name or model in state.adapters  # a label per unknown name would grow forever
        request.state.model = model if known else "unknown"
        if body.stream:
            events = await door.stream(state, body, request.is_disconnected)
            return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS)
        return await door.complete(state, body, request.is_disconnected)

    @app.post(
        "/v1/chat/completions",
        response_model=ChatCompletionResponse,
        responses=GENERATING,
        dependencies=[Depends(require_key)],
    )
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        return await generate(serving, body, request)

    @app.post(
        "/v1/completions",
        response_model=CompletionResponse,
        responses=GENERATING,
        dependencies=[Depends(require_key)],
    )
    async def text_completions(body: CompletionRequest, request: Request) -> Any:
        return await generate(completions, body, request)

    # OpenAPI links: a created response's id is what GET and DELETE take (clients and fuzzers follow them)
    by_id = {"response_id": "$response.body#/id"}
    links = {name: {"operationId": name, "parameters": by_id} for name in ("get_response", "delete_response")}

    @app.post(
        "/v1/responses",
        responses={**GENERATING, 200: {"description": "a Response (or its events)", "links": links, "content": SSE}},
        dependencies=[Depends(require_key)],
        tags=["responses"],
    )
    async def create_response(body: ResponsesRequest, request: Request) -> Any:
        """OpenAI's Responses API on the same engine, adapters and rules as chat completions (docs/API.md)."""
        return await generate(responses, body, request)

    stored = {"responses": ERRORS, "dependencies": [Depends(require_key)], "tags": ["responses"]}

    @app.get("/v1/responses/{response_id}", operation_id="get_response", **stored)
    async def get_response(response_id: str) -> Any:
        found = state.responses.get(response_id)
        if found is None:
            raise responses.not_found(response_id)
        return JSONResponse(found.body)

    @app.delete("/v1/responses/{response_id}", operation_id="delete_response", **stored)
    async def delete_response(response_id: str) -> Any:
        if not state.responses.delete(response_id):
            raise responses.not_found(response_id)
        return JSONResponse({"id": response_id, "object": "response.deleted", "deleted": True})

    @app.post("/v1/load_lora_adapter", responses=ERRORS, dependencies=[Depends(require_key)])
    async def load_lora_adapter(body: LoadLoraRequest) -> PlainTextResponse:
        """vLLM's runtime adapter loading (only with --allow-runtime-adapters; folders inside the adapters folder)."""
        return PlainTextResponse(await asyncio.to_thread(state.runtime.load, body.lora_name, body.lora_path))

    @app.post("/v1/unload_lora_adapter", responses=ERRORS, dependencies=[Depends(require_key)])
    async def unload_lora_adapter(body: UnloadLoraRequest) -> PlainTextResponse:
        return PlainTextResponse(await asyncio.to_thread(state.runtime.unload, body.lora_name))

    @app.get("/metrics", responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}})
    async def metrics() -> Response:
        """Prometheus text format (open like /health: scrapers rarely send keys; it holds no request content)."""
        if state.metrics is None:
            raise APIError(404, "metrics are off", type="not_found_error")
        body, content_type = state.metrics.render()
        return Response(body, media_type=content_type)

    return app


def build_state(
    *,
    base: str | None,
    adapters: list[str],
    api_key: str | None = None,
    device: str | None = None,
    kernel: str = "auto",
    lm_head: str = "auto",
    allow_private_urls: bool = False,
    allowed_media_dir: str | None = None,
    max_batch: int = 16,
    max_queue: int = 64,
    adapters_dir: str = "adapters",
    served_name: str | None = None,
    max_tokens_limit: int | None = None,
    max_body_mb: float = 32.0,
    max_images: int = C.MAX_IMAGES_PER_REQUEST,
    allow_runtime_adapters: bool = False,
    responses_store: int = C.RESPONSES_STORE,
    metrics: bool = True,
    kv_cache_gb: float | None = None,
    prefill_chunk: int | None = None,
    prefill_pacing: float | None = PREFILL_STEP_RATIO,
    engine_process: bool = True,
    compiled_step: bool = True,
    playground: bool = True,
    eval_dir: str | None = "build/eval",
) -> ServerState:
    """Load the base (from --base, or the first adapter's manifest), attach adapters, start the engine: in a process
    of its own (`engine_process`, the default: serve/engine_process.py) or in this one (its model is then
    `state.base.model`). `playground`: serve /playground, with eval reports read from `eval_dir`.
    `prefill_pacing`: a prompt chunk costs about this many decoding steps while streams run
    (None: fixed chunks of `prefill_chunk`, the same pass boundaries in every run)."""
    from toolkit.base.loader import load_base, load_without_weights
    from toolkit.base.loader import served_name as default_served_name
    from toolkit.data.images import ImagePolicy
    from toolkit.engine.engine import Engine
    from toolkit.errors import ToolkitError
    from toolkit.lora.registry import attach, check_base_matches, resolve_serving

    if responses_store < 0:
        raise ToolkitError(
            f"the Responses store size is {responses_store}", where="--responses-store", fix="use 0 (keep none) or more"
        )
    base, resolved = resolve_serving(base, adapters, adapters_dir)
    served = served_name or default_served_name(base)
    if served in {name for name, _ in resolved}:
        raise ToolkitError(f"adapter name {served!r} is the base's name", where="--adapter", fix="rename it")
    options = {
        "max_batch": max_batch,
        "max_queue": max_queue,
        "kv_cache_gb": kv_cache_gb,
        "prefill_chunk": prefill_chunk,
        "prefill_step_ratio": prefill_pacing,
        "compiled_step": compiled_step,  # (engine_process.py compiles where it pays; an in-process engine does not)
    }
    if engine_process:
        from toolkit.serve.engine_process import EngineClient, EngineSpec

        loaded = load_without_weights(base)
        for _, folder in resolved:  # user errors before the model loads
            check_base_matches(folder, loaded)
        adapters_ = [(name, str(folder)) for name, folder in resolved]
        engine = EngineClient(EngineSpec(base, adapters_, device, kernel, allow_runtime_adapters, options, lm_head))
        loaded = dataclasses.replace(
            loaded,
            device=engine.device,
            dtype=engine.dtype,
            kernel=engine.kernel,
            head=engine.head,
            head_kernel=engine.head_kernel,
        )
    else:
        loaded = load_base(base, device=device, kernel=kernel, lm_head=lm_head)
        model = attach(loaded, resolved) if resolved else loaded.model
        if allow_runtime_adapters:  # adapters change only between forward passes (see serve/adapters.py)
            from toolkit.serve.adapters import LockedModel

            model = LockedModel(model)
        engine = Engine.for_base(loaded, model, **options)
        loaded = dataclasses.replace(loaded, model=getattr(model, "inner", model))
    policy = ImagePolicy(
        allow_private_urls=allow_private_urls,
        allow_local_files=allowed_media_dir is not None,
        media_dir=Path(allowed_media_dir) if allowed_media_dir else None,
    )
    state = ServerState(
        base=loaded,
        engine=engine,
        served_name=served,
        adapters=dict(resolved),
        image_policy=policy,
        context_length=loaded.context_length,
        api_key=api_key,
        max_tokens_limit=max_tokens_limit,
        max_body_bytes=int(max_body_mb * 2**20),
        max_images=max_images,
        adapters_dir=Path(adapters_dir),
        playground=playground,
        eval_dir=Path(eval_dir) if eval_dir else None,
    )
    from toolkit.serve import structured
    from toolkit.serve.adapters import AdapterSet

    state.runtime = AdapterSet(state, allow_runtime=allow_runtime_adapters)
    state.responses = responses.ResponseStore(responses_store)
    if metrics:
        from toolkit.serve.metrics import Metrics

        state.metrics = Metrics(engine)
    structured.warm_up(loaded.tokenizer, state.stop_ids)  # 262k vocabularies take seconds: not on a request
    return state
