"""The Serve deployments: an HTTP ingress that checks and decodes requests, and a batched model.

    layout "split":  client --HTTP--> Serve proxy --> Ingress (FastAPI, async) --handle--> ModelServer
                                                      API key, limits, deadlines,          BatchedModel:
                                                      parse, decode + transform            @serve.batch, Predictor
    layout "fused":  client --HTTP--> Serve proxy --> Ingress (FastAPI, async) + BatchedModel in the same replica

"fused" saves a process hop per image (the decoded array is not sent to another actor), which on CPUs is most of
Serve's cost per request (benchmarks/bench_serve.py); "split" scales the model apart from the decoding, which
GPU replicas want (a GPU replica's CPUs need not decode every request it runs).

Decoding happens in the ingress, request by request, so a bad image fails its own request with a 4xx and a
fixed code, never a batch of other clients' images; the model replica only ever sees uint8 (3, S, S) arrays.
Each image of a request is its own model call, so `@serve.batch` packs images from concurrent requests
together. The ingress is async and cheap per request, so it takes many more ongoing requests than the model
(a slow upload holds an ingress slot, never a model slot); its body memory and concurrent decodes are bounded.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import os
import time
from collections import Counter
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from PIL import Image
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle

from rayimgcls import __version__, telemetry
from rayimgcls.card import format_prediction, read_card
from rayimgcls.config import ServeConfig
from rayimgcls.images import ACCEPTED_FORMATS, to_chw_uint8
from rayimgcls.model import Predictor
from rayimgcls.serve import oip
from rayimgcls.serve.api import API_KEY_ENV, create_api
from rayimgcls.serve.http import (
    ApiError,
    BodyBudget,
    body_chunks,
    decode_all,
    parse_top_k,
    query_top_k,
    read_images,
    shown,
)

logger = logging.getLogger(__name__)

READY_PROBE_S = 2.0  # how long /v2/health/ready waits for a model replica before answering 503
RETRY_DELAY_S = 0.5  # before re-sending calls whose replica died: time for Serve's router to drop it
# A model call that failed because its replica is gone (killed, node lost) or overloaded: retried once, then 503.
REPLICA_GONE = (RayActorError, ActorUnavailableError, BackPressureError, DeploymentUnavailableError)


def unavailable(error: BaseException) -> ApiError:
    return ApiError("unavailable", f"no model replica could answer ({type(error).__name__}); retry shortly")


class BatchedModel:
    """A Predictor behind `@serve.batch`. Serve routes nothing to a replica until its __init__ returns, and this
    __init__ loads the weights and runs a warm-up batch, so a replica that answers is ready. `predict(image)` takes
    one image per call; `@serve.batch` collects concurrent calls into one `run_batch`, whose sizes are counted for
    `stats`. The batch wait adapts to the load: a call that finds no other call in flight (queued or running)
    starts its batch at once, so a lone request is never held; under concurrency a batch waits up to
    batch_wait_timeout_s to fill (0: never; a batch is whatever queued while the last one ran)."""

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
        # A full batch: the first real one then pays no lazy init or kernel selection, and a batch that does not fit
        # the device's memory fails here, before the replica says it is ready.
        self.predictor.predict_batch(np.zeros((max_batch_size, 3, size, size), np.uint8))
        self.batch_sizes: Counter[int] = Counter()
        self.started = time.time()
        self.batch_wait_timeout_s, self.in_flight = batch_wait_timeout_s, 0
        # Applied here rather than as a decorator: the settings come from the configuration.
        self.batched = serve.batch(
            max_batch_size=max_batch_size, batch_wait_timeout_s=0.0, max_concurrent_batches=max_concurrent_batches
        )(self.run_batch)

    async def predict(self, image: np.ndarray) -> np.ndarray:
        """One image's probabilities. Serve reads the wait when a batch takes its first call, so setting it here,
        on the replica's one event loop, decides the wait of the batch this call starts (or joins)."""
        self.in_flight += 1
        try:
            self.batched.set_batch_wait_timeout_s(self.batch_wait_timeout_s if self.in_flight > 1 else 0.0)
            return await self.batched(image)
        finally:
            self.in_flight -= 1

    async def run_batch(self, images: list[np.ndarray]) -> list[np.ndarray]:
        self.batch_sizes[len(images)] += 1
        start = time.perf_counter()
        # In a thread: the replica keeps accepting requests (the next batch fills) while the model runs.
        probs = await asyncio.to_thread(self.predictor.predict_batch, np.stack(images))
        telemetry.serve_batch(len(images), time.perf_counter() - start)
        return list(probs)

    def stats(self) -> dict[str, Any]:
        """This replica's counters: model calls by batch size (what batching achieved), device, precision."""
        ctx = serve.get_replica_context()
        return {
            "replica": ctx.replica_id.unique_id,
            "pid": os.getpid(),
            "device": str(self.predictor.device),
            "precision": self.predictor.precision,
            "torch_threads": self.torch_threads,
            "uptime_s": round(time.time() - self.started, 1),
            "model_calls": sum(self.batch_sizes.values()),
            "images": sum(n * c for n, c in self.batch_sizes.items()),
            "batch_sizes": {str(n): c for n, c in sorted(self.batch_sizes.items())},
        }


