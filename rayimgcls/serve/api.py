"""The FastAPI application of an ingress replica: routes, the API key, the OpenAPI document and error bodies.

Health probes and the API's description (`/v2/health/*`, `/openapi.json`, `/docs`) need no key: load
balancers and KubeRay probes send none, and a description reveals nothing a key protects. Every route that
touches the model does. The OpenAPI document says what the server really does: top_k an integer within its
bounds, the content types taken, the error body, every status a route can return.
"""

from __future__ import annotations

import hmac
import logging
from typing import TYPE_CHECKING, Any, Literal

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from rayimgcls import __version__
from rayimgcls.images import ACCEPTED_FORMATS
from rayimgcls.serve.http import ERROR_STATUS, JSON_FORM, ApiError

if TYPE_CHECKING:
    from rayimgcls.serve.deployments import Ingress

logger = logging.getLogger(__name__)

API_KEY_ENV = "RAYIMGCLS_API_KEY"
_HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}
TOP_K = "Classes per result, 1..classes (default min(5, classes)); a top_k in the body wins."


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


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI responses for these statuses: the error body, and the codes each status carries."""
    out: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        codes = ", ".join(c for c, s in ERROR_STATUS.items() if s == status)
        out[status] = {"model": ErrorBody, "description": codes}
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

    @api.get("/openapi.json", include_in_schema=False)
    def openapi(request: Request) -> dict[str, Any]:
        root = request.scope.get("root_path", "").rstrip("/")
        return {**api.openapi(), **({"servers": [{"url": root}]} if root else {})}

    @api.get("/docs", include_in_schema=False)
    def docs(request: Request) -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=request.scope.get("root_path", "").rstrip("/") + "/openapi.json", title="rayimgcls API"
        )

    api.include_router(keyed)
    add_error_handlers(api)
    return api


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


def add_error_handlers(api: FastAPI) -> None:
    """Every error leaves as {"error", "code"}; only an unexpected exception is a 500 (and is logged)."""

    def api_error(_: Request, e: Exception) -> JSONResponse:
        return e.response()  # type: ignore[attr-defined]

    def http_error(_: Request, e: Exception) -> JSONResponse:
        status = getattr(e, "status_code", 400)
        code = _HTTP_CODES.get(status, "invalid_request")
        body = {"error": str(getattr(e, "detail", e)), "code": code}
        return JSONResponse(body, status, getattr(e, "headers", None))  # a 405 keeps its Allow header

    def validation_error(_: Request, e: Exception) -> JSONResponse:
        return ApiError("invalid_request", f"invalid request: {e}").response()

    def internal_error(_: Request, e: Exception) -> JSONResponse:
        logger.error("internal error: %s: %s", type(e).__name__, e, exc_info=e)
        return ApiError("internal", f"internal error ({type(e).__name__}): a bug in rayimgcls").response()

    api.add_exception_handler(ApiError, api_error)
    api.add_exception_handler(StarletteHTTPException, http_error)
    api.add_exception_handler(RequestValidationError, validation_error)
    api.add_exception_handler(Exception, internal_error)
