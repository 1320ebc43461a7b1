"""Data-parallel training on Ray Train: `rayimgcls train`, and `python -m rayimgcls.train` for `ray job submit`.

driver.py        checks, resuming, the TorchTrainer (what `run` does on the driver)
data.py          labels.csv checked and split into train and validation rows on the driver
class_weights.py --class-weights: auto, or a user's file checked as hostile input
export.py        after training: the model directory, summary.json, curves.png, report.html
loop.py          the worker loop (one copy per Ray Train worker)
validation.py    scoring the validation subset on rank 0
ema.py           --model-ema (timm's ModelEmaV3)
tracking.py      TensorBoard and MLflow
__main__.py      `python -m rayimgcls.train`: the flags of `rayimgcls train`

The run directory's files are read and written by rayimgcls.rundir.
"""

from rayimgcls.train.driver import TrainingError, run

__all__ = ["TrainingError", "run"]
