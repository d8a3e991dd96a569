"""The playground: a chat page at `/` and `/playground`, served from files in this package.

The page is static (api/playground/: no build step, no CDN, nothing fetched from elsewhere) and
talks to this same API with `fetch`, so it works offline and behind any path prefix. Off with
`SLUICE_PLAYGROUND=false`. Its routes are not part of the API: the OpenAPI document omits them.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from shared.errors import UnknownRoute

PAGE_DIR = Path(__file__).resolve().parent.parent / "playground"
ASSETS = {
    "app.js": "text/javascript; charset=utf-8",
    "markdown.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}
"""The files the page loads, by name: nothing else under the folder is served."""

# Model output is untrusted: the page never parses it as HTML, and should anything slip
# through, this policy runs no inline script or handler and lets the page talk to its own
# origin only (the API key never leaves it).
CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self'",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
)
HEADERS = {
    "Cache-Control": "no-cache",  # revalidated (ETag) on every load: an upgrade shows at once
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
PAGE_HEADERS = HEADERS | {"Content-Security-Policy": CONTENT_SECURITY_POLICY}

router = APIRouter(include_in_schema=False)


@router.get("/")
@router.get("/playground")
async def page() -> FileResponse:
    return FileResponse(
        PAGE_DIR / "index.html", media_type="text/html; charset=utf-8", headers=PAGE_HEADERS
    )


@router.get("/playground/{name}")
async def asset(name: str) -> FileResponse:
    media_type = ASSETS.get(name)
    if media_type is None:
        raise UnknownRoute("no such route")
    return FileResponse(PAGE_DIR / name, media_type=media_type, headers=HEADERS)
