"""Ray Serve application: an HTTP ingress that checks and decodes requests, and a batched model deployment.

    client --HTTP--> Serve proxy --> Ingress (FastAPI)                --handle--> ModelServer
                                     API key, byte limit, parse,                 @serve.batch over images,
                                     decode + transform (preprocess)             Predictor.predict_batch

Decoding happens in the ingress, request by request, so a bad image fails its own request with a 4xx and a
fixed code, never a batch of other clients' images; the model replica only ever sees uint8 (3, S, S) arrays.
Each image of a request is its own model call, so `@serve.batch` packs images from concurrent requests
together. The HTTP contract is DESIGN.md §6.

`build_app(args)` follows Serve's builder convention (`serve run rayimgcls.serve:build_app model_dir=M`,
`serve build`, `serve deploy cluster/serve_config.yaml`); `run(cfg)` is `rayimgcls serve`. Importing this
module starts nothing and loads no weights; serving never imports the training code.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import hmac
import ipaddress
import json
import logging
import math
import os
import signal
import socket
import time
from collections import Counter
from typing import Any

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect

from rayimgcls import __version__
from rayimgcls.config import ConfigError, ServeConfig, check_keys, load_config
from rayimgcls.images import ACCEPTED_FORMATS, ImageError, PreprocessConfig, preprocess
from rayimgcls.model import Predictor, format_prediction, read_card

logger = logging.getLogger(__name__)

API_KEY_ENV = "RAYIMGCLS_API_KEY"
MODEL_DIR_ENV = "RAYIMGCLS_MODEL_DIR"  # read only by `rayimgcls.serve:app`
READY_PROBE_S = 2.0  # how long /v2/health/ready waits for a model replica before answering 503

# Every error code and its status (DESIGN.md §6); clients branch on `code`, people read `error`.
ERROR_STATUS: dict[str, int] = {
    "empty_body": 400,
    "malformed_json": 400,
    "malformed_multipart": 400,
    "invalid_request": 400,
    "bad_base64": 400,
    "bad_top_k": 400,
    "too_many_images": 400,
    "empty_image": 400,
    "unauthorized": 401,
    "not_found": 404,
    "method_not_allowed": 405,
    "body_too_large": 413,
    "unsupported_media_type": 415,
    "unsupported_format": 415,
    "undecodable": 422,
    "truncated": 422,
    "too_many_pixels": 422,
    "internal": 500,
    "not_ready": 503,
}
_IMAGE_CODES = {"empty": "empty_image"}  # ImageError codes renamed for HTTP; the others keep their names
_HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}
JSON_FORM = '{"images": [{"b64": "<base64>"}], "top_k": 5}'
TOP_K = "Classes per result, 1..classes (default min(5, classes)); a top_k in the JSON body wins."


class ApiError(Exception):
    """A client mistake: answered with ERROR_STATUS[code] and {"error": message, "code": code, ["index"]}."""

    def __init__(self, code: str, message: str, index: int | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.index = code, message, index

    def response(self) -> JSONResponse:
        body: dict[str, Any] = {"error": self.message, "code": self.code}
        if self.index is not None:
            body["index"] = self.index
        headers = {"WWW-Authenticate": "Bearer"} if self.code == "unauthorized" else None
        return JSONResponse(body, ERROR_STATUS[self.code], headers)


# ---------------------------------------------------------------------------------------------------------
# Request parsing: bytes on the wire -> image bytes in request order (no Ray, no model)


async def read_body(request: Request, limit: int) -> bytes:
    """The body, counted as it arrives: Content-Length is only trusted to refuse early, and a body that
    turns out longer (chunked, or a lying header) is cut off after `limit` bytes, never buffered whole."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError("body_too_large", f"body of {declared} bytes exceeds the limit of {limit} bytes")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError("body_too_large", f"body exceeds the limit of {limit} bytes")
            chunks.append(chunk)
    except ClientDisconnect:
        raise ApiError("invalid_request", "client disconnected before the body was complete") from None
    return b"".join(chunks)


