"""Ray Serve: the classification endpoint (DESIGN.md §6).

    http.py         the wire: error table, body limits and deadlines, parsing, top_k, pixel budget, decoding
    api.py          the FastAPI app of an ingress replica: routes, API key, OpenAPI document, error bodies
    deployments.py  the Ingress and ModelServer deployments (batching, retries on a lost replica)
    application.py  build(cfg), build_app(args) for Serve's CLI and configs, run(cfg) for `rayimgcls serve`

`rayimgcls.serve:build_app` is the import path of serve configs; `rayimgcls.serve:app` is an Application built
on first lookup from RAYIMGCLS_MODEL_DIR (for `serve build`; hence no submodule may be called `app`). Importing
starts nothing, loads no weights and never imports the training code.
"""

from __future__ import annotations

from typing import Any

from rayimgcls.serve.application import build, build_app, check_port_free, run, use_throughput_mode
from rayimgcls.serve.http import ERROR_STATUS

__all__ = ["ERROR_STATUS", "build", "build_app", "check_port_free", "run", "use_throughput_mode"]


def __getattr__(name: str) -> Any:
    if name == "app":
        from rayimgcls.serve.application import app_from_env

        return app_from_env()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
