"""rayimgcls: image classification on Ray (Ray Data decoding, Ray Train, batch inference, Ray Serve).

The public Python API is `Predictor`: `Predictor.from_dir(model_dir).predict(images)`. Importing the package
imports nothing heavy; torch and timm load when `Predictor` is first touched.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Predictor", "__version__"]

if TYPE_CHECKING:
    from rayimgcls.model import Predictor


def __getattr__(name: str) -> Any:
    if name == "Predictor":
        from rayimgcls.model import Predictor

        return Predictor
    raise AttributeError(f"module 'rayimgcls' has no attribute {name!r}")