def json_images(body: bytes) -> tuple[list[bytes], Any]:
    """{"images": [{"b64": ...}, ...], "top_k": k} -> image bytes and the raw top_k."""
    try:
        doc = json.loads(body)
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        raise ApiError("malformed_json", f"body is not valid JSON: {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
        raise ApiError("invalid_request", f"expected a JSON object like {JSON_FORM}")
    unknown = sorted(set(doc) - {"images", "top_k"})
    if unknown:
        raise ApiError("invalid_request", f"unknown key(s) {unknown}: expected {JSON_FORM}")
    return [b64_image(item, i) for i, item in enumerate(doc["images"])], doc.get("top_k")


def b64_image(item: Any, index: int) -> bytes:
    """One {"b64": ...} entry. A data: URL prefix and line breaks are tolerated, nothing else."""
    if not isinstance(item, dict) or not isinstance(item.get("b64"), str):
        raise ApiError("invalid_request", f'images[{index}]: expected {{"b64": "<base64>"}}', index)
    text = item["b64"]
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise ApiError("bad_base64", f"images[{index}]: not valid base64 ({e})", index) from None


async def form_images(request: Request, body: bytes) -> tuple[list[bytes], Any]:
    """multipart/form-data: every file part is an image, in order; `top_k` is the one text field allowed."""

    async def replay() -> Any:
        yield body

    try:
        form = await MultiPartParser(request.headers, replay(), max_files=math.inf, max_fields=16).parse()
    except MultiPartException as e:
        raise ApiError("malformed_multipart", f"cannot parse the multipart body: {e}") from None
    images, top_k = [], None
    for name, value in form.multi_items():
        if isinstance(value, UploadFile):
            images.append(await value.read())
            await value.close()
        elif name == "top_k":
            top_k = value
        else:
            raise ApiError(
                "invalid_request",
                f"form field {name!r} is not a file: send images as file parts "
                "(curl -F file=@photo.jpg); the only text field is top_k",
            )
    return images, top_k


async def read_images(request: Request, limits: ServeConfig) -> tuple[list[bytes], Any]:
    """Dispatch on the content type, read the body within the byte limit -> (image bytes, raw top_k)."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type not in (
        "multipart/form-data",
        "application/json",
        "application/octet-stream",
        "",
    ) and not media_type.startswith("image/"):
        raise ApiError(
            "unsupported_media_type",
            f"content type {media_type!r} is not taken: send image/* "
            f"bytes, multipart/form-data files or application/json {JSON_FORM}",
        )
    body = await read_body(request, limits.max_body_bytes)
    if not body:
        raise ApiError("empty_body", "empty request body: send an image, a multipart form or JSON")
    if media_type == "multipart/form-data":
        images, top_k = await form_images(request, body)
    elif media_type == "application/json":
        images, top_k = json_images(body)
    else:
        images, top_k = [body], None
    if not images:
        raise ApiError("invalid_request", "no images in the request")
    if len(images) > limits.max_images:
        raise ApiError("too_many_images", f"{len(images)} images in one request; at most {limits.max_images}")
    return images, top_k


def parse_top_k(value: Any, num_classes: int) -> int:
    """A query string, form field or JSON value -> k in 1..num_classes; None -> min(5, num_classes)."""
    if value is None:
        return min(5, num_classes)
    k = None
    if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
        k = int(value)
    elif isinstance(value, int) and not isinstance(value, bool):
        k = value
    if k is None or not 1 <= k <= num_classes:
        raise ApiError("bad_top_k", f"top_k={value!r}: expected an integer in 1..{num_classes}")
    return k


def decode_all(images: list[bytes], pre: PreprocessConfig) -> list[np.ndarray]:
    """The one preprocessing path for every image; the first bad one fails the request, naming its index."""
    arrays = []
    for i, data in enumerate(images):
        try:
            arrays.append(preprocess(data, pre))
        except ImageError as e:
            raise ApiError(_IMAGE_CODES.get(e.code, e.code), f"image {i}: {e}", i) from None
    return arrays


# ---------------------------------------------------------------------------------------------------------
# Deployments


@serve.deployment
class ModelServer:
    """A model replica. Serve routes nothing here until __init__ returns, and __init__ loads the weights and
    runs a warm-up batch, so a replica that answers is ready. `predict(image)` takes one image per call;
    `@serve.batch` collects concurrent calls into one `run_batch`, whose sizes are counted for `stats`."""

    def __init__(
        self,
        model_dir: str,
        *,
        use_gpu: bool,
        precision: str | None,
        torch_threads: int,
        max_batch_size: int,
        batch_wait_timeout_s: float,
        max_concurrent_batches: int,
    ) -> None:
        import torch

        torch.set_num_threads(torch_threads)
        self.torch_threads = torch_threads
        self.predictor = Predictor.from_dir(model_dir, "cuda" if use_gpu else "cpu", precision)
        size = self.predictor.card.preprocess.input_size
        self.predictor.predict_batch(np.zeros((1, 3, size, size), np.uint8))  # first call pays lazy init
        self.batch_sizes: Counter[int] = Counter()
        self.started = time.time()
        # Applied here rather than as a decorator: all three settings come from the configuration.
        self.predict = serve.batch(
            max_batch_size=max_batch_size,
            batch_wait_timeout_s=batch_wait_timeout_s,
            max_concurrent_batches=max_concurrent_batches,
        )(self.run_batch)

    async def run_batch(self, images: list[np.ndarray]) -> list[np.ndarray]:
        self.batch_sizes[len(images)] += 1
        # In a thread: the replica keeps accepting requests (the next batch fills) while the model runs.
        probs = await asyncio.to_thread(self.predictor.predict_batch, np.stack(images))
        return list(probs)

    def stats(self) -> dict[str, Any]:
        """This replica's counters: model calls by batch size (what batching achieved), device, precision."""
        ctx = serve.get_replica_context()
        return {
            "replica": ctx.replica_id.unique_id,
            "device": str(self.predictor.device),
            "precision": self.predictor.precision,
            "torch_threads": self.torch_threads,
            "uptime_s": round(time.time() - self.started, 1),
            "model_calls": sum(self.batch_sizes.values()),
            "images": sum(n * c for n, c in self.batch_sizes.items()),
            "batch_sizes": {str(n): c for n, c in sorted(self.batch_sizes.items())},
        }


@serve.deployment
@serve.ingress()
class Ingress:
    """The HTTP side: API key, limits, parsing and decoding; one model call per image through the handle."""

    def __init__(self, model: DeploymentHandle, cfg: ServeConfig) -> None:
        self.model, self.cfg = model, cfg
        self.card = read_card(cfg.model_dir)
        self.pre = dataclasses.replace(self.card.preprocess, max_pixels=cfg.max_pixels)
        # The replica's own environment is the fallback, so a cluster's key never has to be in a config file.
        self.api_key = cfg.api_key or os.environ.get(API_KEY_ENV) or None
        self.ready = False  # latched: once a model replica answered, it had loaded and warmed up
        if not self.api_key:
            logger.warning("no API key: anyone who can reach the HTTP port can query the model")

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_api(self)

    async def classify(self, request: Request, top_k: str | None) -> dict[str, Any]:
        images, body_top_k = await read_images(request, self.cfg)
        k = parse_top_k(top_k if body_top_k is None else body_top_k, self.card.num_classes)
        arrays = await asyncio.to_thread(decode_all, images, self.pre)
        probs = await asyncio.gather(*(self.model.predict.remote(a) for a in arrays))
        return {
            "model": self.card.model_name,
            "version": self.card.version,
            "results": [format_prediction(p, self.card, k) for p in probs],
        }

    async def is_ready(self) -> bool:
        if not self.ready:
            try:
                await asyncio.wait_for(self.model.stats.remote(), READY_PROBE_S)
                self.ready = True
            except Exception as e:  # noqa: BLE001 - no replica yet, still loading, or dead: all mean "not ready"
                logger.info("model not ready: %s", type(e).__name__)
        return self.ready

    def metadata(self) -> dict[str, Any]:
        card, cfg = self.card, self.cfg
        return {
            "name": card.model_name,
            "version": card.version,
            "rayimgcls": __version__,
            "image_size": card.preprocess.input_size,
            "num_classes": card.num_classes,
            "class_names": card.class_names,
            "multilabel": card.multilabel,
            "thresholds": card.thresholds if card.multilabel else None,
            "precision": card.precision,
            "preprocess": card.preprocess.to_dict(),
            "default_top_k": min(5, card.num_classes),
            "limits": {
                "max_body_bytes": cfg.max_body_bytes,
                "max_pixels": cfg.max_pixels,
                "max_images": cfg.max_images,
                "accepted_formats": list(ACCEPTED_FORMATS),
            },
            "batching": {
                k: getattr(cfg, k) for k in ("max_batch_size", "batch_wait_timeout_s", "max_concurrent_batches")
            },
            "autoscaling": autoscaling_config(cfg),
        }


# ---------------------------------------------------------------------------------------------------------
# The FastAPI app, built per ingress replica (it closes over the replica's settings and API key)


def create_api(ingress: Ingress) -> FastAPI:
    """Routes of DESIGN.md §6. Every route but liveness needs the API key when one is set, /docs included."""
    api = FastAPI(
        title="rayimgcls",
        version=__version__,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        description='Image classification. Errors are {"error": message, "code": code}.',
    )
    key = ingress.api_key
    bearer = HTTPBearer(auto_error=False, description=f"The server's API key (--api-key or {API_KEY_ENV})")

    def authorize(creds: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if key and not (creds and hmac.compare_digest(creds.credentials.encode(), key.encode())):
            raise ApiError("unauthorized", "missing or wrong API key: send 'Authorization: Bearer <key>'")

    router = APIRouter(dependencies=[Depends(authorize)] if key else [])
    errors = {
        status: {"description": ", ".join(c for c, s in ERROR_STATUS.items() if s == status)}
        for status in (400, 401, 413, 415, 422)
        if key or status != 401
    }

    @api.get("/v2/health/live", tags=["health"])
    def live() -> dict[str, str]:
        """200 while the process is up (no API key needed)."""
        return {"status": "live"}

    @router.get("/v2/health/ready", tags=["health"], responses={503: {"description": "not_ready"}})
    async def ready() -> JSONResponse:
        """200 once a model replica has loaded its weights and run a warm-up batch, else 503."""
        if await ingress.is_ready():
            return JSONResponse({"status": "ready"})
        return ApiError("not_ready", "the model is not loaded yet").response()

    @router.get("/v1/model", tags=["model"])
    def model() -> dict[str, Any]:
        """Model name, version, image size, class names, thresholds and the request limits."""
        return ingress.metadata()

    @router.get("/v1/stats", tags=["model"])
    async def stats() -> dict[str, Any]:
        """Counters of one model replica: model calls by batch size, images, device, precision."""
        return await ingress.model.stats.remote()

    @router.post("/v1/classify", tags=["model"], responses=errors, openapi_extra=_CLASSIFY_BODY)
    async def classify(request: Request, top_k: str | None = Query(None, description=TOP_K)) -> JSONResponse:
        """Classify one image (raw body), several (multipart files) or base64 images in JSON."""
        return JSONResponse(await ingress.classify(request, top_k))

    @router.get("/openapi.json", include_in_schema=False)
    def openapi() -> dict[str, Any]:
        return api.openapi()

    @router.get("/docs", include_in_schema=False)
    def docs(request: Request) -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=request.scope.get("root_path", "") + "/openapi.json", title="rayimgcls API"
        )

    api.include_router(router)
    _add_error_handlers(api)
    return api


_CLASSIFY_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
            "image/png": {"schema": {"type": "string", "format": "binary"}},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "file": {"type": "array", "items": {"type": "string", "format": "binary"}},
                        "top_k": {"type": "integer"},
                    },
                }
            },
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["images"],
                    "properties": {
                        "images": {
                            "type": "array",
                            "items": {"type": "object", "properties": {"b64": {"type": "string"}}},
                        },
                        "top_k": {"type": "integer"},
                    },
                }
            },
        },
    }
}


