"""`GET /playground`: a chat page served by the API itself (one static file, nothing fetched at run time).

The page is plain HTML with its CSS and JavaScript inline; it talks to `GET /v1/models` and
`POST /v1/chat/completions` on the same origin. Its Content-Security-Policy allows exactly that:
the inline blocks by their SHA-256 hashes, connections to this origin only, nothing else loaded.
"""
from __future__ import annotations

import base64
import hashlib
import re
from pathlib import Path

from flask import Blueprint, Response

bp = Blueprint("playground", __name__)

PAGE = Path(__file__).parent / "static" / "playground.html"
INLINE_BLOCK = re.compile(r"<(script|style)>(.*?)</\1>", re.S)


def content_security_policy(page: str) -> str:
    """A policy that allows the page's own inline <script> and <style> blocks (by hash) and
    requests to its own origin, and nothing else."""
    hashes: dict[str, list[str]] = {"script": [], "style": []}
    for tag, body in INLINE_BLOCK.findall(page):
        digest = base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()
        hashes[tag].append(f"'sha256-{digest}'")
    return "; ".join([
        "default-src 'none'",
        "script-src " + (" ".join(hashes["script"]) or "'none'"),
        "style-src " + (" ".join(hashes["style"]) or "'none'"),
        "connect-src 'self'",
        "img-src data:",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ])


@bp.get("/playground")
def playground() -> Response:
    page = PAGE.read_text(encoding="utf-8")  # read per request: an edited page shows without a restart
    return Response(page.encode("utf-8"), content_type="text/html; charset=utf-8", headers={
        "Content-Security-Policy": content_security_policy(page),
        "X-Content-Type-Options": "nosniff",
        "Cache-Control": "no-cache",
    })
