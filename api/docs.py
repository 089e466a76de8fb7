"""`GET /api-doc/openapi.json` (the document tgq really serves) and Swagger UI at `GET /docs`.

Swagger UI's files come from the `swagger-ui-bundle` package, so the page works offline.
"""
from __future__ import annotations

import functools
from importlib import resources

from flask import Blueprint, Response, abort, request, send_from_directory
from swagger_ui_bundle import swagger_ui_path

bp = Blueprint("docs", __name__)

ASSETS = frozenset({"swagger-ui.css", "swagger-ui-bundle.js", "swagger-ui-standalone-preset.js",
                    "favicon-16x16.png", "favicon-32x32.png", "oauth2-redirect.html",
                    "swagger-ui.css.map", "swagger-ui-bundle.js.map",
                    "swagger-ui-standalone-preset.js.map"})

PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
  <meta charset="UTF-8">
  <title>Text Generation Inference (tgq) - Swagger UI</title>
  <link rel="stylesheet" type="text/css" href="{root}/docs/swagger-ui.css">
  <link rel="icon" type="image/png" href="{root}/docs/favicon-32x32.png" sizes="32x32">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="{root}/docs/swagger-ui-bundle.js" charset="UTF-8"></script>
  <script src="{root}/docs/swagger-ui-standalone-preset.js" charset="UTF-8"></script>
  <script>
    window.onload = function () {{
      window.ui = SwaggerUIBundle({{
        url: "{root}/api-doc/openapi.json",
        dom_id: "#swagger-ui",
        deepLinking: true,
        presets: [SwaggerUIBundle.presets.apis, SwaggerUIStandalonePreset],
        layout: "StandaloneLayout"
      }});
    }};
  </script>
</body>
</html>
"""


@functools.lru_cache(maxsize=1)
def openapi_document() -> bytes:
    return resources.files("api").joinpath("openapi.json").read_bytes()


@bp.get("/api-doc/openapi.json")
def openapi() -> Response:
    return Response(openapi_document(), content_type="application/json")


@bp.get("/docs")
@bp.get("/docs/")
def swagger_ui() -> Response:
    return Response(PAGE.format(root=request.script_root), content_type="text/html; charset=utf-8")


@bp.get("/docs/<name>")
def swagger_asset(name: str) -> Response:
    if name not in ASSETS:
        abort(404)
    return send_from_directory(str(swagger_ui_path), name, max_age=3600)
