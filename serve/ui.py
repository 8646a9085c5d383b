"""The playground page at `GET /`: one self-contained HTML file shipped with this package.

The page (static/playground.html: inline CSS and plain JavaScript, no build step) streams a
completion token by token from /v1/completions, shows each step's top candidates as bars and
re-runs from any step with another candidate forced. It loads nothing from another host; the
Content-Security-Policy below makes the browser refuse anything but this server, so a change that
adds an outside resource breaks the page's test instead of leaking requests.
`gpt2-onnx serve --no-ui` leaves the route out.
"""

from __future__ import annotations

from functools import lru_cache
from importlib.resources import files

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

# Inline script and style are the page itself; every fetch, image and font is same-origin.
CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
       "img-src 'self' data:; connect-src 'self'; base-uri 'none'; "
       "frame-ancestors 'none'")


@lru_cache(maxsize=1)
def page_html() -> str:
    """The playground page's HTML (read once from the package data)."""
    return (files("gpt2_onnx.serve") / "static" / "playground.html").read_text(encoding="utf-8")


def build_ui_router() -> APIRouter:
    """`GET /`: the playground page. Public like /health: the page holds no data; its API calls
    carry the key the user types when the server asks for one."""
    router = APIRouter()

    @router.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def playground() -> HTMLResponse:
        return HTMLResponse(page_html(), headers={"Content-Security-Policy": CSP,
                                                  "Cache-Control": "no-cache"})

    return router
