"""The FastAPI application of an ingress replica: routes, the API key, the OpenAPI document and error bodies.

Our own `/v1` API, the Open Inference Protocol v2 (`/v2`, see oip.py) and the static side: the classify page at `/`
and `/docs`, whose Swagger UI assets are served from installed packages (nothing from a CDN: a cluster without
internet shows the same page). Health probes, the page, the docs and the API's description need no key: load
balancers and KubeRay probes send none, and none of them reveals what a key protects. Every route that touches the
model does. The OpenAPI document says what the server really does: top_k an integer within its bounds, the
content types taken, the error bodies, every status a route can return.
"""

from __future__ import annotations

import hmac
import html
import importlib.resources
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from rayimgcls import __version__, telemetry
from rayimgcls.images import ACCEPTED_FORMATS
from rayimgcls.serve import oip
from rayimgcls.serve.http import ERROR_STATUS, JSON_FORM, ApiError

if TYPE_CHECKING:
    from rayimgcls.serve.deployments import Ingress

logger = logging.getLogger(__name__)

API_KEY_ENV = "RAYIMGCLS_API_KEY"
_HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}
TOP_K = "Classes per result, 1..classes (default min(5, classes)); a top_k in the body wins."
WEB = Path(__file__).with_name("web")  # the classify page, shipped as package data
# The only files under /static/: ours, and Swagger UI's from the fastapi-offline package (no path from the URL
# ever reaches the filesystem).
STATIC = {
    "app.js": WEB / "app.js",
    "style.css": WEB / "style.css",
    "swagger-ui-bundle.js": importlib.resources.files("fastapi_offline") / "static" / "swagger-ui-bundle.js",
    "swagger-ui.css": importlib.resources.files("fastapi_offline") / "static" / "swagger-ui.css",
    "favicon.png": importlib.resources.files("fastapi_offline") / "static" / "favicon.png",
}


class ErrorBody(BaseModel):
    error: str
    code: Literal[tuple(ERROR_STATUS)]  # type: ignore[valid-type]
    index: int | None = None


class TopK(BaseModel):
    index: int
    label: str
    score: float


class Result(BaseModel):
    predictions: list[float]
    top_k: list[TopK]
    labels: list[str] | None = None


class ClassifyResponse(BaseModel):
    model: str
    version: str
    results: list[Result]


class Status(BaseModel):
    status: str


class OipErrorBody(BaseModel):
    error: str


def errors(*statuses: int, body: type[BaseModel] = ErrorBody) -> dict[int | str, dict[str, Any]]:
    """OpenAPI responses for these statuses: the error body, and the codes each status carries."""
    out: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        codes = ", ".join(c for c, s in ERROR_STATUS.items() if s == status) or "see the message"
        out[status] = {"model": body, "description": codes}
        if status == 503:
            out[status]["headers"] = {"Retry-After": {"schema": {"type": "integer"}, "description": "seconds"}}
    return out


