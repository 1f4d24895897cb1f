"""What a request must be before the server reads it: a body within the size limit and, while the server runs
open (no API keys, loopback only), addressed to a loopback name, from no web page but a loopback one, and sent as JSON.

Why the open-mode checks: without keys, any web page the user visits could POST to the server (a form
or `fetch` with a "simple" content type needs no CORS preflight), and a page on a DNS-rebound name could
read the answers. Requiring `Content-Type: application/json` forces a preflight that the server does not
grant, checking `Host` refuses requests addressed to any name but localhost, and checking `Origin` refuses
the pages of the origins `--cors-origin` admits (CORS lets them call a server with keys, not the open one).
"""

from __future__ import annotations

from urllib.parse import urlsplit

from fastapi import Request

from seekstack.serve.errors import APIError

DEFAULT_MAX_BODY_BYTES = 4 * 2**20  # a 128k-token prompt is ~0.5 MB of text; JSON escaping may double it
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")
JSON = "application/json"


async def read_body(request: Request, limit: int) -> bytes:
    """The request's body; 413 in OpenAI's shape as soon as it is known to be over `limit` bytes (from its
    Content-Length, or while it arrives), so an oversized body is never held whole; 415 for a compressed one."""
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding != "identity":
        raise APIError(
            415,
            f"Content-Encoding {encoding!r} is not supported: send the request body uncompressed",
            code="unsupported_content_encoding",
        )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def check_open_mode_request(request: Request) -> None:
    """In open mode: 403 unless `Host` names loopback, and unless `Origin`, when a browser sends one, is a loopback
    page (the chat page at /); 415 for a POST whose content type is not JSON."""
    host = request.headers.get("host", "")
    if _host_name(host) not in LOOPBACK_NAMES:
        raise APIError(
            403,
            f"Host {host!r} is not a loopback name: without API keys this server answers only requests addressed to "
            f"{', '.join(LOOPBACK_NAMES)} (a defence against DNS rebinding); create a key to serve other names",
            "permission_error",
            code="host_not_allowed",
        )
    origin = request.headers.get("origin")
    if origin is not None and _host_name(urlsplit(origin).netloc) not in LOOPBACK_NAMES:
        raise APIError(
            403,
            f"Origin {origin!r} is not a loopback page: without API keys this server answers no other web page, "
            "--cors-origin's included; create a key (`seekstack keys create`) for pages to call it with",
            "permission_error",
            code="origin_not_allowed",
        )
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if request.method == "POST" and media_type != JSON:
        raise APIError(
            415,
            f"send the body as {JSON} (got {media_type or 'no content type'!r}): without API keys the server "
            "refuses other content types, which web pages can send to it without the browser asking first",
            code="unsupported_media_type",
        )


def _host_name(host: str) -> str:
    """The name in a `Host` header or an origin's `host[:port]`, lowercased (`[::1]` keeps its brackets)."""
    name = host[: host.index("]") + 1] if host.startswith("[") and "]" in host else host.rpartition(":")[0] or host
    return name.lower()


def _too_large(limit: int) -> APIError:
    return APIError(
        413,
        f"the request body is larger than this server's limit of {limit:,} bytes",
        code="request_too_large",
    )
