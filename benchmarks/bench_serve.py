"""Serving speed: rayimgcls on Ray Serve in its layouts and batching settings, against a plain FastAPI server.

These servers answer the same POST /v1/classify (a JPEG as the raw body) on loopback:

- `split`, `split-nowait`: the ingress decodes, a separate model replica batches with @serve.batch (one hop per
  image), batch wait 10 ms / 0 (a batch is whatever queued while the last one ran); the wait adapts: a call that
  finds no other call in flight on its replica starts its batch at once;
- `fused`, `fused-nowait`: ingress and batched model in one replica (no hop), the same two waits;
- `fused-nowait-unbatched`: max_batch_size 1;
- `split-stock`: `split` (the default settings) on a second local Ray with Serve's stock settings
  (RAY_SERVE_THROUGHPUT_OPTIMIZED=0). Every other server runs on a Ray started as `rayimgcls serve` starts one,
  with `serve.application.THROUGHPUT_ENV`: Serve's throughput mode (user code on the event loop, gRPC between proxy
  and replicas, buffered request logs, GC frozen after start) without direct ingress, which makes each replica
  listen on a port of its own from 30000-31000 and starts no proxy, so the one port that `--port` names is gone
  (and with the HAProxy ingress every interface is bound): it breaks the endpoint's contract and is not run;
- `plain`: what a user writes in an afternoon: one uvicorn process whose handler calls the same
  `images.preprocess` and `Predictor.predict_batch` (one image per call, in a thread, so calls overlap as
  the replica's concurrent batches do) with the same torch threads.

All are up at once and warmed up (not measured); then an aiohttp client sends `--requests` requests
(or stops after `--max-seconds`) at each concurrency, to each server in turn, `--runs` rounds, so load from
elsewhere on the machine touches all of them alike. Reported: the median run's throughput and p50/p90/p99
latency, and the RESULT ratios at the top concurrency as the median over rounds of the ratio within a round
(a paired comparison: on a shared machine, drift between rounds is larger than the gaps). Last,
autoscaling: a deployment with max_replicas=2 and short delays under sustained load, then idle, with its
replica count over time. The model is a named timm ViT with untrained weights at 224 px, the images
photo-size JPEGs from `rayimgcls.synth`.

    python benchmarks/bench_serve.py                                  # about 12 minutes on 2 cores
    python benchmarks/bench_serve.py --requests 48 --runs 3 --concurrency 1,8 --no-autoscale   # a quick look
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Request  # at module level: FastAPI resolves the handler's annotations here


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit_tiny_patch16_224", help="timm model name")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--images", type=int, default=64, help="distinct JPEGs the client cycles through")
    p.add_argument("--photo-size", default="500x375", help="WxH of the generated JPEGs")
    p.add_argument("--concurrency", default="1,8,32", help="comma-separated client concurrencies")
    p.add_argument("--requests", type=int, default=96, help="requests per timed run")
    p.add_argument("--max-seconds", type=float, default=30.0, help="a timed run stops after this long")
    p.add_argument("--runs", type=int, default=5, help="rounds of timed runs (medians are reported)")
    p.add_argument("--torch-threads", type=int, default=1, help="torch threads of the model, in every server")
    p.add_argument("--max-batch-size", type=int, default=16, help="batching on: @serve.batch max_batch_size")
    p.add_argument(
        "--max-concurrent-batches",
        type=int,
        default=2,
        help="batches a replica runs at once (the plain peer too runs model calls in parallel)",
    )
    p.add_argument(
        "--autoscale",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also show a second replica starting under load and going after it",
    )
    p.add_argument("--autoscale-load-s", type=float, default=40.0, help="seconds of sustained load")
    p.add_argument("--autoscale-idle-s", type=float, default=40.0, help="longest wait for the downscale")
    p.add_argument("--cpus", type=int, default=os.cpu_count(), help="CPUs of the local Ray")
    p.add_argument("--workdir", default="/tmp/rayimgcls-bench", help="where the photos and the model go")
    p.add_argument("--plain-server", action="store_true", help=argparse.SUPPRESS)  # internal: be the peer
    p.add_argument("--serve-server", help=argparse.SUPPRESS)  # internal: serve these settings on a second Ray
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def make_inputs(args: argparse.Namespace) -> tuple[list[bytes], Path]:
    """Photo-size JPEG bytes and an untrained model directory of the named model (both cached)."""
    from rayimgcls.model import make_untrained_model_dir
    from rayimgcls.synth import make_photo_jpegs

    work = Path(args.workdir)
    width, height = (int(x) for x in args.photo_size.split("x"))
    paths = make_photo_jpegs(work / "photos" / "images", args.images, (width, height))
    photos = [p.read_bytes() for p in paths]
    model_dir = work / f"model-{args.model}-{args.image_size}-{args.num_classes}"
    if not (model_dir / "config.json").exists():
        make_untrained_model_dir(
            model_dir, model_name=args.model, num_classes=args.num_classes, image_size=args.image_size, precision="fp32"
        )
    return photos, model_dir


# ---------------------------------------------------------------------------------------------------------
# Load generator


@dataclass
class Stats:
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    errors: int

    def row(self) -> str:
        return f"{self.rps:8.1f} {self.p50_ms:8.0f} {self.p90_ms:8.0f} {self.p99_ms:8.0f} {self.errors:6d}"


async def _load(url: str, bodies: list[bytes], concurrency: int, total: int, max_seconds: float) -> Stats:
    import aiohttp

    latencies: list[float] = []
    errors = 0
    sent = 0
    deadline = time.perf_counter() + max_seconds

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal errors, sent
        while sent < total and time.perf_counter() < deadline:
            body = bodies[sent % len(bodies)]
            sent += 1
            start = time.perf_counter()
            async with session.post(url, data=body, headers={"Content-Type": "image/jpeg"}) as r:
                await r.read()
                if r.status == 200:
                    latencies.append(time.perf_counter() - start)
                else:
                    errors += 1

    timeout = aiohttp.ClientTimeout(total=max_seconds + 60)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency), timeout=timeout) as s:
        start = time.perf_counter()
        await asyncio.gather(*(worker(s) for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    p50, p90, p99 = np.percentile(np.array(latencies or [np.nan]) * 1000, [50, 90, 99])
    return Stats(len(latencies) / elapsed, float(p50), float(p90), float(p99), errors)


def load(url: str, bodies: list[bytes], concurrency: int, total: int, max_seconds: float) -> Stats:
    return asyncio.run(_load(url, bodies, concurrency, total, max_seconds))


Runs = dict[tuple[str, int], list[Stats]]  # (server, concurrency) -> one Stats per round


def measure(servers: dict[str, str], bodies: list[bytes], args: argparse.Namespace) -> Runs:
    """Warm every server up (not reported), then `runs` rounds; in each round every concurrency hits every
    server in turn, so background load drifting during the benchmark touches all of them alike."""
    for url in servers.values():
        load(url, bodies, 8, 32, args.max_seconds)  # connections, lazy inits, allocator
    runs: Runs = {}
    for r in range(args.runs):
        for c in [int(x) for x in args.concurrency.split(",")]:
            for name, url in servers.items():
                stats = load(url, bodies, c, max(args.requests, c), args.max_seconds)
                if stats.errors:
                    raise SystemExit(f"{name}: {stats.errors} failed requests at c={c}: no figures")
                runs.setdefault((name, c), []).append(stats)
                print(f"  round {r + 1}/{args.runs}  {name:16s} c={c:<3d} {stats.rps:6.1f} img/s", flush=True)
    return runs


def report(runs: Runs) -> None:
    """Per server and concurrency, the run with the median throughput."""
    print(
        "  {:16s} {:5s} {:>8s} {:>8s} {:>8s} {:>8s} {:>6s}".format(
            "server", "", "img/s", "p50 ms", "p90 ms", "p99 ms", "errors"
        )
    )
    for (name, c), stats in sorted(runs.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        print(f"  {name:16s} c={c:<3d} {sorted(stats, key=lambda s: s.rps)[len(stats) // 2].row()}")


def paired_ratio(runs: Runs, a: str, b: str, c: int) -> tuple[float, list[float]]:
    """Median over rounds of a's throughput / b's in the same round (both saw the same background load)."""
    ratios = [x.rps / y.rps for x, y in zip(runs[a, c], runs[b, c], strict=True)]
    return statistics.median(ratios), ratios


# ---------------------------------------------------------------------------------------------------------
# The servers


VARIANTS: dict[str, dict] = {  # name -> the settings that differ
    "split": {"layout": "split", "batch_wait_timeout_s": 0.01},  # the default: waits only under load
    "split-nowait": {"layout": "split", "batch_wait_timeout_s": 0.0},
    "split-2ms": {"layout": "split", "batch_wait_timeout_s": 0.002},
    "fused": {"layout": "fused", "batch_wait_timeout_s": 0.01},
    "fused-nowait": {"layout": "fused", "batch_wait_timeout_s": 0.0},
    "fused-nowait-unbatched": {"layout": "fused", "batch_wait_timeout_s": 0.0, "max_batch_size": 1},
}
STOCK_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "0"}  # over THROUGHPUT_ENV, which this process has by then
DEFAULT = "split"  # what ServeConfig's defaults are (checked below)


def serve_settings(model_dir: Path, args: argparse.Namespace, **overrides: object) -> dict:
    return {
        "model_dir": str(model_dir),
        "precision": "fp32",
        "torch_threads": args.torch_threads,
        # Small reservations so that every server fits on a 2-CPU machine at once; the threads are set explicitly.
        "num_cpus": 0.2,
        "ingress_num_cpus": 0.1,
        "max_batch_size": args.max_batch_size,
        "max_concurrent_batches": args.max_concurrent_batches,
        **overrides,
    }


@contextmanager
def serve_app(name: str, settings: dict, port: int) -> Iterator[str]:
    from ray import serve

    from rayimgcls.serve import build_app

    serve.run(build_app(settings), name=name, route_prefix=f"/{name}")
    try:
        yield f"http://127.0.0.1:{port}/{name}/v1/classify"
    finally:
        serve.delete(name)


@contextmanager
def subprocess_server(flags: list[str], env: dict | None = None, ready_path: str = "/v2/health/live") -> Iterator[str]:
    """This script in one of its server modes, in its own process (stopped by its pid)."""
    import requests

    port = free_port()
    proc = subprocess.Popen([sys.executable, __file__, *flags, "--port", str(port)], env={**os.environ, **(env or {})})
    try:
        for _ in range(480):
            assert proc.poll() is None, f"server {flags[0]} exited with {proc.returncode}"
            try:
                if requests.get(f"http://127.0.0.1:{port}{ready_path}", timeout=2).ok:
                    break
            except requests.RequestException:
                pass
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/v1/classify"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


def plain_server(model_dir: Path, args: argparse.Namespace) -> Iterator[str]:
    flags = ["--plain-server", "--model-dir", str(model_dir), "--torch-threads", str(args.torch_threads)]
    return subprocess_server(flags)


def second_ray_server(settings: dict, args: argparse.Namespace) -> Iterator[str]:
    """`settings` served by Serve on a second local Ray whose processes all start with Serve's stock settings."""
    flags = ["--serve-server", json.dumps(settings), "--cpus", str(args.cpus)]
    return subprocess_server(flags, STOCK_ENV, ready_path="/v2/health/ready")


