"""The playground: one static page at /playground over the server's own API, plus read-only JSON routes for the
runs (each served adapter's toolkit.json and metrics.jsonl) and the eval reports (`toolkit eval`'s folders under
--eval-dir).

Rules: the page and its assets hold no data, so they load without the API key; every JSON route here needs it like
/v1 does. The client never sends a path: runs are the adapters the server serves, reports are the folders found
under the eval folder, and a name is looked up in those listings (an unknown name is a 404), never joined onto a
path. Every response under /playground carries a Content-Security-Policy that forbids inline script and other
origins, so model output the page shows can never run or load anything.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import FileResponse, RedirectResponse, Response
from starlette.middleware.base import BaseHTTPMiddleware

from toolkit.serve.errors import APIError

STATIC = Path(__file__).parent / "static"
ASSETS = {"playground.js": "text/javascript", "playground.css": "text/css"}
# 'self' only: no inline script or style, no other origin; blob:/data: for the user's own image thumbnails and
# the eval chart (fetched with the key, shown as a blob)
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; connect-src 'self'; "
    "font-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
MAX_METRIC_LINES = 20_000  # a long run's metrics.jsonl, thinned evenly past this (the chart has ~1,000 px)
MAX_ANSWER_LINES = 50_000


class PlaygroundHeaders(BaseHTTPMiddleware):
    async def dispatch(self, request: Request, call_next: Any) -> Response:
        response = await call_next(request)
        if request.url.path.startswith("/playground"):
            response.headers.update(SECURITY_HEADERS)
        return response


def _not_found(what: str, name: str) -> APIError:
    return APIError(404, f"no {what} named {name!r}", type="not_found_error", param="name")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_jsonl(path: Path, limit: int) -> list[dict]:
    """The objects of a JSON-lines file (bad lines skipped: a run being written ends in a partial line), thinned
    evenly to at most `limit`, the last line kept."""
    rows = []
    try:
        with open(path) as f:
            for line in f:
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                if isinstance(row, dict):
                    rows.append(row)
    except OSError:
        return []
    if len(rows) > limit:
        step = len(rows) / limit
        rows = [rows[int(i * step)] for i in range(limit - 1)] + [rows[-1]]
    return rows


def runs(state: Any) -> dict[str, Path]:
    """Served adapter name -> its folder (the startup adapters and any loaded at run time)."""
    return {name: Path(folder) for name, folder in list(state.adapters.items())}


def run_summary(name: str, folder: Path) -> dict:
    card = _read_json(folder / "toolkit.json") or {}
    return {
        "name": name,
        "card": card,
        "has_metrics": (folder / "metrics.jsonl").is_file(),
    }


def eval_reports(eval_dir: Path | None) -> dict[str, Path]:
    """Report name -> folder: each folder directly under the eval folder that holds a report.json, newest first."""
    if eval_dir is None or not eval_dir.is_dir():
        return {}
    found = [p for p in eval_dir.iterdir() if (p / "report.json").is_file()]
    return {p.name: p for p in sorted(found, key=lambda p: (p / "report.json").stat().st_mtime, reverse=True)}


def report_summary(name: str, folder: Path) -> dict:
    report = _read_json(folder / "report.json") or {}
    return {
        "name": name,
        "created": report.get("created"),
        "recipe": report.get("recipe"),
        "scoring": report.get("scoring"),
        "models": list(report.get("models", {})),
        "passed": report.get("passed"),
        "has_chart": (folder / "chart.png").is_file(),
    }


def install(app: FastAPI, state: Any, require_key: Any) -> None:
    """/playground (the page), /playground/static/* (its assets) and /playground/api/* (read-only JSON)."""
    app.add_middleware(PlaygroundHeaders)

    @app.api_route("/playground", methods=["GET", "HEAD"], include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "playground.html", media_type="text/html", headers={"Cache-Control": "no-cache"})

    @app.get("/playground/", include_in_schema=False)
    async def page_slash() -> RedirectResponse:
        return RedirectResponse("/playground")

    @app.get("/playground/static/{asset}", include_in_schema=False)
    async def static(asset: str) -> FileResponse:
        if asset not in ASSETS:  # a fixed list: nothing else in the package is reachable
            raise _not_found("asset", asset)
        return FileResponse(STATIC / asset, media_type=ASSETS[asset], headers={"Cache-Control": "no-cache"})

    api = APIRouter(prefix="/playground/api", dependencies=[Depends(require_key)], include_in_schema=False)

    @api.get("/runs")
    async def list_runs() -> dict:
        return {"runs": [run_summary(name, folder) for name, folder in runs(state).items()]}

    @api.get("/runs/{name}/metrics")
    async def run_metrics(name: str) -> dict:
        folder = runs(state).get(name)
        if folder is None:
            raise _not_found("adapter", name)
        return {"name": name, "rows": read_jsonl(folder / "metrics.jsonl", MAX_METRIC_LINES)}

    def report_folder(name: str) -> Path:
        folder = eval_reports(state.eval_dir).get(name)
        if folder is None:
            raise _not_found("eval report", name)
        return folder

    @api.get("/evals")
    async def list_evals() -> dict:
        found = eval_reports(state.eval_dir)
        return {
            "eval_dir": str(state.eval_dir) if state.eval_dir else None,
            "reports": [report_summary(name, folder) for name, folder in found.items()],
        }

    @api.get("/evals/{name}")
    async def report(name: str) -> Any:
        return _read_json(report_folder(name) / "report.json") or {}

    @api.get("/evals/{name}/answers")
    async def answers(name: str) -> dict:
        return {"name": name, "rows": read_jsonl(report_folder(name) / "answers.jsonl", MAX_ANSWER_LINES)}

    @api.get("/evals/{name}/chart.png")
    async def chart(name: str) -> FileResponse:
        path = report_folder(name) / "chart.png"
        if not path.is_file():
            raise _not_found("chart for eval report", name)
        return FileResponse(path, media_type="image/png")

    app.include_router(api)
