"""The `rayimgcls` command line: one thin function per command; the stage modules are imported lazily so
`rayimgcls --help` answers at once.

Commands built on a stage config (train, infer, serve) get one flag per field of that dataclass
(`num_epochs` -> `--num-epochs`) plus `--config FILE.yaml`: defaults < YAML < flags.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import logging
import os
import sys
import traceback
import typing
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NoReturn, Optional

import typer

from rayimgcls.config import (
    ConfigError,
    InferConfig,
    ServeConfig,
    TrainConfig,
    base_type,
    field_default,
    field_types,
    load_config,
)
from rayimgcls.text import printable

app = typer.Typer(
    help="Image classification on Ray: data -> train -> infer -> evaluate -> serve.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
logger = logging.getLogger("rayimgcls")


def _setup_logging() -> None:
    from rayimgcls.console import setup_logging

    setup_logging()  # also what `python -m rayimgcls.train` calls (no callback runs there)


# --debug (set by the app callback) or RAYIMGCLS_DEBUG=1 (e.g. in a job's runtime env): tracebacks for user errors
# too. Decided afresh per command: one `--debug` must not stick to later commands run in the same process.
DEBUG = {"on": os.environ.get("RAYIMGCLS_DEBUG") == "1"}


@app.callback()
def options(
    debug: bool = typer.Option(False, "--debug", help="Show the traceback behind an error message (for bug reports)."),
    verbose: bool = typer.Option(
        False, "--verbose", help="Show Ray's own logs and our info lines too (also: RAYIMGCLS_VERBOSE=1)."
    ),
) -> None:
    """Image classification on Ray: data -> train -> infer -> evaluate -> serve. What reaches the terminal
    (rayimgcls.console): our progress and results; Ray's logs with --verbose."""
    from rayimgcls import console

    DEBUG["on"] = debug or os.environ.get("RAYIMGCLS_DEBUG") == "1"
    console.set_verbose(verbose)
    _setup_logging()


