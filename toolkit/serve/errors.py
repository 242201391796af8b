"""OpenAI-shaped errors, built by one helper: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from toolkit.data.schema import Problem, problems_from_errors
from toolkit.errors import ToolkitError


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_response(status: int, message: str, **fields: Any) -> JSONResponse:
    """The envelope for `status` and `message`; fields as APIError takes them (type, param, code, headers)."""
    return APIError(status, message, **fields).response()


NOT_AN_OBJECT = ("model_attributes_type", "dict_type", "model_type")  # pydantic's words for "not an object"


def install(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        ctype = request.headers.get("content-type", "")
        if request.method == "POST" and not ctype.split(";")[0].strip().lower().endswith("json"):
            return error_response(
                415,
                f"Content-Type is {ctype or 'missing'!r}; send the body as JSON with 'Content-Type: application/json'",
                code="unsupported_media_type",
            )
        for e in errors:  # refused fields (tools, unimplemented options): one clear sentence naming the field
            ctx_error = (e.get("ctx") or {}).get("error")
            param = getattr(ctx_error, "param", None)
            if isinstance(ctx_error, ValueError) and isinstance(param, str):
                return error_response(400, str(ctx_error), param=param, code=getattr(ctx_error, "code", None))
        if errors and tuple(errors[0].get("loc", ())) == ("body",) and errors[0].get("type") in NOT_AN_OBJECT:
            return error_response(400, 'the request body must be a JSON object with a "messages" list')
        if errors and errors[0].get("type") == "json_invalid":
            return error_response(400, f"request body is not valid JSON: {errors[0].get('msg')}", param=None)
        problems = problems_from_errors(errors) or [Problem("body", "invalid request")]
        return error_response(400, "; ".join(map(str, problems[:5])), param=problems[0].path or None)

    @app.exception_handler(APIError)
    async def _api(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(ToolkitError)
    async def _toolkit(request: Request, exc: ToolkitError) -> JSONResponse:
        return error_response(400, exc.one_line(), param=exc.where)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        message = str(exc.detail)
        if message == "There was an error parsing the body":  # FastAPI's words for undecodable bytes, deep nesting
            message = "request body is not valid JSON (it must be UTF-8 JSON, nested at most a few hundred levels)"
        headers = getattr(exc, "headers", None)
        if exc.status_code == 405:  # Starlette's Allow names the first route's methods; a path may have several
            headers = {**(headers or {}), "Allow": ", ".join(_methods(request))}
        return error_response(exc.status_code, message, type=kind, headers=headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:  # never a raw traceback to clients
        return error_response(500, f"internal error: {type(exc).__name__}", type="server_error")


def routes_at(scope: dict) -> list[Any]:
    """The app's routes whose path matches the request's, in routing order (a 405's matched all but the method)."""
    from starlette.routing import Match

    return [r for r in getattr(scope.get("app"), "routes", ()) if r.matches(scope)[0] != Match.NONE]


def _methods(request: Request) -> list[str]:
    """Every method some route takes at this request's path."""
    return sorted({method for route in routes_at(request.scope) for method in getattr(route, "methods", None) or ()})


def envelope_schema() -> dict[str, Any]:
    from toolkit.serve.protocol import ErrorResponse

    return {"model": ErrorResponse}