def run_serve_server(settings: dict, port: int, cpus: int) -> None:
    """A local Ray of its own (the environment, STOCK_ENV, reaches every Ray process), serving on `port`."""
    import ray
    from ray import serve

    from rayimgcls.serve import build_app

    ray.init(
        address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING
    )
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(settings), name="stock", route_prefix="/")
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()


def run_plain_server(model_dir: str, port: int, threads: int) -> None:
    """The peer: one process, one uvicorn worker, the same decode and Predictor, one image per model call."""
    import torch
    import uvicorn

    from rayimgcls.card import format_prediction
    from rayimgcls.images import preprocess
    from rayimgcls.model import Predictor

    torch.set_num_threads(threads)
    predictor = Predictor.from_dir(model_dir, "cpu", "fp32")
    card = predictor.card
    app = FastAPI()

    def infer(body: bytes) -> dict:
        probs = predictor.predict_batch(preprocess(body, card.preprocess)[None])[0]
        return {"model": card.model_name, "version": card.version, "results": [format_prediction(probs, card)]}

    @app.get("/v2/health/live")
    def live() -> dict:
        return {"status": "live"}

    @app.post("/v1/classify")
    async def classify(request: Request) -> dict:
        body = await request.body()
        return await asyncio.to_thread(infer, body)

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------------------
# Autoscaling