def _add_error_handlers(api: FastAPI) -> None:
    """Every error leaves as {"error", "code"}; only an unexpected exception is a 500 (and is logged)."""

    def api_error(_: Request, e: Exception) -> JSONResponse:
        return e.response()  # type: ignore[attr-defined]

    def http_error(_: Request, e: Exception) -> JSONResponse:
        status = getattr(e, "status_code", 400)
        code = _HTTP_CODES.get(status, "invalid_request")
        return JSONResponse({"error": str(getattr(e, "detail", e)), "code": code}, status)

    def validation_error(_: Request, e: Exception) -> JSONResponse:
        return ApiError("invalid_request", f"invalid request: {e}").response()

    def internal_error(_: Request, e: Exception) -> JSONResponse:
        logger.error("internal error: %s: %s", type(e).__name__, e)
        return ApiError("internal", f"internal error ({type(e).__name__}): a bug in rayimgcls").response()

    api.add_exception_handler(ApiError, api_error)
    api.add_exception_handler(StarletteHTTPException, http_error)
    api.add_exception_handler(RequestValidationError, validation_error)
    api.add_exception_handler(Exception, internal_error)


# ---------------------------------------------------------------------------------------------------------
# Building and running the application


def autoscaling_config(cfg: ServeConfig) -> dict[str, Any]:
    """Serve's autoscaling_config for the model deployment (current key names only: Serve ignores unknown
    ones silently)."""
    return {
        "min_replicas": cfg.min_replicas,
        "max_replicas": cfg.max_replicas,
        "initial_replicas": max(1, cfg.min_replicas),
        "target_ongoing_requests": cfg.target_ongoing_requests,
        "upscale_delay_s": cfg.upscale_delay_s,
        "downscale_delay_s": cfg.downscale_delay_s,
        "look_back_period_s": cfg.look_back_period_s,
    }


