"""The playground: one static page at `/` that talks to the public API from the browser.

The files ship inside the package (no build step, nothing fetched from elsewhere), and the page and its
assets are open without the API key: a browser cannot send a Bearer header when it navigates, so the
page asks for the key itself and sends it on its own API calls.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from ..errors import APIError

STATIC = Path(__file__).resolve().parent.parent / "static" / "playground"
ASSETS = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}
# Everything the page loads or calls is on this origin; a data: URL is the (empty) favicon.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidate (ETag), so an upgraded server never runs a stale script
}

router = APIRouter(tags=["playground"], include_in_schema=False)


@router.get("/")
async def page():
    """The playground page."""
    return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8", headers=SECURITY_HEADERS)


@router.get("/playground/{name}")
async def asset(name: str):
    """The page's script and style sheet; only the named files, so no path can leave the folder."""
    if name not in ASSETS:
        raise APIError(404, "not_found", f"no playground file {name!r}")
    return FileResponse(STATIC / name, media_type=ASSETS[name], headers=SECURITY_HEADERS)
