"""The terminal: what train, infer, demo and serve print, and what they keep quiet.

By default a command shows its own progress and results and nothing of Ray's: Ray's Python loggers write to a
file (ray.log in the run or result directory, beside Ray's session log folder) instead of the terminal, the
workers' output is not forwarded (log_to_driver=False), and the driver's file descriptor 2, where Ray's C++ core
writes (core_worker.cc, rpc_client.h: it logs them to the session folder too), goes to a file while Python's
sys.stderr (our warnings, errors and tracebacks) stays on the terminal. RAY_BACKEND_LOG_LEVEL is no lever for
this: setting it prints a line of its own, and core_worker.cc logs at ERROR on healthy runs (an actor pool's
constructor arguments), so only "fatal" would hide them, from the session's log files too.
The progress therefore comes from the workers through Ray itself: rank 0 sends its steps to a `Mailbox` actor
that the driver drains, never by parsing log lines. `--verbose` (or RAYIMGCLS_VERBOSE=1) brings Ray's output
back.

On a terminal each stage is one live rich progress bar; elsewhere (CI, `ray job submit` logs, a pipe) the same
facts come as plain timestamped lines, one per tenth of the run (of its steps, or of the rows) and one per
epoch, with no control characters: a long run's log stays readable.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rayimgcls.text import printable

VERBOSE_ENV = "RAYIMGCLS_VERBOSE"
RAY_LOG_FILE = "ray.log"
RAY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "ray.serve")
POLL_S = 0.3  # how often the driver drains the mailbox
SEND_S = 0.25  # a worker sends a step at most this often (and the last step of each epoch)
TENTHS = 10  # plain lines per epoch / per inference run


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0", "false", "no")


def set_verbose(on: bool) -> None:
    """--verbose: in the environment, so that Ray's workers (which inherit it) see it too."""
    if on:
        os.environ[VERBOSE_ENV] = "1"


def is_terminal() -> bool:
    return sys.stdout.isatty() and os.environ.get("TERM") != "dumb"


def setup_logging() -> None:
    """Our own log lines: warnings and errors on stderr, in plain words; everything at --verbose."""
    handler = _Stderr()
    handler.setFormatter(
        logging.Formatter(
            "%(asctime)s %(levelname)s %(name)s: %(message)s" if verbose() else "%(levelname)s: %(message)s",
            datefmt="%H:%M:%S",
        )
    )
    logging.basicConfig(level=logging.INFO if verbose() else logging.WARNING, handlers=[handler])
    if not verbose():
        logging.getLogger("rayimgcls.serve").setLevel(logging.INFO)  # where `serve` listens, and when it stops


class _Stderr(logging.StreamHandler):
    """A handler that writes to whatever sys.stderr is when a record comes (see detach_stderr)."""

    def __init__(self) -> None:
        super().__init__()

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


# ---------------------------------------------------------------------------------------------------------
# Ray's own output


def ray_init_options() -> dict[str, Any]:
    """ray.init keyword arguments, and the environment Ray's processes start with (a local Ray's raylet and
    workers inherit it), for the quiet default; {} at --verbose."""
    if verbose():
        return {}
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
    quiet_ray_loggers()
    detach_stderr()
    return {"log_to_driver": False, "logging_level": logging.INFO}  # INFO: ray.log gets it, not the terminal


def detach_stderr() -> str | None:
    """Point file descriptor 2 (Ray's C++ core writes there) at a file and keep sys.stderr on the terminal,
    through a duplicate of the old descriptor. Once per process; not where sys.stderr is not fd 2 (a test's
    capture)."""
    global _DETACHED
    try:
        if _DETACHED or sys.stderr.fileno() != 2:
            return _DETACHED
    except (AttributeError, OSError, ValueError):  # a captured stream has no descriptor
        return None
    import tempfile

    path = os.path.join(tempfile.gettempdir(), f"rayimgcls-{os.getpid()}-stderr.log")
    sys.stderr.flush()
    terminal = os.fdopen(os.dup(2), "w", buffering=1, encoding=sys.stderr.encoding, errors="backslashreplace")
    with open(path, "ab") as f:
        os.dup2(f.fileno(), 2)
    sys.stderr = terminal
    _DETACHED = path
    return path


_DETACHED: str | None = None


def quiet_ray_loggers() -> None:
    """Ray's console handlers show errors only (their records still reach ray.log and Ray's session folder)."""
    import ray  # noqa: F401 - configures the "ray" logger
    import ray.data  # noqa: F401 - configures "ray.data"

    for name in RAY_LOGGERS:
        for handler in logging.getLogger(name).handlers:
            if not isinstance(handler, logging.FileHandler):
                handler.setLevel(logging.ERROR)