def replica_count() -> int:
    from ray import serve

    app = serve.status().applications.get("autoscale")
    deployment = "Ingress" if VARIANTS[DEFAULT]["layout"] == "fused" else "ModelServer"  # the one that scales
    return app.deployments[deployment].replica_states.get("RUNNING", 0) if app else 0


def autoscale(model_dir: Path, bodies: list[bytes], port: int, args: argparse.Namespace) -> tuple[int, int]:
    """Sustained load on a 1..2-replica deployment, then idleness: prints the replica count every second and
    returns (peak, final)."""
    import threading

    settings = serve_settings(
        model_dir,
        args,
        **VARIANTS[DEFAULT],
        min_replicas=1,
        max_replicas=2,
        target_ongoing_requests=2,
        upscale_delay_s=3,
        downscale_delay_s=8,
        look_back_period_s=12,
    )
    counts: list[tuple[float, int]] = []
    with serve_app("autoscale", settings, port) as url:
        stop = threading.Event()

        def keep_loading() -> None:
            while not stop.is_set():
                load(url, bodies, 16, 10**6, 2.0)

        loader = threading.Thread(target=keep_loading)
        start = time.perf_counter()
        loader.start()
        while time.perf_counter() - start < args.autoscale_load_s:
            counts.append((time.perf_counter() - start, replica_count()))
            time.sleep(1)
        stop.set()
        loader.join()
        load_end = time.perf_counter() - start
        while time.perf_counter() - start < load_end + args.autoscale_idle_s:
            counts.append((time.perf_counter() - start, replica_count()))
            if counts[-1][1] == 1 and max(n for _, n in counts) > 1:
                break
            time.sleep(1)
    print(f"  replicas over time (t in s: count; load from 0 to {load_end:.0f} s):")
    print("   " + " ".join(f"{t:.0f}:{n}" for t, n in counts))
    return max(n for _, n in counts), counts[-1][1]