def fail(message: str, code: int = 2) -> NoReturn:
    """Print `message` (each line terminal-safe: it may quote a user's path) and exit with `code`."""
    if DEBUG["on"] and sys.exc_info()[0] is not None:
        traceback.print_exc()
    typer.secho(f"error: {safe(message)}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code)


def safe(text: str) -> str:
    """`text` with control characters escaped line by line: paths and names in it come from user files."""
    return "\n".join(printable(line) for line in text.split("\n"))


def echo(text: str, err: bool = False) -> None:
    typer.echo(safe(text), err=err)


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn the errors a user can fix into a message and exit code 2, never a traceback: bad config, data,
    model directory, resources, an unreachable cluster, and a path or URI of theirs that cannot be read or
    written (storage.StorageError: not found, permission denied, a directory, no such bucket, access denied).
    Anything else is a bug of ours and keeps its traceback; `--debug` shows the traceback of these too."""
    from rayimgcls.dataset import DatasetError
    from rayimgcls.images import ImageError
    from rayimgcls.runtime import ClusterError, ResourceError
    from rayimgcls.storage import StorageError, TextEncodingError

    known: tuple[type[Exception], ...] = (
        ConfigError,
        DatasetError,
        ImageError,
        ResourceError,
        ClusterError,
        StorageError,
        TextEncodingError,
    )
    try:
        from rayimgcls.card import ModelError

        known += (ModelError,)
        yield
    except known as e:
        fail(str(e))
    except KeyboardInterrupt:
        fail("interrupted", INTERRUPTED)


# ---------------------------------------------------------------------------------------------------------
# Flags generated from a config dataclass

CONFIG_OPTION = inspect.Parameter(
    "config",
    inspect.Parameter.KEYWORD_ONLY,
    annotation=Optional[str],  # noqa: UP045 - typer needs Optional
    default=typer.Option(None, "--config", help="YAML file of settings (keys = the flag names with underscores)."),
)
ADDRESS_OPTION = inspect.Parameter(
    "address",
    inspect.Parameter.KEYWORD_ONLY,
    annotation=Optional[str],  # noqa: UP045
    default=typer.Option(
        None,
        "--address",
        help="Ray cluster (ray.init address: auto, ray://host:10001); default RAY_ADDRESS, else a local Ray.",
    ),
)


def config_flags(cls: type, *extra: inspect.Parameter) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Give a command one option per field of `cls`. Each defaults to None, meaning "not given", so the YAML
    file and the dataclass defaults show through; the help shows the real default."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        params = list(extra)
        types_ = field_types(cls)
        for f in dataclasses.fields(cls):
            tp = base_type(types_[f.name])
            flag = "--" + f.name.replace("_", "-")
            decls = (f"{flag}/--no-{flag[2:]}",) if tp is bool else (flag,)
            default = field_default(f)
            shown = "" if default in (None, "", {}) else f" \\[default: {default}]"  # "\\[": not rich markup
            option = typer.Option(None, *decls, help=f.metadata.get("help", "") + shown, show_default=False)
            given_as_text = tp is dict or typing.get_origin(tp) is list  # JSON; a list as '0.5,0.5,0.5'
            annotation = Optional[str] if given_as_text else Optional[tp]  # noqa: UP045
            params.append(
                inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation)
            )

        @functools.wraps(fn)
        def command(**kwargs: Any) -> Any:
            return fn(**kwargs)

        command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        command.__annotations__ = {}
        return command

    return decorate


def _split(kwargs: dict[str, Any], *names: str) -> list[Any]:
    return [kwargs.pop(n) for n in names]


# ---------------------------------------------------------------------------------------------------------
# Data commands


@app.command("make-dataset")
def make_dataset(
    out: str = typer.Argument(..., help="Folder to create the dataset in."),
    num_images: int = typer.Option(1000, help="Number of images."),
    num_classes: int = typer.Option(4, help="Number of shape classes (2..10)."),
    min_size: int = typer.Option(64, help="Smallest image side in pixels."),
    max_size: int = typer.Option(128, help="Largest image side in pixels."),
    multilabel: bool = typer.Option(False, help="Several shapes per image, space-separated labels."),
    max_rotation: float = typer.Option(20.0, help="Shapes turn by up to +- this many degrees."),
    seed: int = typer.Option(0, help="Random seed; the same seed gives the same files."),
) -> None:
    """Render a shapes dataset in the SambaStudio format (labels.csv, predictions.csv, class_to_idx.json)."""
    from rayimgcls.synth import SynthConfig
    from rayimgcls.synth import make_dataset as make

    try:
        cfg = SynthConfig(
            num_images=num_images,
            num_classes=num_classes,
            min_size=min_size,
            max_size=max_size,
            multilabel=multilabel,
            max_rotation=max_rotation,
            seed=seed,
        )
    except ValueError as e:
        fail(str(e))
    root = make(out, cfg)
    echo(f"wrote {num_images} images, labels.csv, predictions.csv and class_to_idx.json to {root}")


@app.command("from-folders")
def from_folders(
    src: str = typer.Argument(..., help="Class-per-folder tree (SRC/<class>/<image>)."),
    out: str = typer.Argument(..., help="Dataset root to write (may be SRC itself)."),
    train: float = typer.Option(0.8, help="Train fraction."),
    validation: float = typer.Option(0.1, help="Validation fraction."),
    test: float = typer.Option(0.1, help="Test fraction."),
    seed: int = typer.Option(0, help="Seed of the split."),
) -> None:
    """Convert an ImageFolder tree into labels.csv + class_to_idx.json with a seeded split."""
    from rayimgcls.dataset import from_folders as convert

    if min(train, validation, test) < 0 or abs(train + validation + test - 1) > 1e-6:
        fail(f"--train {train} --validation {validation} --test {test}: fractions must be >= 0 and sum to 1")
    with user_errors():
        df = convert(src, out, (train, validation, test), seed)
    counts = df["subset"].value_counts().to_dict()
    echo(f"wrote {out}/labels.csv: {len(df)} images, {df['label'].nunique()} classes, {counts}")


@app.command()
def validate(
    data_root: str = typer.Argument(..., help="Dataset root (local path or URI)."),
    num_intended_classes: Optional[int] = typer.Option(None, help="Class count; default inferred, and said."),  # noqa: UP045
    multilabel: Optional[bool] = typer.Option(  # noqa: UP045
        None,
        "--multilabel/--no-multilabel",
        help="Default: inferred from the labels.",
    ),
    images: bool = typer.Option(True, help="Decode every image (--no-images checks the CSVs only)."),
    ray_above: int = typer.Option(5000, help="Check images on Ray when a CSV has more rows than this."),
    address: Optional[str] = typer.Option(None, help="Ray cluster address for the parallel check."),  # noqa: UP045
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Check a dataset and report every problem with its CSV line; exit 1 if there are any."""
    from rayimgcls import dataset

    checker = dataset.check_images
    with user_errors():
        rows = len(dataset.read_csv(data_root))
        if images and rows > ray_above:
            from rayimgcls.data import check_images_on_ray
            from rayimgcls.runtime import init_ray

            init_ray(address)
            checker = check_images_on_ray
        report = dataset.validate(data_root, num_intended_classes, multilabel, images=images, image_checker=checker)
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
    else:
        _print_report(report, parallel=checker is not dataset.check_images)
    raise typer.Exit(0 if report.ok else 1)


def _print_report(report: Any, parallel: bool) -> None:
    echo(f"dataset {report.data_root}")
    echo(f"  rows: {report.rows}")
    echo(f"  subsets: {report.subsets}")
    echo(f"  classes: {report.num_classes} ({report.classes_source}); multilabel: {report.multilabel}")
    for name, count in report.classes.items():
        echo(f"    {name}: {count}")
    if report.multilabel:
        echo(f"  labels per image: {report.labels_per_image}")
    typer.echo(f"  images checked {'on Ray' if parallel else 'locally'}")
    if report.ok:
        typer.secho("OK: no problems found", fg=typer.colors.GREEN)
        return
    typer.secho(f"{len(report.problems)} problem(s):", fg=typer.colors.RED)
    for p in report.problems:
        echo(f"  {p}  [{p.code}]")


# ---------------------------------------------------------------------------------------------------------
# Training


@app.command()
@config_flags(TrainConfig, CONFIG_OPTION, ADDRESS_OPTION)
def train(**flags: Any) -> None:
    """Train a timm model data-parallel on Ray Train (local Ray by default); re-run the same --run-name to
    resume. Also: `python -m rayimgcls.train ...` and `ray job submit -- python -m rayimgcls.train ...`."""
    config, address = _split(flags, "config", "address")
    with user_errors():
        cfg = load_config(TrainConfig, config, flags)
        from rayimgcls.train import TrainingError, run

        try:
            run(cfg, address)
        except TrainingError as e:
            fail(str(e), 1)


# ---------------------------------------------------------------------------------------------------------
# Serving


@app.command()
@config_flags(ServeConfig, CONFIG_OPTION, ADDRESS_OPTION)
def serve(**flags: Any) -> None:
    """Serve a model directory over HTTP with Ray Serve (local Ray by default, bound to 127.0.0.1 unless
    --host says otherwise). Blocks until Ctrl-C or SIGTERM, then shuts down what it started."""
    config, address = _split(flags, "config", "address")
    with user_errors():
        cfg = load_config(ServeConfig, config, flags)
        from rayimgcls.serve import run

        run(cfg, address)


# ---------------------------------------------------------------------------------------------------------
# Batch inference and evaluation


@app.command()
@config_flags(InferConfig, CONFIG_OPTION, ADDRESS_OPTION)
def infer(**flags: Any) -> None:
    """Predict every row of a CSV (predictions.csv by default) or a folder/glob of images with Ray Data into
    sharded predictions-*.jsonl in --result-dir (local Ray by default); --resume finishes a stopped run."""
    config, address = _split(flags, "config", "address")
    with user_errors():
        cfg = load_config(InferConfig, config, flags)
        from rayimgcls.infer import run_inference
        from rayimgcls.results import PipelineError, ResultDirError

        try:
            summary = run_inference(cfg, address)
        except ResultDirError as e:
            fail(str(e))
        except PipelineError as e:
            fail(str(e), 1)
    echo(summary.describe())
    if not cfg.images:
        echo(f"next: rayimgcls evaluate --result-dir {cfg.result_dir}")


@app.command()
def evaluate(
    result_dir: str = typer.Option(..., help="Result dir of `rayimgcls infer` (manifest.json + shards)."),
    data_root: Optional[str] = typer.Option(  # noqa: UP045 - typer needs Optional
        None, help="Dataset root holding labels.csv; default: the manifest's."
    ),
    subset: Optional[str] = typer.Option(  # noqa: UP045
        None, help="Only rows of this subset of labels.csv (e.g. test)."
    ),
    model_dir: Optional[str] = typer.Option(  # noqa: UP045
        None, help="Model directory --tune-thresholds writes to; default: the manifest's."
    ),
    tune_thresholds: bool = typer.Option(
        False,
        help="Multi-label: per-class thresholds that maximise F1 on the validation rows, written to "
        "the model's config.json.",
    ),
    worst: int = typer.Option(20, min=0, help="Worst-predicted images in the report."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON instead of tables."),
) -> None:
    """Metrics of a batch-inference result against labels.csv: accuracy, per-class P/R/F1, confusion matrix
    (CSV + PNG), most-confused pairs and worst predictions; mAP and F1 at thresholds for multi-label."""
    from rayimgcls.results import ResultDirError

    if subset not in (None, "train", "validation", "test"):
        fail(f"--subset {subset!r}: allowed train, validation, test")
    with user_errors():
        from rayimgcls.evaluate import evaluate as run
        from rayimgcls.evaluate import format_report

        try:
            report = run(
                result_dir, data_root, subset=subset, model_dir=model_dir, tune_thresholds=tune_thresholds, worst=worst
            )
        except ResultDirError as e:
            fail(str(e))
    echo(json.dumps(report, indent=2) if as_json else format_report(report))
    from rayimgcls.report.html import file_url

    url = file_url(report["html"])  # None on object storage
    echo(f"report: {report['html']}" + (f"\n  open: {url}" if url else ""), err=as_json)


# ---------------------------------------------------------------------------------------------------------
# Demo


@app.command()
def demo(
    out_dir: str = typer.Option("rayimgcls-demo", help="Folder for the dataset, run, model and predictions."),
    num_images: int = typer.Option(1200, min=60, help="Images to generate."),
    num_epochs: int = typer.Option(15, min=1, help="Training epochs."),
    address: Optional[str] = typer.Option(None, help="Ray cluster; default a local Ray."),  # noqa: UP045
) -> None:
    """Make a small dataset, train a small ViT on the local Ray (CPU), run batch inference and evaluation,
    and print the accuracy, where everything is and how to serve the model. A few minutes on a laptop."""
    with user_errors():
        from rayimgcls.demo import run_demo
        from rayimgcls.train import TrainingError

        try:
            run_demo(out_dir, num_images, num_epochs, address)
        except TrainingError as e:
            fail(str(e), 1)


INTERRUPTED = 130


def main() -> None:
    try:
        app()
    except SystemExit as e:
        if e.code == INTERRUPTED:
            _leave_now()
        raise


def _leave_now() -> NoReturn:
    """After Ctrl-C: stop the Ray this process started and exit at once. Left to the interpreter, the exit
    waited 10-20 s on Ray Data's threads (measured on a 2-core machine); nothing is lost by not waiting,
    because every file rayimgcls writes is renamed into place whole (an interrupted inference resumes)."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(INTERRUPTED)


if __name__ == "__main__":
    main()
