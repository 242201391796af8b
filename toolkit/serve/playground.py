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
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI
from fastapi.responses import FileResponse, RedirectResponse

from toolkit.serve.errors import APIError

STATIC = Path(__file__).parent / "static"
# The page's modules and stylesheet, a fixed list: nothing else in the package is reachable
ASSETS = {
    **{
        f"{name}.js": "text/javascript"
        for name in ("playground", "api", "dom", "settings", "pane", "attachments", "code", "charts", "runs", "evals")
    },
    "playground.css": "text/css",
}
# 'self' only: no inline script or style, no other origin; blob:/data: for the user's own image thumbnails and
# the eval chart (fetched with the key, shown as a blob)
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; connect-src 'self'; "
    "font-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]
MAX_METRIC_LINES = 20_000  # a long run's metrics.jsonl, thinned evenly past this (the chart has ~1,000 px)
MAX_ANSWER_LINES = 50_000  # answers.jsonl is cut (and says so) past this: thinning would hide wrong rows


class PlaygroundHeaders:
    """The security headers on every response under /playground. Plain ASGI (as limits.BodyLimit): every other
    request, /v1's token streams included, passes through untouched."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/playground"):
            return await self.app(scope, receive, send)

        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _not_found(what: str, name: str) -> APIError:
    return APIError(404, f"no {what} named {name!r}", type="not_found_error", param="name")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_jsonl(path: Path, limit: int, *, thin: bool) -> tuple[list[dict], bool]:
    """The objects of a JSON-lines file (bad lines skipped: a run being written ends in a partial line), at most
    `limit`: thinned evenly, the last line kept (`thin`), or cut; and whether lines were left out."""
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
                if not thin and len(rows) > limit:
                    return rows[:limit], True
    except OSError:
        return [], False
    if len(rows) <= limit:
        return rows, False
    step = len(rows) / limit
    return [rows[int(i * step)] for i in range(limit - 1)] + [rows[-1]], True


def runs(state: Any) -> dict[str, Path]:
    """Served adapter name -> its folder (the startup adapters and any loaded at run time)."""
    return {name: Path(folder) for name, folder in list(state.adapters.items())}


def run_summary(name: str, folder: Path) -> dict:
    """What the runs listing says of one adapter: its name, its card (toolkit.json), whether it logged metrics."""
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

    def written(folder: Path) -> float:
        try:
            return (folder / "report.json").stat().st_mtime
        except OSError:  # deleted meanwhile
            return 0.0

    found = [p for p in eval_dir.iterdir() if (p / "report.json").is_file()]
    return {p.name: p for p in sorted(found, key=written, reverse=True)}


def report_summary(name: str, folder: Path) -> dict:
    """What the reports listing says of one eval report (from its report.json)."""
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


def install(app: FastAPI, state: Any, require_key: Callable[..., None]) -> None:
    """/playground (the page), /playground/static/* (its assets) and /playground/api/* (read-only JSON). The JSON
    routes are plain functions: FastAPI runs them in its thread pool, so their file reads never hold up the event
    loop that streams tokens."""
    app.add_middleware(PlaygroundHeaders)

    @app.api_route("/playground", methods=["GET", "HEAD"], include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "playground.html", media_type="text/html", headers={"Cache-Control": "no-cache"})

    @app.get("/playground/", include_in_schema=False)
    async def page_slash() -> RedirectResponse:
        return RedirectResponse("/playground")

    @app.get("/playground/static/{asset}", include_in_schema=False)
    async def static(asset: str) -> FileResponse:
        if asset not in ASSETS:
            raise _not_found("asset", asset)
        return FileResponse(STATIC / asset, media_type=ASSETS[asset], headers={"Cache-Control": "no-cache"})

    def api(path: str) -> Callable:
        """A read-only JSON route under /playground/api, behind the key like /v1 (added to the app itself: FastAPI's
        included routers are not plain routes, and the suite enumerates routes)."""
        return app.get(f"/playground/api{path}", dependencies=[Depends(require_key)], include_in_schema=False)

    @api("/runs")
    def list_runs() -> dict:
        return {"runs": [run_summary(name, folder) for name, folder in runs(state).items()]}

    @api("/runs/{name}/metrics")
    def run_metrics(name: str) -> dict:
        folder = runs(state).get(name)
        if folder is None:
            raise _not_found("adapter", name)
        rows, thinned = read_jsonl(folder / "metrics.jsonl", MAX_METRIC_LINES, thin=True)
        return {"name": name, "rows": rows, "thinned": thinned}

    def report_folder(name: str) -> Path:
        folder = eval_reports(state.eval_dir).get(name)
        if folder is None:
            raise _not_found("eval report", name)
        return folder

    @api("/evals")
    def list_evals() -> dict:
        found = eval_reports(state.eval_dir)
        return {
            "eval_dir": str(state.eval_dir) if state.eval_dir else None,
            "reports": [report_summary(name, folder) for name, folder in found.items()],
        }

    @api("/evals/{name}")
    def report(name: str) -> Any:
        return _read_json(report_folder(name) / "report.json") or {}

    @api("/evals/{name}/answers")
    def answers(name: str) -> dict:
        rows, truncated = read_jsonl(report_folder(name) / "answers.jsonl", MAX_ANSWER_LINES, thin=False)
        return {"name": name, "rows": rows, "truncated": truncated}

    @api("/evals/{name}/chart.png")
    def chart(name: str) -> FileResponse:
        path = report_folder(name) / "chart.png"
        if not path.is_file():
            raise _not_found("chart for eval report", name)
        return FileResponse(path, media_type="image/png")