def create_api(ingress: Ingress) -> FastAPI:
    """The routes of DESIGN.md §6, closed over one ingress replica (its settings, card and API key)."""
    api = FastAPI(
        title="rayimgcls",
        version=__version__,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        description='Image classification. Errors are {"error": message, "code": code[, "index": image]}.',
    )
    key = ingress.api_key
    bearer = HTTPBearer(auto_error=False, description=f"The server's API key (--api-key or {API_KEY_ENV})")

    def authorize(creds: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if key and not (creds and hmac.compare_digest(creds.credentials.encode(), key.encode())):
            raise ApiError("unauthorized", "missing or wrong API key: send 'Authorization: Bearer <key>'")

    keyed = APIRouter(dependencies=[Depends(authorize)] if key else [])
    auth = (401,) if key else ()

    @api.get("/v2/health/live", tags=["health"], response_model=Status)
    def live() -> dict[str, str]:
        """200 while the process is up."""
        return {"status": "live"}

    @api.get("/v2/health/ready", tags=["health"], response_model=Status, responses=errors(503))
    async def ready() -> JSONResponse:
        """200 once a model replica has loaded its weights and run a warm-up batch, else 503."""
        if await ingress.is_ready():
            return JSONResponse({"status": "ready"})
        return ApiError("not_ready", "the model is not loaded yet").response()

    @keyed.get("/v1/model", tags=["model"], responses=errors(*auth))
    def model() -> dict[str, Any]:
        """Model name, version, image size, class names, thresholds and the request limits."""
        return ingress.metadata()

    @keyed.get("/v1/stats", tags=["model"], responses=errors(*auth, 503))
    async def stats() -> dict[str, Any]:
        """Counters of one model replica: model calls by batch size, images, device, precision."""
        return await ingress.stats()

    @keyed.post(
        "/v1/classify",
        tags=["model"],
        response_model=ClassifyResponse,
        responses={
            200: {"headers": {"Server-Timing": {"schema": {"type": "string"}, "description": "decode, model, total"}}},
            **errors(400, *auth, 408, 413, 415, 422, 500, 503),
        },
        openapi_extra=classify_openapi(ingress.card.num_classes, ingress.cfg.max_images),
    )
    async def classify(request: Request) -> JSONResponse:
        """Classify one image (raw body), several (multipart files) or base64 images in JSON."""
        body, timing = await ingress.classify(request)
        return JSONResponse(body, headers={"Server-Timing": timing})

    add_oip_routes(api, keyed, ingress, auth)
    add_static_routes(api)
    api.include_router(keyed)
    add_error_handlers(api)
    api.add_middleware(CountRequests)
    return api


class CountRequests:
    """ASGI middleware: every HTTP response counted by route template and status (telemetry). Inside Starlette's
    500 handler, so an exception that escapes the routes is counted as the 500 it becomes."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500

        async def sending(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            telemetry.serve_request(getattr(scope.get("route"), "path", None), status)


def add_oip_routes(api: FastAPI, keyed: APIRouter, ingress: Ingress, auth: tuple[int, ...]) -> None:
    """The Open Inference Protocol v2 (oip.py) beside /v1: the same deployments, limits and errors."""
    oip_errors = errors(400, *auth, 404, 408, 413, 415, 500, 503, body=OipErrorBody)

    @api.get("/v2", tags=["oip"])
    def server() -> dict[str, Any]:
        """Server metadata: name, version, protocol extensions."""
        return oip.server_metadata()

    def model(name: str, version: str | None) -> dict[str, Any]:
        ingress.check_model(name, version)
        return oip.model_metadata(ingress.card, ingress.model_name)

    async def ready(name: str, version: str | None) -> Response:
        ingress.check_model(name, version)
        if await ingress.is_ready():
            return Response(status_code=200)
        raise oip.OipError("the model is not loaded yet", 503)

    async def infer(request: Request, name: str, version: str | None) -> Response:
        body, headers = await ingress.infer_oip(request, name, version)
        return Response(body, headers=headers)

    meta = {"tags": ["oip"], "responses": errors(*auth, 404, body=OipErrorBody)}
    # As Triton: the status says it, with an empty body.
    ready_meta = {**meta, "responses": errors(*auth, 404, 503, body=OipErrorBody), "response_class": Response}
    infer_meta = {"tags": ["oip"], "responses": oip_errors, "openapi_extra": oip_infer_openapi()}

    @keyed.get("/v2/models/{name}", **meta, summary="Model metadata")
    def model_latest(name: str) -> dict[str, Any]:
        return model(name, None)

    @keyed.get("/v2/models/{name}/versions/{version}", **meta, summary="Model metadata (a version)")
    def model_version(name: str, version: str) -> dict[str, Any]:
        return model(name, version)

    @keyed.get("/v2/models/{name}/ready", **ready_meta, summary="Model ready")
    async def ready_latest(name: str) -> Response:
        return await ready(name, None)

    @keyed.get("/v2/models/{name}/versions/{version}/ready", **ready_meta, summary="Model ready (a version)")
    async def ready_version(name: str, version: str) -> Response:
        return await ready(name, version)

    @keyed.post("/v2/models/{name}/infer", **infer_meta, summary="Infer")
    async def infer_latest(request: Request, name: str) -> Response:
        return await infer(request, name, None)

    @keyed.post("/v2/models/{name}/versions/{version}/infer", **infer_meta, summary="Infer (a version)")
    async def infer_version(request: Request, name: str, version: str) -> Response:
        return await infer(request, name, version)


def add_static_routes(api: FastAPI) -> None:
    """The classify page, /docs with local Swagger UI assets, and the OpenAPI document (all without a key)."""

    def root_of(request: Request) -> str:
        return request.scope.get("root_path", "").rstrip("/")

    @api.get("/", include_in_schema=False)
    def page(request: Request) -> HTMLResponse:
        text = (WEB / "index.html").read_text(encoding="utf-8")
        return HTMLResponse(text.replace("{{root}}", html.escape(root_of(request), quote=True)))

    @api.get("/static/{name}", include_in_schema=False)
    def static(name: str) -> FileResponse:
        if name not in STATIC:
            raise StarletteHTTPException(404, f"no static file {name!r}")
        return FileResponse(str(STATIC[name]))

    @api.get("/openapi.json", include_in_schema=False)
    def openapi(request: Request) -> dict[str, Any]:
        root = root_of(request)
        return {**described(api), **({"servers": [{"url": root}]} if root else {})}

    @api.get("/docs", include_in_schema=False)
    def docs(request: Request) -> HTMLResponse:
        root = root_of(request)
        return get_swagger_ui_html(
            openapi_url=f"{root}/openapi.json",
            title="rayimgcls API",
            swagger_js_url=f"{root}/static/swagger-ui-bundle.js",
            swagger_css_url=f"{root}/static/swagger-ui.css",
            swagger_favicon_url=f"{root}/static/favicon.png",
            swagger_ui_parameters={"validatorUrl": None},  # no spec sent to swagger.io's validator
        )


def described(api: FastAPI) -> dict[str, Any]:
    """FastAPI's OpenAPI document without the 422 it adds to every route with parameters: our parameters are
    read and checked by the routes themselves, and a bad one is a 400 with our error body."""
    if api.openapi_schema is None:
        schema = api.openapi()
        for path in schema["paths"].values():
            for operation in path.values():
                if _fastapi_422(operation):
                    del operation["responses"]["422"]
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
    return api.openapi_schema


def _fastapi_422(operation: dict[str, Any]) -> bool:
    ref = operation["responses"].get("422", {}).get("content", {}).get("application/json", {}).get("schema", {})
    return ref.get("$ref", "").endswith("/HTTPValidationError")


def oip_infer_openapi() -> dict[str, Any]:
    """The infer request body for the OpenAPI document: JSON (the binary extension is not expressible)."""
    tensor = {
        "type": "object",
        "required": ["name", "datatype", "shape"],
        "properties": {
            "name": {"type": "string", "enum": [oip.INPUT_IMAGE, oip.INPUT_PIXELS]},
            "datatype": {"type": "string", "enum": ["BYTES", "UINT8"]},
            "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1, "maxItems": 4},
            "parameters": {"type": "object"},
            "data": {"type": "array"},
        },
    }
    output = {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}, "parameters": {}}}
    schema = {
        "type": "object",
        "required": ["inputs"],
        "properties": {
            "id": {"type": "string"},
            "parameters": {"type": "object"},
            "inputs": {"type": "array", "items": tensor, "minItems": 1, "maxItems": 1},
            "outputs": {"type": "array", "items": output},
        },
    }
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def classify_openapi(num_classes: int, max_images: int) -> dict[str, Any]:
    """What /v1/classify takes, for the OpenAPI document (the route reads the raw request itself)."""
    top_k = {"type": "integer", "minimum": 1, "maximum": num_classes}
    binary = {"schema": {"type": "string", "format": "binary"}}
    images = {f"image/{fmt.lower()}": binary for fmt in ACCEPTED_FORMATS}
    return {
        "parameters": [{"name": "top_k", "in": "query", "required": False, "schema": top_k, "description": TOP_K}],
        "requestBody": {
            "required": True,
            "description": f"One image as the body, up to {max_images} as multipart files, or JSON {JSON_FORM}.",
            "content": {
                **images,
                "application/octet-stream": binary,
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["file"],
                        "properties": {
                            "file": {
                                "type": "array",
                                "items": {"type": "string", "format": "binary"},
                                "minItems": 1,
                                "maxItems": max_images,
                            },
                            "top_k": top_k,
                        },
                    }
                },
                "application/json": {
                    "schema": {
                        "type": "object",
                        "required": ["images"],
                        "additionalProperties": False,
                        "properties": {
                            "images": {
                                "type": "array",
                                "minItems": 1,
                                "maxItems": max_images,
                                "items": {
                                    "type": "object",
                                    "required": ["b64"],
                                    "additionalProperties": False,
                                    "properties": {"b64": {"type": "string", "format": "byte"}},
                                },
                            },
                            "top_k": top_k,
                        },
                    }
                },
            },
        },
    }


def is_oip(request: Request) -> bool:
    """Whether the request is for the Open Inference Protocol routes, whose errors are {"error": message}."""
    path, root = request.scope.get("path", ""), request.scope.get("root_path", "")
    path = path[len(root) :] if root and path.startswith(root) else path
    return path == "/v2" or path.startswith("/v2/models")


def add_error_handlers(api: FastAPI) -> None:
    """Every error leaves as {"error", "code"} (the protocol's {"error"} under /v2/models); only an unexpected
    exception is a 500 (and is logged)."""

    def respond(request: Request, e: ApiError) -> JSONResponse:
        telemetry.serve_error(e.code)
        if is_oip(request):
            as_oip = oip.from_api_error(e)
            return JSONResponse({"error": as_oip.message}, as_oip.status, e.headers)
        return e.response()

    def api_error(request: Request, e: Exception) -> JSONResponse:
        return respond(request, e)  # type: ignore[arg-type]

    def oip_error(_: Request, e: Exception) -> JSONResponse:
        telemetry.serve_error(e.code)  # type: ignore[attr-defined]
        return JSONResponse({"error": e.message}, e.status)  # type: ignore[attr-defined]

    def http_error(request: Request, e: Exception) -> JSONResponse:
        status = getattr(e, "status_code", 400)
        code = _HTTP_CODES.get(status, "invalid_request")
        telemetry.serve_error(code)
        body: dict[str, Any] = {"error": str(getattr(e, "detail", e))} | ({} if is_oip(request) else {"code": code})
        return JSONResponse(body, status, getattr(e, "headers", None))  # a 405 keeps its Allow header

    def validation_error(request: Request, e: Exception) -> JSONResponse:
        return respond(request, ApiError("invalid_request", f"invalid request: {e}"))

    def internal_error(request: Request, e: Exception) -> JSONResponse:
        logger.error("internal error: %s: %s", type(e).__name__, e, exc_info=e)
        return respond(request, ApiError("internal", f"internal error ({type(e).__name__}): a bug in rayimgcls"))

    api.add_exception_handler(oip.OipError, oip_error)
    api.add_exception_handler(ApiError, api_error)
    api.add_exception_handler(StarletteHTTPException, http_error)
    api.add_exception_handler(RequestValidationError, validation_error)
    api.add_exception_handler(Exception, internal_error)
