"""Connect to Ray (or start a local one) and refuse resource requests the cluster can never meet."""

from __future__ import annotations

import json
import logging
import os
import socket
import sys

from rayimgcls.config import ConfigError

logger = logging.getLogger(__name__)


class ResourceError(RuntimeError):
    """A request for more CPUs or GPUs than the cluster has or can scale to."""


class ClusterError(RuntimeError):
    """A Ray address that does not answer; the message names it and what to do."""


CONNECT_TIMEOUT_S = 5.0  # an address that accepts no connection in this long is reported, not waited on


# The S3 settings storage.py reads. Workers on other machines need the driver's values: without them they
# would read and write the default AWS endpoint, or fail to sign their requests.
S3_ENV_VARS = (
    "AWS_ENDPOINT_URL",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
)
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray in the driver of a `ray job submit` job


def s3_env_vars() -> dict[str, str]:
    """The S3 settings of this process (only those that are set)."""
    return {k: os.environ[k] for k in S3_ENV_VARS if os.environ.get(k)}


def with_s3_env(runtime_env: dict | None) -> dict | None:
    """`runtime_env` plus this process's S3 settings as env_vars (values already in runtime_env win)."""
    found = s3_env_vars()
    if not found:
        return runtime_env
    env = dict(runtime_env or {})
    env["env_vars"] = {**found, **(env.get("env_vars") or {})}
    return env


def check_address(address: str | None = None) -> None:
    """Refuse a dashboard URL as the Ray address (`ray.init` fails on one with a bare ValueError), before a
    command writes anything."""
    given = address or os.environ.get("RAY_ADDRESS", "")
    if given.startswith(("http://", "https://")):
        raise ConfigError(
            f"Ray address {given!r} is a dashboard address, which takes job submissions: submit with "
            "jobs/submit_train.sh / jobs/submit_infer.sh (or `ray job submit`), or give the cluster's GCS "
            "address (HEAD:6379, or `auto` on a node of the cluster) to run from here"
        )


def init_ray(address: str | None = None, *, runtime_env: dict | None = None, quiet: bool = True) -> None:
    """Use the cluster at `address` (or RAY_ADDRESS, or the job's cluster under `ray job submit`), else
    start a local Ray. A local Ray turns token authentication on; we leave it on.

    Joining a running cluster from outside a job, the driver's S3 settings travel to every worker in the runtime
    env (a local Ray's workers inherit them anyway). Inside a submitted job the job's runtime env decides: Ray
    refuses a driver runtime env that sets the same variables again.
    """
    import ray

    check_address(address)
    if ray.is_initialized():
        return
    target = resolve_address(address)
    joining = target != "local"  # None: the cluster `ray start` recorded, which answers
    if joining and JOB_CONFIG_ENV not in os.environ:
        runtime_env = with_s3_env(runtime_env)
    kwargs: dict = {"address": target, "runtime_env": runtime_env}
    if quiet:
        from rayimgcls.console import ray_init_options

        kwargs["logging_level"] = logging.WARNING
        kwargs.update(ray_init_options())  # Ray's logs to its files, not the terminal (unless --verbose)
    try:
        ray.init(**kwargs)
    except ConnectionError as e:
        hint = (
            ""
            if os.environ.get("RAY_AUTH_MODE")
            else ("; a cluster with token authentication (`ray start`'s default) needs RAY_AUTH_MODE=token here")
        )
        raise ClusterError(f"cannot join the Ray cluster at {target or 'auto'}: {e}{hint}") from None
    logger.info("Ray %s: %s", "connected" if joining else "started locally", ray.cluster_resources())


def resolve_address(address: str | None) -> str | None:
    """The address for `ray.init`, checked to answer first, because `ray.init` waits on a dead one for
    minutes (and Ctrl-C does not stop it).

    No address (and no RAY_ADDRESS): Ray's convention is to join the cluster `ray start` recorded in
    `<RAY_TMPDIR or /tmp>/ray/ray_current_cluster`; we join it when it answers, and when it does not (a
    head that was killed without `ray stop`) we warn, naming it, and start a fresh local Ray instead.
    An address given explicitly (`--address`, RAY_ADDRESS, `auto` with a record) that does not answer
    within CONNECT_TIMEOUT_S is a ClusterError naming it. Inside `ray job submit` Ray's own address is used.
    """
    from ray._common.utils import get_ray_address_file

    given = address or os.environ.get("RAY_ADDRESS") or None
    if JOB_CONFIG_ENV in os.environ or given == "local":
        return given
    record_file = get_ray_address_file(None)
    record = _read_record(record_file)
    if given is None:
        if record is None:
            return "local"
        if _answers(record):
            # Ray joins its record itself (and then, unlike for an address we pass, uses the token `ray start` made)
            logger.info("joining the Ray cluster at %s (`ray start`'s record; --address local: a separate one)", record)
            return None
        logger.warning(
            "ignoring %s: it names a Ray cluster at %s that does not answer (a `ray start` head stopped without "
            "`ray stop`, which removes the record); starting a local Ray instead",
            record_file,
            record,
        )
        return "local"
    target = record if given == "auto" and record else given
    if (given != "auto" or record) and not _answers(target):
        source = f" (from {record_file})" if target == record and given == "auto" else ""
        raise ClusterError(
            f"Ray cluster at {target}{source} does not answer (no connection within {CONNECT_TIMEOUT_S:g} s): "
            "start it, correct --address / RAY_ADDRESS, or use --address local for a local Ray"
            + ("; `ray stop` removes a dead cluster's record" if source else "")
        )
    return given