@contextmanager
def ray_log(directory: str) -> Iterator[str | None]:
    """Ray's Python log records also go to <directory>/ray.log while the block runs (local directories only).
    The handler goes when the block ends: a process that runs many commands (a notebook, the tests) must not
    keep writing every later run's records into the first one's file."""
    from rayimgcls import storage

    if storage.is_uri(directory):
        yield None
        return
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, RAY_LOG_FILE)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(filename)s:%(lineno)s %(message)s"))
    handler.setLevel(logging.INFO)
    for name in RAY_LOGGERS:
        logging.getLogger(name).addHandler(handler)
    try:
        yield path
    finally:
        for name in RAY_LOGGERS:
            logging.getLogger(name).removeHandler(handler)
        handler.close()


# ---------------------------------------------------------------------------------------------------------
# Workers -> driver


def mailbox() -> Any:
    """An actor the workers send progress to and the driver drains (0 CPUs: it never waits for a slot)."""
    import ray

    @ray.remote(num_cpus=0, max_concurrency=4)
    class Mailbox:
        def __init__(self) -> None:
            self.items: list[tuple[str, dict]] = []

        def put(self, kind: str, record: dict) -> None:
            if kind == "step" and len(self.items) > 10_000:  # a driver that stopped draining: bounded
                return
            self.items.append((kind, record))

        def take(self) -> list[tuple[str, dict]]:
            out, self.items = self.items, []
            return out

    return Mailbox.remote()


class WorkerProgress:
    """Rank 0's side: steps (throttled), epochs and notes to the mailbox; one call per event, fire and forget."""

    def __init__(self, box: Any, steps_per_epoch: int, total_epochs: int) -> None:
        self.box, self.steps_per_epoch, self.total_epochs = box, steps_per_epoch, total_epochs
        self.sent, self.images, self.wait, self.since = 0.0, 0, 0.0, time.perf_counter()
        if box is not None:
            _ForwardWarnings.to(self)

    def step(self, epoch: int, step: int, global_step: int, loss: float, lr: float, images: int, wait: float) -> None:
        self.images, self.wait = self.images + images, self.wait + wait
        now = time.perf_counter()
        if now - self.sent < SEND_S and step != self.steps_per_epoch:
            return
        elapsed = max(now - self.since, 1e-9)
        record = {
            "epoch": epoch,
            "epochs": self.total_epochs,
            "step": step,
            "steps": self.steps_per_epoch,
            "global_step": global_step,
            "loss": loss,
            "lr": lr,
            "images_per_s": self.images / elapsed,
            "data_wait": self.wait / elapsed,
        }
        self.sent, self.images, self.wait, self.since = now, 0, 0.0, now
        self._put("step", record)

    def epoch(self, metrics: dict) -> None:
        self._put("epoch", metrics)

    def note(self, message: str) -> None:
        self._put("note", {"message": message})

    def _put(self, kind: str, record: dict) -> None:
        if self.box is None:  # no driver console (a test calling the loop): the worker's stdout
            sys.__stdout__.write(f"{kind}: {record}\n")
            return
        self.box.put.remote(kind, record)


class _ForwardWarnings(logging.Handler):
    """Our warnings on rank 0 (a tracking server gone, ...) reach the user as notes: its output is not forwarded."""

    def __init__(self, progress: WorkerProgress) -> None:
        super().__init__(logging.WARNING)
        self.progress = progress

    @classmethod
    def to(cls, progress: WorkerProgress) -> None:
        logger = logging.getLogger("rayimgcls")
        for handler in logger.handlers:
            if isinstance(handler, cls):  # one per process: a new attempt's progress replaces the old
                handler.progress = progress
                return
        logger.addHandler(cls(progress))

    def emit(self, record: logging.LogRecord) -> None:
        self.progress.note(f"{record.levelname.lower()}: {record.getMessage()}")


# ---------------------------------------------------------------------------------------------------------
# The driver's display


def stamp() -> str:
    return time.strftime("%H:%M:%S")


def plain(message: str) -> None:
    """One line for a log reader: timestamped, control characters escaped."""
    print(f"{stamp()} {printable(message)}", flush=True)


