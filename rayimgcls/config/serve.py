"""ServeConfig: the HTTP endpoint, its limits and deadlines, batching and autoscaling."""

from __future__ import annotations

from dataclasses import dataclass

from rayimgcls.config.base import PRECISIONS, check, opt, raise_if

SERVE_LAYOUTS = ("fused", "split")


@dataclass
class ServeConfig:
    model_dir: str = opt("", "Model directory (model.safetensors + config.json), local or URI.")
    host: str = opt("127.0.0.1", "Address the HTTP proxy binds; 0.0.0.0 exposes it beyond this machine.")
    port: int = opt(8000, "HTTP port.")
    route_prefix: str = opt("/", "URL prefix of the application.")
    name: str = opt("rayimgcls", "Serve application name.")
    model_name: str | None = opt(None, "Model name of the Open Inference Protocol routes; default the timm name.")
    api_key: str | None = opt(None, "Bearer token required on every route that uses the model (or RAYIMGCLS_API_KEY).")
    allow_no_key: bool = opt(False, "Allow a host beyond loopback without an API key (refused otherwise).")
    precision: str | None = opt(None, "fp32, bf16 or auto; default: the model directory's setting.")
    layout: str = opt("split", "fused: ingress and model in one deployment (no hop); split: two, scaled apart.")
    use_gpu: bool = opt(False, "Give each model replica a GPU (or a share of one: gpus_per_replica).")
    gpus_per_replica: float = opt(1.0, "GPU share of each model replica with --use-gpu, 0 < x <= 1.")
    num_cpus: float = opt(0.5, "CPUs reserved per model replica (fractional so replicas fit on small hosts).")
    ingress_num_cpus: float = opt(0.25, "CPUs reserved per ingress replica.")
    ingress_replicas: int = opt(1, "Ingress replicas (they validate and decode images).")
    ingress_max_ongoing_requests: int = opt(
        512, "Requests one ingress replica holds at once (async: slow uploads wait here, not in a model slot)."
    )
    max_concurrent_decodes: int = opt(2, "Requests one ingress replica decodes at once (each in a thread).")
    torch_threads: int | None = opt(None, "Torch threads per model replica; default max(1, floor(num_cpus)).")
    max_batch_size: int = opt(16, "Largest batch @serve.batch forms (1 turns batching off).")
    batch_wait_timeout_s: float = opt(
        0.01,
        "Longest a batch waits to fill while other calls are in flight; a call that finds the replica idle starts "
        "its batch at once (a lone request is never held). 0: never wait.",
    )
    max_concurrent_batches: int = opt(
        1, "Batches a model replica runs at once, each in a thread (2 with torch_threads=1: 2 CPU cores)."
    )
    max_ongoing_requests: int | None = opt(
        None, "Per replica; default max(2 * max_batch_size * max_concurrent_batches, 32): batches can fill."
    )
    min_replicas: int = opt(1, "Autoscaling: fewest model replicas.")
    max_replicas: int = opt(1, "Autoscaling: most model replicas.")
    target_ongoing_requests: float = opt(8.0, "Autoscaling: ongoing requests per replica to aim for.")
    upscale_delay_s: float = opt(10.0, "Autoscaling: sustained load before adding a replica.")
    downscale_delay_s: float = opt(60.0, "Autoscaling: sustained idleness before removing one.")
    look_back_period_s: float = opt(30.0, "Autoscaling: averaging window (> Serve's 10 s metrics interval).")
    max_body_bytes: int = opt(20 * 1024 * 1024, "Largest request body accepted (413 beyond).")
    max_pixels: int = opt(50_000_000, "Largest image in pixels (422 beyond), checked before decoding.")
    max_request_pixels: int = opt(64_000_000, "Most pixels summed over a request's images (413 beyond).")
    max_images: int = opt(64, "Most images in one request.")
    max_buffered_bytes: int = opt(512 * 1024 * 1024, "Request bodies one ingress replica holds at once (503 beyond).")
    body_idle_timeout_s: float = opt(15.0, "A request body that sends nothing for this long gets 408.")
    body_timeout_s: float = opt(300.0, "Longest a request body may take to arrive (20 MB at 0.5 Mbit/s); 408 beyond.")

    def __post_init__(self) -> None:
        errors = [
            check(self, "port", 1 <= self.port <= 65535, "1..65535"),
            check(self, "layout", self.layout in SERVE_LAYOUTS, " | ".join(SERVE_LAYOUTS)),
            check(self, "gpus_per_replica", 0 < self.gpus_per_replica <= 1, "0 < x <= 1"),
            check(self, "api_key", self.api_key is None or len(self.api_key) > 0, "a non-empty string"),
            check(self, "precision", self.precision in (None, *PRECISIONS), " | ".join(PRECISIONS)),
            check(self, "num_cpus", self.num_cpus >= 0, ">= 0"),
            check(self, "ingress_num_cpus", self.ingress_num_cpus >= 0, ">= 0"),
            check(self, "ingress_replicas", self.ingress_replicas >= 1, ">= 1"),
            check(self, "ingress_max_ongoing_requests", self.ingress_max_ongoing_requests >= 1, ">= 1"),
            check(self, "max_concurrent_decodes", self.max_concurrent_decodes >= 1, ">= 1"),
            check(self, "torch_threads", self.torch_threads is None or self.torch_threads >= 1, ">= 1"),
            check(self, "max_batch_size", self.max_batch_size >= 1, ">= 1"),
            check(self, "batch_wait_timeout_s", self.batch_wait_timeout_s >= 0, ">= 0"),
            check(self, "max_concurrent_batches", self.max_concurrent_batches >= 1, ">= 1"),
            check(
                self,
                "max_ongoing_requests",
                self.max_ongoing_requests is None
                or self.max_ongoing_requests >= self.max_batch_size * self.max_concurrent_batches,
                ">= max_batch_size * max_concurrent_batches (or batches cannot fill)",
            ),
            check(self, "min_replicas", self.min_replicas >= 0, ">= 0"),
            check(self, "max_replicas", self.max_replicas >= max(1, self.min_replicas), ">= max(1, min_replicas)"),
            check(self, "target_ongoing_requests", self.target_ongoing_requests > 0, "> 0"),
            check(self, "upscale_delay_s", self.upscale_delay_s >= 0, ">= 0"),
            check(self, "downscale_delay_s", self.downscale_delay_s >= 0, ">= 0"),
            check(self, "look_back_period_s", self.look_back_period_s > 0, "> 0"),
            check(self, "max_body_bytes", self.max_body_bytes >= 1, ">= 1"),
            check(self, "max_pixels", self.max_pixels >= 1, ">= 1"),
            check(self, "max_images", self.max_images >= 1, ">= 1"),
            check(self, "max_request_pixels", self.max_request_pixels >= self.max_pixels, ">= max_pixels"),
            check(self, "max_buffered_bytes", self.max_buffered_bytes >= self.max_body_bytes, ">= max_body_bytes"),
            check(self, "body_idle_timeout_s", self.body_idle_timeout_s > 0, "> 0"),
            check(self, "body_timeout_s", self.body_timeout_s >= self.body_idle_timeout_s, ">= body_idle_timeout_s"),
        ]
        if not self.model_dir:
            errors.append("model_dir: required")
        raise_if(errors, "serving")

    @property
    def ongoing_requests_limit(self) -> int:
        return self.max_ongoing_requests or max(2 * self.max_batch_size * self.max_concurrent_batches, 32)
