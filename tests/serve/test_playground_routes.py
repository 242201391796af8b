"""The playground's routes over HTTP (no browser): the page and its assets open to anyone under a strict
Content-Security-Policy, the read-only JSON routes behind the API key, runs and eval reports read from the served
adapters and the eval folder, and names that are looked up, never joined onto a path."""

from __future__ import annotations

import http.client
import json
import re
import shutil

import browser
import httpx
import pytest
from browser import answers

eval_report = browser.eval_report  # a fixture
KEY = "pg-s3cret"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def eval_root(eval_report, tmp_path_factory):
    """An eval folder holding the real quickstart report, a copy of it without its chart, a folder with no
    report.json (not a report) and a stray file."""
    root = tmp_path_factory.mktemp("eval-root")
    shutil.copytree(eval_report, root / "quickstart")
    shutil.copytree(eval_report, root / "nochart")
    (root / "nochart" / "chart.png").unlink()
    (root / "unfinished").mkdir()
    (root / "unfinished" / "answers.jsonl").write_text((eval_report / "answers.jsonl").read_text())
    (root / "notes.txt").write_text("not a report\n")
    return root


@pytest.fixture(scope="module")
def secured(make_server, eval_root):
    return make_server(api_key=KEY, eval_dir=str(eval_root))


def raw_get(server, path: str, headers: dict | None = None) -> tuple[int, bytes]:
    """GET with the path sent byte for byte (httpx would resolve "..")."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def check_csp(response: httpx.Response) -> None:
    csp = response.headers["content-security-policy"]
    directives = {d.split()[0]: d.split()[1:] for d in csp.split(";") if d.strip()}
    assert directives["default-src"] == ["'none'"]
    assert directives["script-src"] == ["'self'"]
    assert directives["connect-src"] == ["'self'"]
    assert directives["frame-ancestors"] == ["'none'"]
    assert "'unsafe-inline'" not in csp and "'unsafe-eval'" not in csp and "*" not in csp
    assert response.headers["x-content-type-options"] == "nosniff"


def test_page_and_assets_load_without_the_key_under_the_csp(secured):
    page = httpx.get(secured.url + "/playground")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    check_csp(page)
    html = page.text
    # nothing inline the CSP would block, nothing from elsewhere: only the two assets, from this server
    assert re.findall(r"<script\b[^>]*>", html) == ['<script type="module" src="/playground/static/playground.js">']
    assert "<style" not in html and not re.search(r"\sstyle=", html)
    assert not re.search(r"\son[a-z]+=", html), "inline event handler attributes"
    assert not re.search(r"(src|href)=\"(https?:)?//", html)
    assert '"/playground/static/playground.css"' in html
    script = httpx.get(secured.url + "/playground/static/playground.js").text
    modules = set(re.findall(r'from "\./([a-z]+\.js)"', script))  # the modules it imports, one level down
    assert {"api.js", "pane.js", "runs.js", "evals.js"} <= modules
    for asset, kind in (("playground.css", "text/css"), *((m, "text/javascript") for m in ["playground.js", *modules])):
        r = httpx.get(f"{secured.url}/playground/static/{asset}")
        assert r.status_code == 200 and r.headers["content-type"].startswith(kind), asset
        assert len(r.content) > 500, asset
        check_csp(r)
    slash = httpx.get(secured.url + "/playground/")
    assert slash.status_code in (307, 308) and slash.headers["location"] == "/playground"


def test_every_api_route_needs_the_key(secured):
    routes = [r.path for r in secured.server.config.app.routes if r.path.startswith("/playground/api/")]
    assert len(routes) == 6, routes  # runs, a run's metrics, evals, a report, its answers, its chart
    for route in routes:
        path = route.replace("{name}", "quickstart")  # a real run and report
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            r = httpx.get(secured.url + path, headers=headers)
            assert r.status_code == 401, (path, headers, r.status_code)
            assert r.json()["error"]["code"] == "invalid_api_key"
            check_csp(r)
        ok = httpx.get(secured.url + path, headers=AUTH)
        assert ok.status_code == 200, (path, ok.text)
        check_csp(ok)


def test_runs_list_the_served_adapter_with_its_card_and_loss(secured, trained):
    folder = trained.adapter_dir
    listed = httpx.get(secured.url + "/playground/api/runs", headers=AUTH).json()["runs"]
    assert [r["name"] for r in listed] == ["quickstart"]
    assert listed[0]["card"] == json.loads((folder / "toolkit.json").read_text())
    assert listed[0]["card"]["recipe"]["training"]["learning_rate"] == pytest.approx(2e-3)
    assert listed[0]["has_metrics"] is True
    rows = httpx.get(secured.url + "/playground/api/runs/quickstart/metrics", headers=AUTH).json()["rows"]
    on_disk = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert rows == on_disk
    losses = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    assert len(losses) > 1 and all(isinstance(loss, float) for _, loss in losses)
    assert [s for s, _ in losses] == sorted(s for s, _ in losses)
    assert losses[-1][1] < losses[0][1]  # the quickstart learns


def test_eval_reports_are_the_folders_with_a_report(secured, eval_root):
    listing = httpx.get(secured.url + "/playground/api/evals", headers=AUTH).json()
    assert listing["eval_dir"] == str(eval_root)
    by_name = {r["name"]: r for r in listing["reports"]}
    assert sorted(by_name) == ["nochart", "quickstart"]  # not "unfinished" (no report.json) nor notes.txt
    report = json.loads((eval_root / "quickstart" / "report.json").read_text())
    assert by_name["quickstart"]["models"] == ["base", "quickstart"]
    assert by_name["quickstart"]["created"] == report["created"] and by_name["quickstart"]["has_chart"] is True
    assert by_name["nochart"]["has_chart"] is False
    assert httpx.get(secured.url + "/playground/api/evals/quickstart", headers=AUTH).json() == report
    assert "exact_match" in report["metrics"]["quickstart"]
    rows = httpx.get(secured.url + "/playground/api/evals/quickstart/answers", headers=AUTH).json()["rows"]
    assert rows == answers(eval_root / "quickstart")
    assert {r["model"] for r in rows} == {"base", "quickstart"} and len(rows) == 2 * report["data"]["rows"]
    chart = httpx.get(secured.url + "/playground/api/evals/quickstart/chart.png", headers=AUTH)
    assert chart.headers["content-type"] == "image/png"
    assert chart.content == (eval_root / "quickstart" / "chart.png").read_bytes()
    assert httpx.get(secured.url + "/playground/api/evals/nochart/chart.png", headers=AUTH).status_code == 404


def test_names_are_looked_up_never_used_as_paths(secured):
    for path in [
        "/playground/api/evals/..%2F..%2Fetc",
        "/playground/api/evals/..%2Fquickstart",
        "/playground/api/evals/%2E%2E",
        "/playground/api/evals/unfinished",
        "/playground/api/evals/unfinished/answers",
        "/playground/api/evals/notes.txt",
        "/playground/api/evals/quickstart%2Freport.json",
        "/playground/api/evals/..%2F..%2F..%2F..%2Fetc%2Fpasswd/answers",
        "/playground/api/runs/nope/metrics",
        "/playground/api/runs/..%2Fquickstart/metrics",
        "/playground/api/runs/%2E%2E/metrics",
        "/playground/static/playground.html",
        "/playground/static/..%2Fapp.py",
        "/playground/static/../app.py",
        "/playground/static/%2E%2E%2Fplayground.py",
        "/playground/static/__init__.py",
    ]:
        status, body = raw_get(secured, path, AUTH)
        assert status == 404, (path, status, body[:200])
        assert b"import" not in body and b"root:" not in body and b'"metrics"' not in body, path
    status, body = raw_get(secured, "/playground/api/evals/nope", AUTH)
    assert json.loads(body)["error"]["type"] == "not_found_error"


def test_playground_off_is_not_served(make_server):
    off = make_server(playground=False)
    for path in ["/playground", "/playground/static/playground.js", "/playground/api/runs", "/playground/api/evals"]:
        assert httpx.get(off.url + path).status_code == 404, path
    assert httpx.get(off.url + "/v1/models").status_code == 200
