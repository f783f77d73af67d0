"""The API documentation pages, /docs (Swagger UI) and /redoc, with their JavaScript, CSS and icon served
by this process instead of a CDN, so the pages work on a machine without internet access.

The assets are the ones the `fastapi-offline` package ships; the pages follow FastAPI's recipe for
self-hosted docs assets (the app is created with docs_url=None and redoc_url=None, these routes replace them).
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

ASSETS_URL = "/docs/assets"
OAUTH2_REDIRECT_URL = "/docs/oauth2-redirect"  # FastAPI's default swagger_ui_oauth2_redirect_url

router = APIRouter(include_in_schema=False)


def assets() -> StaticFiles:
    """The Swagger UI and ReDoc bundles, read from the installed fastapi-offline package."""
    return StaticFiles(packages=[("fastapi_offline", "static")])


def _urls(request: Request) -> tuple[str, str]:
    root = request.scope.get("root_path", "")  # behind a proxy that mounts the app under a prefix
    return root + (request.app.openapi_url or "/openapi.json"), root + ASSETS_URL


@router.get("/docs")
async def swagger_ui(request: Request) -> HTMLResponse:
    openapi_url, base = _urls(request)
    return get_swagger_ui_html(
        openapi_url=openapi_url, title=f"{request.app.title} - Swagger UI", oauth2_redirect_url=OAUTH2_REDIRECT_URL,
        swagger_js_url=f"{base}/swagger-ui-bundle.js", swagger_css_url=f"{base}/swagger-ui.css",
        swagger_favicon_url=f"{base}/favicon.png",
        # validatorUrl: Swagger UI would otherwise load a badge from validator.swagger.io
        swagger_ui_parameters={**(request.app.swagger_ui_parameters or {}), "validatorUrl": None})


@router.get(OAUTH2_REDIRECT_URL)
async def swagger_ui_oauth2_redirect() -> HTMLResponse:
    return get_swagger_ui_oauth2_redirect_html()


@router.get("/redoc")
async def redoc(request: Request) -> HTMLResponse:
    openapi_url, base = _urls(request)
    return get_redoc_html(openapi_url=openapi_url, title=f"{request.app.title} - ReDoc", redoc_js_url=f"{base}/redoc.standalone.js",
                          redoc_favicon_url=f"{base}/favicon.png", with_google_fonts=False)
