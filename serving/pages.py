"""The pages a person opens, none of them in the OpenAPI document:

- ``GET /``: the playground (``static/index.html``, ``playground.css``, ``playground.js``): plain
  HTML, CSS and JavaScript, no build step, nothing from another host. It reads ``/metadata`` to
  build the account fields and sends one request to ``/predict/variants`` per score.
- ``GET /docs`` and ``/redoc``: FastAPI's pages, with Swagger UI's and ReDoc's files served by
  this app (FastAPI's "self-hosting JavaScript and CSS for docs" recipe) from the
  ``fastapi-offline`` package, so they work on a machine without internet.

The playground's answers carry a Content-Security-Policy that lets it load and call only its
own origin, and run no inline script (``blob:`` images: the preview of the file picked).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import FileResponse, HTMLResponse

STATIC = Path(__file__).resolve().parent / "static"
PAGE_FILES = {"/": ("index.html", "text/html; charset=utf-8"),
              "/playground.css": ("playground.css", "text/css; charset=utf-8"),
              "/playground.js": ("playground.js", "text/javascript; charset=utf-8")}
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
PAGE_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
                "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}
DOCS_ASSETS = "/docs-assets"
DOCS_FILES = ("swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js", "favicon.png")


def docs_assets_dir() -> Path:
    """Where fastapi-offline keeps the Swagger UI and ReDoc files it ships (``static/`` beside its code)."""
    import fastapi_offline

    return Path(fastapi_offline.__file__).resolve().parent / "static"


def _page_route(router: APIRouter, path: str, name: str, media_type: str) -> None:
    async def page() -> FileResponse:
        return FileResponse(STATIC / name, media_type=media_type, headers=PAGE_HEADERS)

    router.add_api_route(path, page, methods=["GET"], include_in_schema=False, name=f"page:{name}")


def _asset_route(router: APIRouter, name: str) -> None:
    async def asset() -> FileResponse:
        return FileResponse(docs_assets_dir() / name, headers={"Cache-Control": "public, max-age=86400"})

    router.add_api_route(f"{DOCS_ASSETS}/{name}", asset, methods=["GET"], include_in_schema=False,
                         name=f"docs-asset:{name}")


def mount_pages(app: FastAPI) -> None:
    """Add the playground, /docs, /docs/oauth2-redirect, /redoc and their files to ``app``
    (created with ``docs_url=None, redoc_url=None``)."""
    router = APIRouter(include_in_schema=False)
    for path, (name, media_type) in PAGE_FILES.items():
        _page_route(router, path, name, media_type)
    for name in DOCS_FILES:
        _asset_route(router, name)
    oauth2 = app.swagger_ui_oauth2_redirect_url

    @router.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(openapi_url=f"{root}{app.openapi_url}", title=f"{app.title} - Swagger UI",
                                   oauth2_redirect_url=f"{root}{oauth2}",
                                   swagger_js_url=f"{root}{DOCS_ASSETS}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{root}{DOCS_ASSETS}/swagger-ui.css",
                                   swagger_favicon_url=f"{root}{DOCS_ASSETS}/favicon.png",
                                   swagger_ui_parameters=app.swagger_ui_parameters)

    @router.get(oauth2, include_in_schema=False)
    async def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @router.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_redoc_html(openapi_url=f"{root}{app.openapi_url}", title=f"{app.title} - ReDoc",
                              redoc_js_url=f"{root}{DOCS_ASSETS}/redoc.standalone.js",
                              redoc_favicon_url=f"{root}{DOCS_ASSETS}/favicon.png", with_google_fonts=False)

    app.include_router(router)