def duration(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "?"
    seconds = int(seconds)
    return (
        f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
        if seconds >= 3600
        else (f"{seconds // 60}:{seconds % 60:02d}")
    )


EPOCH_KEYS = ("train_loss", "val_loss", "top1", "top5", "macro_f1", "map", "micro_f1")


def epoch_row(metrics: dict, seconds: float | None) -> str:
    """One compact line per finished epoch."""
    shown = "  ".join(f"{k} {metrics[k]:.4f}" for k in EPOCH_KEYS if k in metrics)
    if "weights" in metrics:  # --model-ema: the figures are those of the better weights
        shown += f"  ({metrics['weights']} weights)"
    return f"epoch {metrics['epoch']:>3}/{metrics.get('epochs', '?')}  {shown}  ({duration(seconds)})"


class TrainDisplay:
    """Training progress on the driver: a live bar on a terminal, plain lines at every tenth of the run
    elsewhere; one row per epoch either way."""

    def __init__(self, total_epochs: int, steps_per_epoch: int) -> None:
        self.total_epochs, self.steps_per_epoch = total_epochs, steps_per_epoch
        self.live = is_terminal()
        self.started = self.epoch_started = time.perf_counter()
        self.first_step: int | None = None  # global step of the first update (a resumed run starts late)
        self.tenth = -1
        self.bar: Any = None
        self.task: Any = None

    def __enter__(self) -> TrainDisplay:
        if self.live:
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                TextColumn("{task.fields[facts]}"),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                transient=True,
            )
            self.bar.start()
            self.task = self.bar.add_task("training", total=self.total_epochs * self.steps_per_epoch, facts="")
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.stop()

    def handle(self, kind: str, record: dict) -> None:
        if kind == "step":
            self._step(record)
        elif kind == "epoch":
            seconds = time.perf_counter() - self.epoch_started
            self.epoch_started = time.perf_counter()
            self._print(epoch_row({**record, "epochs": self.total_epochs}, seconds))
        else:
            self._print(record["message"])

    def _step(self, r: dict) -> None:
        total = self.total_epochs * self.steps_per_epoch
        if self.first_step is None:
            self.first_step, self.started = r["global_step"], time.perf_counter()  # a rate needs two points
        done = r["global_step"] - self.first_step
        rate = done / max(time.perf_counter() - self.started, 1e-9)
        eta = (total - r["global_step"]) / rate if rate else None
        facts = (
            f"loss {r['loss']:.4f}  lr {r['lr']:.2e}  {r['images_per_s']:.0f} img/s  "
            f"data-wait {100 * r['data_wait']:.0f}%"
        )
        where = f"epoch {r['epoch']}/{r['epochs']} step {r['step']}/{r['steps']}"
        if self.bar is not None:
            self.bar.update(self.task, completed=r["global_step"], description=where, facts=facts)
            return
        tenth = TENTHS * r["global_step"] // total
        if tenth > self.tenth and r["step"] < r["steps"]:  # an epoch's end is its row
            self.tenth = tenth
            plain(f"{where} ({100 * r['global_step'] // total}% of the run)  {facts}  ETA {duration(eta)}")

    def _print(self, message: str) -> None:
        if self.bar is not None:
            self.bar.console.print(message, markup=False, highlight=False)
        else:
            plain(message)


@contextmanager
def train_progress(box: Any, total_epochs: int, steps_per_epoch: int) -> Iterator[None]:
    """Show what rank 0 sends to `box` while the body (Ray Train's fit) runs."""
    import ray

    stop = threading.Event()
    with TrainDisplay(total_epochs, steps_per_epoch) as display:

        def drain() -> None:
            for kind, record in ray.get(box.take.remote()):
                display.handle(kind, record)

        def poll() -> None:
            while not stop.wait(POLL_S):
                try:
                    drain()
                except Exception:  # noqa: BLE001 - the actor went with the cluster: nothing more to show
                    return

        thread = threading.Thread(target=poll, name="rayimgcls-progress", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            with contextlib.suppress(Exception):  # the cluster went first
                drain()  # what came after the last poll


class RowsDisplay:
    """Batch-inference progress: rows done of total, shards written, errors, images/s, ETA."""

    def __init__(self, total: int, shards: int) -> None:
        self.total, self.shards = total, shards
        self.start = time.perf_counter()
        self.tenth = -1
        self.bar: Any = None
        if is_terminal():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("[bold]inference"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[facts]}"),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                transient=True,
            )
            self.bar.start()
            self.task = self.bar.add_task("inference", total=total, facts="")

    def update(self, rows: int, shards_done: int, errors: int) -> None:
        rate = rows / max(time.perf_counter() - self.start, 1e-9)
        facts = f"{shards_done}/{self.shards} shards  {errors} errors  {rate:.0f} img/s"
        if self.bar is not None:
            self.bar.update(self.task, completed=rows, facts=facts)
            return
        tenth = TENTHS * rows // max(self.total, 1)
        if tenth > self.tenth:
            self.tenth = tenth
            eta = (self.total - rows) / rate if rate else None
            plain(
                f"inference {rows}/{self.total} rows ({100 * rows // max(self.total, 1)}%)  {facts}  "
                f"ETA {duration(eta)}"
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
