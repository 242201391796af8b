"""Routes of the OpenAI-compatible server and how it is built from a base and adapters."""

from __future__ import annotations

import dataclasses
import secrets
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import StreamingResponse

from toolkit.server import errors
from toolkit.server.errors import APIError
from toolkit.server.protocol import ChatCompletionRequest, ChatCompletionResponse, ModelList
from toolkit.server.serving import ServerState, complete, stream

ERRORS = {code: errors.envelope_schema() for code in (400, 401, 404, 429)}


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(
        title="Gemma 3 GPTQ LoRA toolkit",
        version="0.1.0",
        description="OpenAI-compatible chat completions for the 4-bit Gemma 3 base and its LoRA adapters.",
    )
    app.state.toolkit = state
    errors.install(app)

    def require_key(request: Request) -> None:
        if state.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip(), state.api_key):
            raise APIError(
                401, "Missing or invalid API key: send 'Authorization: Bearer <key>'", code="invalid_api_key"
            )

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "engine": dict(state.engine.stats), "waiting": state.engine.waiting}

    @app.get("/v1/models", response_model=ModelList, responses=ERRORS, dependencies=[Depends(require_key)])
    async def models() -> ModelList:
        return state.models()

    @app.post(
        "/v1/chat/completions",
        response_model=ChatCompletionResponse,
        responses=ERRORS,
        dependencies=[Depends(require_key)],
    )
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        if body.stream:
            events = await stream(state, body, request.is_disconnected)
            return StreamingResponse(
                events, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
            )
        return await complete(state, body, request.is_disconnected)

    return app


def build_state(
    *,
    base: str | None,
    adapters: list[str],
    api_key: str | None = None,
    device: str | None = None,
    allow_private_urls: bool = False,
    allowed_media_dir: str | None = None,
    max_batch: int = 16,
    max_queue: int = 64,
    adapters_dir: str = "adapters",
    served_name: str | None = None,
) -> ServerState:
    """Load the base (from --base, or the first adapter's manifest), attach adapters, start the engine."""
    from toolkit import constants as C
    from toolkit.adapter_files import read_manifest
    from toolkit.adapters import attach, resolve_adapter
    from toolkit.base import load_base
    from toolkit.engine import Engine
    from toolkit.errors import ToolkitError
    from toolkit.images import ImagePolicy

    resolved = [resolve_adapter(spec, adapters_dir) for spec in adapters]
    if len({name for name, _ in resolved}) != len(resolved):
        raise ToolkitError("two adapters have the same name", where="--adapter", fix="use NAME=PATH to rename one")
    if base is None:
        if not resolved:
            raise ToolkitError("no base to serve", where="--base", fix="pass --base DIR (or --adapter NAME)")
        base = read_manifest(resolved[0][1])["base"]["path"]
    loaded = load_base(base, device=device)
    model = attach(loaded, resolved) if resolved else loaded.model
    served = served_name or (base if "/" in str(base) and not Path(base).exists() else Path(base).name)
    if served in {name for name, _ in resolved}:
        raise ToolkitError(f"adapter name {served!r} is the base's name", where="--adapter", fix="rename it")
    context = loaded.context_length
    if loaded.config.get("text_config", {}).get("hidden_size") == 5376:  # the real 27B: the card's context
        context = min(context, C.REAL_CONTEXT_LEN)
    engine = Engine.for_base(loaded, model, max_batch=max_batch, max_queue=max_queue)
    policy = ImagePolicy(
        allow_private_urls=allow_private_urls,
        allow_local_files=allowed_media_dir is not None,
        media_dir=Path(allowed_media_dir) if allowed_media_dir else None,
    )
    return ServerState(
        base=dataclasses.replace(loaded, model=model),
        engine=engine,
        served_name=served,
        adapters=dict(resolved),
        image_policy=policy,
        context_length=context,
        api_key=api_key,
    )