def build(cfg: ServeConfig) -> serve.Application:
    """The application for `cfg`: an ingress in front of an autoscaling, batching model deployment."""
    read_card(cfg.model_dir)  # a wrong model_dir fails here, not in a loop of crashing replicas
    _check_cluster(cfg)
    model = ModelServer.options(
        autoscaling_config=autoscaling_config(cfg),
        max_ongoing_requests=cfg.ongoing_requests_limit,
        ray_actor_options={"num_cpus": cfg.num_cpus, "num_gpus": 1 if cfg.use_gpu else 0},
        logging_config={"enable_access_log": False},  # a line per image is noise: the ingress logs requests
    ).bind(
        cfg.model_dir,
        use_gpu=cfg.use_gpu,
        precision=cfg.precision,
        torch_threads=cfg.torch_threads or max(1, math.floor(cfg.num_cpus)),
        max_batch_size=cfg.max_batch_size,
        batch_wait_timeout_s=cfg.batch_wait_timeout_s,
        max_concurrent_batches=cfg.max_concurrent_batches,
    )
    return Ingress.options(
        num_replicas=cfg.ingress_replicas,
        max_ongoing_requests=cfg.ongoing_requests_limit,
        ray_actor_options={"num_cpus": cfg.ingress_num_cpus},
    ).bind(model, cfg)


