"""The web dashboard: a static single page at ``/`` that talks to the public /v1 API only.

Why static files and no server-side pages: the page signs in with an API key kept in the
browser's sessionStorage and sends it as a bearer header on every /v1 call, so it can
never see more than the same key gets from curl; this router serves only files that hold
no tenant data and need no key.

Offline by construction: the charting library is plotly.js, the bundle that the ``plotly``
PyPI package carries (``plotly/package_data/plotly.min.js``), served from this process;
the Content-Security-Policy allows scripts and connections to this origin only, so a
page that tried to load anything from elsewhere would be blocked by the browser.
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, HTMLResponse, Response

from api.errors import APIError

router = APIRouter(include_in_schema=False)

STATIC = Path(__file__).resolve().parent.parent / "dashboard"
ASSETS = {"app.js": "text/javascript", "app.css": "text/css"}
# Plotly styles its charts with inline style attributes and injected <style> rules, hence
# 'unsafe-inline' for styles only; scripts come from this origin alone (no inline script).
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data: blob:; connect-src 'self'; font-src 'self' data:; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


@lru_cache(maxsize=1)
def plotly_bundle() -> Path | None:
    """plotly.min.js inside the installed ``plotly`` package, or None when it is missing."""
    spec = importlib.util.find_spec("plotly")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "package_data" / "plotly.min.js"
    return path if path.is_file() else None


@router.get("/", response_class=HTMLResponse)
def index() -> Response:
    return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"), headers=HEADERS)


@router.get("/dashboard/{name}")
def asset(name: str) -> Response:
    if name == "plotly.min.js":
        bundle = plotly_bundle()
        if bundle is None:
            raise APIError(
                503,
                "The dashboard's charting library is not installed on this server "
                "(the 'plotly' Python package); reinstall FineGates with its dependencies",
                code="dashboard_unavailable",
            )
        return FileResponse(
            bundle,
            media_type="text/javascript",
            headers={**HEADERS, "Cache-Control": "public, max-age=86400"},
        )
    if name not in ASSETS:
        raise APIError(404, f"No dashboard file named '{name}'", code="not_found")
    return FileResponse(STATIC / name, media_type=ASSETS[name], headers=HEADERS)
