"""`GET /playground`: a chat page served by the API itself (one static file, nothing fetched at run time)."""
from __future__ import annotations

from pathlib import Path

from flask import Blueprint, Response

bp = Blueprint("playground", __name__)

PAGE = Path(__file__).parent / "static" / "playground.html"


@bp.get("/playground")
def playground() -> Response:
    return Response(PAGE.read_bytes(), content_type="text/html; charset=utf-8")