def _check_cluster(cfg: ServeConfig) -> None:
    """Refuse at once what the cluster can never run (e.g. use_gpu without a GPU), when Ray is up."""
    import ray

    from rayimgcls.runtime import check_resources

    if ray.is_initialized():
        replicas = max(1, cfg.min_replicas)
        check_resources(
            "serve",
            cpus=cfg.num_cpus * replicas + cfg.ingress_num_cpus * cfg.ingress_replicas,
            gpus=replicas if cfg.use_gpu else 0,
        )


def build_app(args: dict[str, Any]) -> serve.Application:
    """Serve's application builder: `serve run rayimgcls.serve:build_app model_dir=M max_batch_size=8`, or
    the `args:` of an application in a serve config. Keys are ServeConfig fields, values are converted and
    checked like CLI flags; host, port, route_prefix and name belong to Serve's own config there."""
    check_keys(ServeConfig, args, "build_app args")
    return build(load_config(ServeConfig, overrides=args))


def __getattr__(name: str) -> Any:
    """`rayimgcls.serve:app`, for `serve build` (which wants an Application, not a builder): built when first
    looked up, never at import, for the model directory in RAYIMGCLS_MODEL_DIR, with default settings."""
    if name != "app":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if not os.environ.get(MODEL_DIR_ENV):
        raise ConfigError(
            f"rayimgcls.serve:app needs {MODEL_DIR_ENV}=<model directory> in the environment "
            "(or use the builder: rayimgcls.serve:build_app model_dir=...)"
        )
    return build_app({"model_dir": os.environ[MODEL_DIR_ENV]})


