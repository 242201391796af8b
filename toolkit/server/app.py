"""Routes of the OpenAI-compatible server and how it is built from a base and adapters."""

from __future__ import annotations

import dataclasses
import secrets
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import StreamingResponse

from toolkit import constants as C
from toolkit.server import errors
from toolkit.server.errors import APIError
from toolkit.server.limits import BodyLimit
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
    app.add_middleware(BodyLimit, max_bytes=state.max_body_bytes)

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
    max_tokens_limit: int | None = None,
    max_body_mb: float = 32.0,
    max_images: int = C.MAX_IMAGES_PER_REQUEST,
) -> ServerState:
    """Load the base (from --base, or the first adapter's manifest), attach adapters, start the engine."""
    from toolkit.adapters import attach, resolve_serving
    from toolkit.base import load_base
    from toolkit.base import served_name as default_served_name
    from toolkit.engine import Engine
    from toolkit.errors import ToolkitError
    from toolkit.images import ImagePolicy

    base, resolved = resolve_serving(base, adapters, adapters_dir)
    loaded = load_base(base, device=device)
    model = attach(loaded, resolved) if resolved else loaded.model
    served = served_name or default_served_name(base)
    if served in {name for name, _ in resolved}:
        raise ToolkitError(f"adapter name {served!r} is the base's name", where="--adapter", fix="rename it")
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
        context_length=loaded.context_length,
        api_key=api_key,
        max_tokens_limit=max_tokens_limit,
        max_body_bytes=int(max_body_mb * 2**20),
        max_images=max_images,
    )
