"""Data-parallel training on Ray Train: `rayimgcls train`, and `python -m rayimgcls.train` for `ray job submit`.

driver.py   checks, the TorchTrainer, export (what `run` does on the driver)
loop.py     the worker loop (one copy per Ray Train worker)
tracking.py TensorBoard and MLflow
__main__.py `python -m rayimgcls.train`: the flags of `rayimgcls train`

The run directory's files are read and written by rayimgcls.rundir.
"""

from rayimgcls.train.driver import TrainingError, run

__all__ = ["TrainingError", "run"]
