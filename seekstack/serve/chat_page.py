"""The chat page at `/`: one static file (chat.html, its script and style inline, nothing else loaded) served with a
Content-Security-Policy under which the page runs its own script and style only and fetches from this server only:
text that reached the page as HTML could run nothing (an `<img onerror=...>` in a reply), and no other site may
show the page in a frame, where a page laid over it could lead a user to send what it chose (clickjacking)."""

from __future__ import annotations

import base64
import hashlib
import re
from importlib.resources import files

from fastapi import FastAPI
from fastapi.responses import HTMLResponse

PAGE = "chat.html"


def inline_source(page: str, tag: str) -> str:
    """The content of the page's one inline `<tag>` element; ValueError when it has none or several."""
    found = re.findall(rf"<{tag}>(.*?)</{tag}>", page, flags=re.DOTALL)
    if len(found) != 1:
        raise ValueError(f"{PAGE} has {len(found)} <{tag}> elements: its Content-Security-Policy admits exactly one")
    return found[0]


def content_security_policy(page: str) -> str:
    """The page's policy: its inline script and style admitted by their SHA-256 (CSP Level 2 hash sources), so an
    inline event handler or a script or style anywhere else is refused; requests to this origin only; no frame."""

    def source_hash(tag: str) -> str:
        digest = hashlib.sha256(inline_source(page, tag).encode("utf-8")).digest()
        return f"'sha256-{base64.b64encode(digest).decode()}'"

    return (
        f"default-src 'none'; script-src {source_hash('script')}; style-src {source_hash('style')}; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )


def add_chat_page(app: FastAPI) -> None:
    """GET and HEAD `/`: the chat page, with its policy and X-Frame-Options (CSP's frame-ancestors for older
    browsers)."""
    page = files("seekstack.serve").joinpath(PAGE).read_text(encoding="utf-8")
    headers = {"Content-Security-Policy": content_security_policy(page), "X-Frame-Options": "DENY"}

    @app.api_route("/", methods=["GET", "HEAD"], response_class=HTMLResponse, include_in_schema=False)
    async def chat() -> HTMLResponse:
        return HTMLResponse(page, headers=headers)
