"""Connect to Ray (or start a local one) and refuse resource requests the cluster can never meet."""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)


class ResourceError(RuntimeError):
    """A request for more CPUs or GPUs than the cluster has or can scale to."""


def init_ray(address: str | None = None, *, runtime_env: dict | None = None, quiet: bool = True) -> None:
    """Use the cluster at `address` (or RAY_ADDRESS, or the job's cluster under `ray job submit`), else
    start a local Ray. A local Ray turns token authentication on; we leave it on."""
    import ray

    if ray.is_initialized():
        return
    kwargs: dict = {"address": address or None, "runtime_env": runtime_env}
    if quiet:
        kwargs["logging_level"] = logging.WARNING
    ray.init(**kwargs)
    logger.info("Ray %s: %s", "connected" if (address or os.environ.get("RAY_ADDRESS")) else "started locally",
                ray.cluster_resources())


def max_resources() -> dict[str, float]:
    """The most each resource can reach: an autoscaling cluster's configured maximum, else what it has now."""
    import ray

    try:
        from ray._private.state import state

        configured = state.get_max_resources_from_cluster_config()  # what Ray Train's own check uses
    except Exception:  # noqa: BLE001 - older GCS or no autoscaler: fall back to the live totals
        configured = None
    return {k: float(v) for k, v in (configured or ray.cluster_resources()).items()}


def check_resources(what: str, *, cpus: float = 0.0, gpus: float = 0.0) -> None:
    """Raise ResourceError at once, with the numbers, if `cpus`/`gpus` in total can never be had."""
    have = max_resources()
    problems = []
    if gpus > have.get("GPU", 0):
        problems.append(f"{gpus:g} GPU(s) requested, the cluster has {have.get('GPU', 0):g}")
    if cpus > have.get("CPU", 0):
        problems.append(f"{cpus:g} CPU(s) requested, the cluster has {have.get('CPU', 0):g}")
    if problems:
        raise ResourceError(f"{what}: " + "; ".join(problems))


def cluster_cpus() -> float:
    import ray

    return float(ray.cluster_resources().get("CPU", 0))