def run(cfg: ServeConfig, address: str | None = None) -> None:
    """`rayimgcls serve`: start (or join) Ray, deploy, block until Ctrl-C or SIGTERM, then take down what this
    command put up."""
    import ray

    from rayimgcls.runtime import init_ray

    read_card(cfg.model_dir)
    # Resolved here, so the key reaches replicas on a remote cluster too.
    cfg = dataclasses.replace(cfg, api_key=cfg.api_key or os.environ.get(API_KEY_ENV) or None)
    if not (address or os.environ.get("RAY_ADDRESS")):  # the proxy will bind on this machine
        check_port_free(cfg.host, cfg.port)
    if not _is_loopback(cfg.host) and not cfg.api_key:
        logger.warning("binding %s without an API key: set --api-key or %s", cfg.host, API_KEY_ENV)
    init_ray(address)
    for sig in (signal.SIGINT, signal.SIGTERM):  # both stop cleanly, also where a shell ignores SIGINT (`&`)
        signal.signal(sig, _interrupt)
    try:
        serve.start(http_options={"host": cfg.host, "port": cfg.port})
        serve.run(build(cfg), name=cfg.name, route_prefix=cfg.route_prefix)
        url = f"http://{cfg.host}:{cfg.port}{cfg.route_prefix.rstrip('/')}"
        logger.info("serving %s at %s/v1/classify (docs: %s/docs); Ctrl-C stops", cfg.model_dir, url, url)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        logger.info("stopping")
    finally:
        _stop(cfg.name)
        ray.shutdown()


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _stop(name: str) -> None:
    """Delete this command's application, and Serve itself when no other application is left on it (ray.init
    may have joined a `ray start` cluster on this machine: what others deployed there stays)."""
    try:
        serve.delete(name)
        if not serve.status().applications:
            serve.shutdown()
    except Exception as e:  # noqa: BLE001 - Ray may already be going down; ray.shutdown() follows regardless
        logger.warning("serve shutdown: %s", e)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def check_port_free(host: str, port: int) -> None:
    """Fail now, with the address, if the HTTP port is taken (Serve's proxy would only log it and retry)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: TIME_WAIT is no conflict
        try:
            s.bind((host, port))
        except OSError as e:
            raise ConfigError(f"port={port}: cannot bind {host}:{port}: {e.strerror}") from None