def _read_record(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip() or None
    except OSError:
        return None


def _answers(address: str, timeout: float = CONNECT_TIMEOUT_S) -> bool:
    """Whether something accepts a TCP connection at a Ray address (host:port, ray://host:port)."""
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        return True  # not host:port: let ray.init judge it (and say what is wrong)
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return True
    except OSError:
        return False


def max_resources() -> dict[str, float]:
    """The most each resource can reach: an autoscaling cluster's configured maximum, else what it has now."""
    import ray

    try:
        from ray._private.state import state

        configured = state.get_max_resources_from_cluster_config()  # what Ray Train's own check uses
    except Exception:  # noqa: BLE001 - older GCS or no autoscaler: fall back to the live totals
        configured = None
    return {k: float(v) for k, v in (configured or ray.cluster_resources()).items()}


def max_is_known() -> bool:
    """False on a cluster whose autoscaler does not publish its maximum (the `ray up` autoscaler, v1): there
    max_resources() is only what runs now, and the autoscaler may add more when asked."""
    try:
        from ray._private import ray_constants
        from ray._private.state import state
        from ray.experimental.internal_kv import _internal_kv_get

        if state.get_max_resources_from_cluster_config():
            return True
        status = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
        return not can_add_nodes(json.loads(status or "{}"))
    except Exception:  # noqa: BLE001 - private APIs that moved: assume a fixed cluster and check
        return True


def can_add_nodes(status: dict) -> bool:
    """Whether the autoscaler status Ray's monitor publishes is that of a launcher's autoscaler. Every cluster
    runs the monitor; without an autoscaling config (`ray start`, `ray.init()`) it names each node's type after
    the node itself, where a launcher's names node types (head, gpu_worker, ...)."""
    mapping = (status.get("autoscaler_report") or {}).get("node_type_mapping") or {}
    return any(kind != f"node_{node}" for node, kind in mapping.items())


def check_resources(what: str, *, cpus: float = 0.0, gpus: float = 0.0) -> None:
    """Raise ResourceError at once, with the numbers, if `cpus`/`gpus` in total can never be had. On an
    autoscaling cluster that does not say its maximum, warn instead: the request waits for new nodes."""
    have = max_resources()
    problems = []
    if gpus > have.get("GPU", 0):
        problems.append(f"{gpus:g} GPU(s) requested, the cluster has {have.get('GPU', 0):g}")
    if cpus > have.get("CPU", 0):
        problems.append(f"{cpus:g} CPU(s) requested, the cluster has {have.get('CPU', 0):g}")
    if problems and not max_is_known():
        logger.warning("%s: %s now; waiting for the autoscaler to add nodes", what, "; ".join(problems))
    elif problems:
        raise ResourceError(f"{what}: " + "; ".join(problems))


def node_cpus() -> list[float]:
    """The CPUs of each live node that has any (a CPU-less head is left out)."""
    import ray

    return [n["Resources"]["CPU"] for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU", 0) > 0]


def job_runtime_env(path: str) -> dict:
    """A runtime env file (YAML or JSON) with this shell's S3 settings added: what `jobs/submit.sh` hands to
    `ray job submit`, so workers reach the same S3 endpoint with the same credentials as the client."""
    import yaml

    with open(path, encoding="utf-8") as f:
        loaded = yaml.safe_load(f) or {}
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: expected a mapping (working_dir, env_vars, ...), not {type(loaded).__name__}")
    return with_s3_env(loaded) or loaded


def main(argv: list[str]) -> None:
    """`python -m rayimgcls.runtime RUNTIME_ENV.yaml`: print the runtime env, S3 settings added, as JSON."""
    import yaml

    if len(argv) != 1:
        sys.exit("usage: python -m rayimgcls.runtime RUNTIME_ENV.yaml")
    try:
        print(json.dumps(job_runtime_env(argv[0])))
    except (OSError, ValueError, yaml.YAMLError) as e:
        sys.exit(f"error: runtime env {argv[0]}: {e}")
    if "AWS_SECRET_ACCESS_KEY" in s3_env_vars():
        print(
            "note: this shell's AWS keys go to the job's runtime env, which whoever holds the cluster's token can "
            "read; on AWS prefer an instance role or IRSA and unset them here",
            file=sys.stderr,
        )


if __name__ == "__main__":
    main(sys.argv[1:])