# ---------------------------------------------------------------------------------------------------------


def check_default() -> None:
    """DEFAULT must be what a user gets: its settings equal ServeConfig's defaults."""
    from rayimgcls.config import ServeConfig

    defaults = ServeConfig(model_dir="x")
    wrong = {k: v for k, v in VARIANTS[DEFAULT].items() if getattr(defaults, k) != v}
    assert not wrong, f"DEFAULT={DEFAULT} differs from ServeConfig's defaults in {wrong}"


def main() -> None:
    args = parse_args()
    if args.plain_server:
        run_plain_server(args.model_dir, args.port, args.torch_threads)
        return
    if args.serve_server:
        run_serve_server(json.loads(args.serve_server), args.port, args.cpus)
        return
    import ray
    from ray import serve

    check_default()
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    bodies, model_dir = make_inputs(args)
    print(
        f"model {args.model} at {args.image_size} px, {len(bodies)} JPEGs of {args.photo_size}, "
        f"{args.torch_threads} torch thread(s), {os.cpu_count()} CPUs; {args.requests} requests x "
        f"{args.runs} interleaved rounds",
        flush=True,
    )
    from rayimgcls.serve import use_throughput_mode

    use_throughput_mode()  # as `rayimgcls serve` starts its Ray
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        with ExitStack() as stack:  # all up at once (idle ones cost next to nothing), runs interleaved
            servers = {
                name: stack.enter_context(serve_app(name, serve_settings(model_dir, args, **settings), port))
                for name, settings in VARIANTS.items()
            }
            stock = serve_settings(model_dir, args, **VARIANTS[DEFAULT])
            servers[f"{DEFAULT}-stock"] = stack.enter_context(second_ray_server(stock, args))
            servers["plain"] = stack.enter_context(plain_server(model_dir, args))
            runs = measure(servers, bodies, args)
        report(runs)
        scaled = autoscale(model_dir, bodies, port, args) if args.autoscale else None
    finally:
        serve.shutdown()
        ray.shutdown()
    concurrencies = [int(x) for x in args.concurrency.split(",")]
    top = max(concurrencies)
    for name in servers:
        if name != "plain":
            ratio, each = paired_ratio(runs, name, "plain", top)
            print(f"RESULT {name.replace('-', '_')}_vs_fastapi ratio={ratio:.2f} (c={top}; rounds {_each(each)})")
    ratio, each = paired_ratio(runs, DEFAULT, "plain", top)
    print(f"RESULT serve_vs_fastapi ratio={ratio:.2f} target=1.0 (c={top}, {DEFAULT} / plain; rounds {_each(each)})")
    ratio, each = paired_ratio(runs, DEFAULT, "fused-nowait-unbatched", top)
    print(f"RESULT serve_batching ratio={ratio:.2f} target=1.0 (c={top}, {DEFAULT} / unbatched; rounds {_each(each)})")
    if 1 in concurrencies:
        ratios = [p.p50_ms / ours.p50_ms for p, ours in zip(runs["plain", 1], runs[DEFAULT, 1], strict=True)]
        print(
            f"RESULT serve_c1_latency_fastapi_vs_serve ratio={statistics.median(ratios):.2f} target=0.75 "
            f"(c=1, plain p50 / {DEFAULT} p50; rounds {_each(ratios)})"
        )
    if scaled:
        print(f"RESULT serve_autoscale peak_replicas={scaled[0]} final_replicas={scaled[1]} target=2,1")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _each(values: list[float]) -> str:
    return ", ".join(f"{v:.2f}" for v in values)


if __name__ == "__main__":
    main()
