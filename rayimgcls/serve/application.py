"""Building and running the application: `build_app(args)` for Serve's own CLI and config files, `run(cfg)` for
`rayimgcls serve`.

`build_app` follows Serve's builder convention (`serve run rayimgcls.serve:build_app model_dir=M`,
`serve build`, `serve deploy cluster/serve_config.yaml`). Nothing here starts Ray or loads weights when imported.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import os
import signal
import socket
import time
from typing import Any

from ray import serve

from rayimgcls.config import ConfigError, ServeConfig, check_keys, load_config
from rayimgcls.model import check_model_dir
from rayimgcls.serve.api import API_KEY_ENV
from rayimgcls.serve.deployments import Ingress, ModelServer, autoscaling_config, model_kwargs

logger = logging.getLogger(__name__)

MODEL_DIR_ENV = "RAYIMGCLS_MODEL_DIR"  # read only by `rayimgcls.serve:app`
# Serve's throughput mode (Ray 2.60): user code on the replica's event loop (ours hands decode and the model to
# threads), gRPC between proxy and replicas, buffered request logs, GC frozen after start. benchmarks/bench_serve.py
# measured about +6-9% images/s at c=32 with it on 2 cores (README: Serving speed). Direct ingress, which the
# mode also turns on, has every replica listen on a port of its own (30000-31000) and starts no proxy: the one port
# --port names would be gone, so it stays off. Serve reads these when its processes start: they reach a Ray this
# process starts; a cluster's nodes need them in their own environment (cluster/aws.yaml, cluster/kuberay/).
THROUGHPUT_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0"}


def build(cfg: ServeConfig) -> serve.Application:
    """The application for `cfg`: an ingress and an autoscaling, batching model, in one deployment (fused) or two
    (split)."""
    check_model_dir(cfg.model_dir)  # a wrong model_dir fails here, not in a loop of crashing replicas
    _check_cluster(cfg)
    gpus = cfg.gpus_per_replica if cfg.use_gpu else 0
    # Async and cheap per request: slow uploads may hold many ingress slots without holding a model slot.
    ingress = {"max_ongoing_requests": cfg.ingress_max_ongoing_requests}
    if cfg.layout == "fused":
        return Ingress.options(
            **ingress,
            autoscaling_config=autoscaling_config(cfg),
            ray_actor_options={"num_cpus": cfg.num_cpus + cfg.ingress_num_cpus, "num_gpus": gpus},
        ).bind(None, cfg)
    model = ModelServer.options(
        autoscaling_config=autoscaling_config(cfg),
        max_ongoing_requests=cfg.ongoing_requests_limit,
        ray_actor_options={"num_cpus": cfg.num_cpus, "num_gpus": gpus},
        logging_config={"enable_access_log": False},  # a line per image is noise: the ingress logs requests
    ).bind(**model_kwargs(cfg))
    return Ingress.options(
        **ingress, num_replicas=cfg.ingress_replicas, ray_actor_options={"num_cpus": cfg.ingress_num_cpus}
    ).bind(model, cfg)


def _check_cluster(cfg: ServeConfig) -> None:
    """Refuse at once what the cluster can never run (e.g. use_gpu without a GPU), when Ray is up."""
    import ray

    from rayimgcls.runtime import check_resources

    if ray.is_initialized():
        replicas = max(1, cfg.min_replicas)
        ingresses = replicas if cfg.layout == "fused" else cfg.ingress_replicas
        check_resources(
            "serve",
            cpus=cfg.num_cpus * replicas + cfg.ingress_num_cpus * ingresses,
            gpus=replicas * cfg.gpus_per_replica if cfg.use_gpu else 0,
        )


def build_app(args: dict[str, Any]) -> serve.Application:
    """Serve's application builder: `serve run rayimgcls.serve:build_app model_dir=M max_batch_size=8`, or
    the `args:` of an application in a serve config. Keys are ServeConfig fields, values are converted and
    checked like CLI flags; host, port, route_prefix and name belong to Serve's own config there."""
    check_keys(ServeConfig, args, "build_app args")
    return build(load_config(ServeConfig, overrides=args))


def app_from_env() -> serve.Application:
    """`rayimgcls.serve:app`, for `serve build` (which wants an Application, not a builder): the model directory
    in RAYIMGCLS_MODEL_DIR, with default settings."""
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

    check_model_dir(cfg.model_dir)
    # Resolved here, so the key reaches replicas on a remote cluster too.
    cfg = dataclasses.replace(cfg, api_key=cfg.api_key or os.environ.get(API_KEY_ENV) or None)
    if not is_loopback(cfg.host) and not cfg.api_key and not cfg.allow_no_key:
        raise ConfigError(
            f"host={cfg.host}: binding beyond loopback without an API key would let anyone on the network "
            f"use the model; set --api-key or {API_KEY_ENV}, or pass --allow-no-key to do it anyway"
        )
    if not (address or os.environ.get("RAY_ADDRESS")):  # the proxy will bind on this machine
        check_port_free(cfg.host, cfg.port)
    use_throughput_mode()
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


def use_throughput_mode() -> None:
    """THROUGHPUT_ENV for the Ray processes this process starts (they inherit its environment); a value the user
    set wins, e.g. RAY_SERVE_THROUGHPUT_OPTIMIZED=0 for Serve's stock settings."""
    for name, value in THROUGHPUT_ENV.items():
        os.environ.setdefault(name, value)


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


def is_loopback(host: str) -> bool:
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