@serve.deployment
class ModelServer(BatchedModel):
    """The model replica of the split layout, called through a DeploymentHandle."""


def model_kwargs(cfg: ServeConfig) -> dict[str, Any]:
    """BatchedModel's keyword arguments from the serving settings."""
    return {
        "model_dir": cfg.model_dir,
        "use_gpu": cfg.use_gpu,
        "precision": cfg.precision,
        "torch_threads": cfg.torch_threads or max(1, math.floor(cfg.num_cpus)),
        "max_batch_size": cfg.max_batch_size,
        "batch_wait_timeout_s": cfg.batch_wait_timeout_s,
        "max_concurrent_batches": cfg.max_concurrent_batches,
    }


@serve.deployment
@serve.ingress()
class Ingress:
    """The HTTP side: API key, limits, parsing and decoding; one model call per image, through the handle (split)
    or to the BatchedModel in this replica (fused: `model` is None)."""

    def __init__(self, model: DeploymentHandle | None, cfg: ServeConfig) -> None:
        self.model, self.cfg = model, cfg
        self.local = BatchedModel(**model_kwargs(cfg)) if model is None else None
        self.card = read_card(cfg.model_dir)
        self.model_name = cfg.model_name or self.card.model_name  # the name in the Open Inference Protocol routes
        self.pre = dataclasses.replace(self.card.preprocess, max_pixels=cfg.max_pixels)
        # The replica's own environment is the fallback, so a cluster's key never has to be in a config file.
        self.api_key = cfg.api_key or os.environ.get(API_KEY_ENV) or None
        self.ready = False  # latched: once a model replica answered, it had loaded and warmed up
        self.bodies = BodyBudget(cfg.max_buffered_bytes)
        self.decodes = asyncio.Semaphore(cfg.max_concurrent_decodes)
        if not self.api_key:
            logger.warning("no API key: anyone who can reach the HTTP port can query the model")

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_api(self)

    async def classify(self, request: Request) -> tuple[dict[str, Any], str]:
        """One request -> (the response body, its Server-Timing header)."""
        start = time.perf_counter()
        lease = self.bodies.lease()
        try:
            images, body_top_k = await read_images(request, self.cfg, lease)
            query = query_top_k(request)
            k = parse_top_k(query if body_top_k is None else body_top_k, self.card.num_classes)
            decode_start = time.perf_counter()
            async with self.decodes:
                arrays = await asyncio.to_thread(decode_all, images, self.pre, self.cfg.max_request_pixels)
        finally:
            lease.release()  # the encoded bytes are no longer needed once decoded (or refused)
        model_start = time.perf_counter()
        telemetry.serve_decoded(len(arrays), model_start - decode_start)
        probs = await self.predict(arrays)
        end = time.perf_counter()
        telemetry.serve_predicted(probs, self.card.version, end - model_start)
        body = {
            "model": self.card.model_name,
            "version": self.card.version,
            "results": [format_prediction(p, self.card, k) for p in probs],
        }
        timing = (
            f"decode;dur={1000 * (model_start - decode_start):.1f}, "
            f'model;desc="queue + model";dur={1000 * (end - model_start):.1f}, total;dur={1000 * (end - start):.1f}'
        )
        return body, timing

    def check_model(self, name: str, version: str | None) -> None:
        """404 in the protocol's form for a model name or version this server does not have."""
        if name != self.model_name:
            raise oip.OipError(f"model {shown(name)}: unknown; this server has {self.model_name!r}", 404)
        if version not in (None, "", self.card.version):
            raise oip.OipError(f"model {name!r} has no version {shown(version)}; it has {self.card.version}", 404)

    async def infer_oip(self, request: Request, name: str, version: str | None) -> tuple[bytes, dict[str, str]]:
        """An Open Inference Protocol infer request -> (response body, headers); the limits of /v1 apply."""
        self.check_model(name, version)
        encoding = request.headers.get("content-encoding", "identity").strip().lower()
        if encoding != "identity":
            raise oip.OipError(f"Content-Encoding {shown(encoding)} is not taken: send the body uncompressed", 415)
        lease = self.bodies.lease()
        try:
            body = b"".join([chunk async for chunk in body_chunks(request, self.cfg, lease)])
            req = oip.parse_request(body, request.headers.get(oip.HEADER_LENGTH), self.card, self.cfg)
            decode_start = time.perf_counter()
            async with self.decodes:
                arrays = await asyncio.to_thread(self.oip_arrays, req.input)
        except ApiError as e:
            raise oip.from_api_error(e, oip.INPUT_IMAGE) from None
        finally:
            lease.release()
        model_start = time.perf_counter()
        telemetry.serve_decoded(len(arrays), model_start - decode_start)
        try:
            probs = np.stack(await self.predict(arrays))
        except ApiError as e:
            raise oip.from_api_error(e) from None
        telemetry.serve_predicted(probs, self.card.version, time.perf_counter() - model_start)
        return oip.encode_response(req, probs, self.card, self.model_name)

    def oip_arrays(self, tensor: oip.Tensor) -> list[np.ndarray]:
        """Encoded files through the one decode path, or RGB pixels straight into the same transform."""
        if tensor.name == oip.INPUT_IMAGE:
            return decode_all(tensor.data, self.pre, self.cfg.max_request_pixels)  # type: ignore[arg-type]
        return [to_chw_uint8(Image.fromarray(pixels), self.pre) for pixels in tensor.data]

    async def predict(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        """One model call per image. Calls lost with their replica (killed, node gone) are sent again once, after
        Serve's router has had a moment to drop it; if that fails too the request is a 503, never a 500."""
        if self.local is not None:
            return list(await asyncio.gather(*(self.local.predict(a) for a in arrays)))
        results = await asyncio.gather(*(self.model.predict.remote(a) for a in arrays), return_exceptions=True)
        lost = [i for i, r in enumerate(results) if isinstance(r, REPLICA_GONE)]
        if lost:
            logger.warning("%d model call(s) failed (%s); retrying once", len(lost), type(results[lost[0]]).__name__)
            await asyncio.sleep(RETRY_DELAY_S)
            again = await asyncio.gather(*(self.model.predict.remote(arrays[i]) for i in lost), return_exceptions=True)
            for i, r in zip(lost, again, strict=True):
                results[i] = r
        for r in results:
            if isinstance(r, REPLICA_GONE):
                raise unavailable(r)
            if isinstance(r, BaseException):
                raise r
        return results  # type: ignore[return-value]

    async def stats(self) -> dict[str, Any]:
        if self.local is not None:
            return self.local.stats()
        try:
            return await self.model.stats.remote()
        except REPLICA_GONE as e:
            raise unavailable(e) from None

    async def is_ready(self) -> bool:
        if self.local is not None:
            return True  # this replica loaded the model and ran its warm-up batch before it took a request
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
            "oip_name": self.model_name,
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
                "max_request_pixels": cfg.max_request_pixels,
                "max_images": cfg.max_images,
                "body_idle_timeout_s": cfg.body_idle_timeout_s,
                "body_timeout_s": cfg.body_timeout_s,
                "accepted_formats": list(ACCEPTED_FORMATS),
            },
            "layout": cfg.layout,
            "batching": {
                k: getattr(cfg, k) for k in ("max_batch_size", "batch_wait_timeout_s", "max_concurrent_batches")
            },
            "autoscaling": autoscaling_config(cfg),
        }


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
