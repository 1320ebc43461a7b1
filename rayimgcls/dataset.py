"""labels.csv / predictions.csv: read, validate and report (no Ray, no torch).

Every problem carries the CSV's own line number (header = line 1) and the image path as written, so a user
can open the file at that line. Reading is done with the csv module because only it knows where a record
that spans lines (a quoted newline in `metadata`) starts.
"""

from __future__ import annotations

import csv
import difflib
import hashlib
import io
import json
import logging
import os
import posixpath
import random
import re
import shutil
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from rayimgcls import storage
from rayimgcls.images import DEFAULT_MAX_PIXELS, Augment, ImageError, PreprocessConfig, preprocess
from rayimgcls.text import printable

logger = logging.getLogger(__name__)

LABELS_CSV = "labels.csv"
PREDICTIONS_CSV = "predictions.csv"
CLASS_TO_IDX_JSON = "class_to_idx.json"
SUBSETS: tuple[str, ...] = ("train", "validation", "test")
MAX_CLASSES = 1000  # DESIGN §3: num_intended_classes 1..1000
MAX_LABEL = 10**9  # what parse_label reads any longer label as: far outside every class range


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a dataset, located as precisely as we can."""

    file: str
    line: int | None
    message: str
    code: str
    path: str | None = None

    def __str__(self) -> str:
        """One terminal-safe line: a path or message from a user's file may hold control characters."""
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        return printable(f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}")


class DatasetError(ValueError):
    """A dataset that cannot be used as it is; lists (up to 20 of) its problems."""

    def __init__(self, problems: Sequence[Problem], hint: str = "") -> None:
        self.problems = list(problems)
        shown = "\n".join(f"  {p}" for p in self.problems[:20])
        more = f"\n  ... and {len(self.problems) - 20} more" if len(self.problems) > 20 else ""
        super().__init__(f"{len(self.problems)} problem(s) in the dataset:\n{shown}{more}{hint}")


def read_csv(
    data_root: str,
    name: str = LABELS_CSV,
    required: Sequence[str] = ("image_path", "label", "subset"),
) -> pd.DataFrame:
    """Read a dataset CSV into a DataFrame of strings with a `row` column (the record's line in the file).

    Raises DatasetError for a missing or empty file, one that is not UTF-8, missing or repeated columns (with
    a did-you-mean) and every record the csv module cannot split as the header says: an unterminated quote,
    a field past the csv module's size limit, more fields than the header. A record is never cut or
    merged silently.
    """
    path = storage.join(data_root, name)
    if not storage.exists(path):
        raise DatasetError([Problem(name, None, f"not found at {path}", "missing_csv")])
    try:
        text = storage.read_text(path)
    except storage.TextEncodingError as e:
        raise DatasetError([Problem(name, e.line, e.message, "not_utf8")]) from None
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    header = _header(reader, name, required)
    records, lines, problems = [], [], []
    line = 2  # the line the next record starts on
    while True:
        try:
            rec = next(reader, None)
        except csv.Error as e:
            problems.append(Problem(name, line, _csv_error(e, line, reader.line_num), "malformed_csv"))
            break  # the csv module cannot tell where the next record starts
        if rec is None:
            break
        if len(rec) > len(header):
            extra = f"{len(rec)} fields, the header has {len(header)} (an unquoted comma?)"
            problems.append(Problem(name, line, extra, "too_many_fields"))
        elif rec and any(v.strip() for v in rec):
            spans = [h for h, v in zip(header, rec, strict=False) if "\n" in v and h != "metadata"]
            if spans:
                where = f"lines {line}-{reader.line_num}"
                message = f"field {spans[0]!r} spans {where}: a quote opened on line {line} and never closed?"
                problems.append(Problem(name, line, message, "malformed_csv"))
            records.append(rec + [""] * (len(header) - len(rec)))
            lines.append(line)
        line = reader.line_num + 1
    if problems:
        raise DatasetError(problems)
    if not records:
        raise DatasetError([Problem(name, None, "no data rows after the header", "empty_csv")])
    df = pd.DataFrame(records, columns=header, dtype=str)
    for col in ("image_path", "label", "subset", "metadata"):
        if col not in df:
            df[col] = ""
    df["image_path"] = df["image_path"].str.strip()
    df.insert(0, "row", lines)
    return df[["row", "image_path", "label", "subset", "metadata"]].reset_index(drop=True)


def _header(reader: Iterator[list[str]], name: str, required: Sequence[str]) -> list[str]:
    """The header's column names, refusing an empty header, a missing column and a repeated one."""
    try:
        header = next(reader, None)
    except csv.Error as e:
        raise DatasetError([Problem(name, 1, _csv_error(e, 1, 1), "malformed_csv")]) from None
    if header is None or not any(h.strip() for h in header):
        raise DatasetError([Problem(name, 1, "empty file: expected a header with " + ", ".join(required), "empty_csv")])
    header = [h.strip() for h in header]
    problems = [
        Problem(name, 1, f"column {col!r} appears {n} times in the header {header}", "duplicate_column")
        for col, n in Counter(header).items()
        if n > 1
    ]
    for col in (c for c in required if c not in header):
        close = difflib.get_close_matches(col, header, n=1, cutoff=0.6)
        hint = f" (found {close[0]!r}: misnamed?)" if close else ""
        problems.append(Problem(name, 1, f"missing column {col!r}{hint}; header is {header}", "missing_column"))
    if problems:
        raise DatasetError(problems)
    return header


def _csv_error(e: csv.Error, line: int, reached: int) -> str:
    """The csv module's complaint, said in terms of the file."""
    text = str(e)
    if "unexpected end of data" in text:
        return f"a quote opened on line {line} is never closed (it runs to the end of the file, line {reached})"
    if "field larger than field limit" in text:
        return (
            f"a field starting on line {line} runs past {csv.field_size_limit() // 1024} KiB (to line {reached}): "
            "an unclosed quote?"
        )
    return f'malformed quoting on line {reached}: {text} (a quote inside a field is written twice: "")'


_INTEGER = re.compile(r"-?[0-9]+")


def parse_label(text: str) -> list[int]:
    """'3' -> [3]; '1 4' -> [1, 4]. Raises ValueError with a readable reason."""
    tokens = text.split()
    if not tokens:
        raise ValueError("empty label")
    if not all(_INTEGER.fullmatch(t) for t in tokens):
        shown = text if len(text) <= 40 else text[:37] + "..."
        raise ValueError(f"label {shown!r} is not an integer class id (several ids are separated by spaces)")
    # Past MAX_CLASSES a label is refused anyway: compare digit counts first, so a 100,000-digit label costs
    # no big-integer work.
    return [int(t) if len(t.lstrip("-")) <= 9 else (-1 if t.startswith("-") else MAX_LABEL) for t in tokens]


def read_class_names(data_root: str) -> dict[str, int] | None:
    path = storage.join(data_root, CLASS_TO_IDX_JSON)
    if not storage.exists(path):
        return None
    try:
        mapping = json.loads(storage.read_text(path))
    except json.JSONDecodeError as e:
        problem = Problem(CLASS_TO_IDX_JSON, e.lineno, f"not valid JSON: {e.msg}", "bad_class_to_idx")
        raise DatasetError([problem]) from None
    if not isinstance(mapping, dict) or not all(isinstance(v, int) for v in mapping.values()):
        expected = 'expected {"class name": index, ...}'
        raise DatasetError([Problem(CLASS_TO_IDX_JSON, None, expected, "bad_class_to_idx")])
    if sorted(mapping.values()) != list(range(len(mapping))):
        raise DatasetError(
            [Problem(CLASS_TO_IDX_JSON, None, f"indices must be 0..{len(mapping) - 1}, each once", "bad_class_to_idx")]
        )
    return mapping


@dataclass(frozen=True)
class ClassInfo:
    num_classes: int
    names: list[str]
    source: str  # how num_classes was decided, for the log


def resolve_classes(data_root: str, labels: Iterable[list[int]], num_intended_classes: int | None = None) -> ClassInfo:
    """The class count: given > class_to_idx.json > largest label + 1 (SambaStudio's default of 257 would be
    wrong for almost everyone, so an unset value comes from the data)."""
    mapping = read_class_names(data_root)
    largest = max((max(ls) for ls in labels if ls), default=-1)
    if num_intended_classes is not None:
        n, source = num_intended_classes, f"num_intended_classes={num_intended_classes} (given)"
    elif mapping is not None:
        n, source = len(mapping), f"{_classes(len(mapping))} from {CLASS_TO_IDX_JSON}"
    else:
        n, source = largest + 1, f"{_classes(largest + 1)} from the largest label ({largest}) + 1"
        if largest < 0:  # no usable label at all: the label problems say why, with their lines
            n, source = 1, "1 class (no valid label found)"
    if not 1 <= n <= MAX_CLASSES:  # before a name is made per class
        problem = Problem(LABELS_CSV, None, f"{source}: allowed 1..{MAX_CLASSES} classes", "too_many_classes")
        raise DatasetError([problem])
    names = [str(i) for i in range(n)]
    if mapping is not None:
        for name, idx in mapping.items():
            if idx < n:
                names[idx] = name
    return ClassInfo(n, names, source)


def _classes(n: int) -> str:
    return f"{n} class{'es' if n != 1 else ''}"


def check_rows(
    df: pd.DataFrame,
    name: str,
    num_classes: int | None,
    multilabel: bool | None,
    need_labels: bool = True,
    flag_duplicates: bool = True,
) -> tuple[list[list[int]], list[Problem]]:
    """Check labels, subsets and duplicates of a parsed CSV; return the parsed labels and the problems."""
    problems: list[Problem] = []
    labels: list[list[int]] = []
    limit = MAX_CLASSES if num_classes is None else num_classes
    for row, path, label, subset in zip(df["row"], df["image_path"], df["label"], df["subset"], strict=True):
        if reason := path_problem(path):
            problems.append(Problem(name, row, reason, "empty_path" if not path else "bad_path", path))
        parsed: list[int] = []
        if need_labels:
            try:
                parsed = parse_label(label)
            except ValueError as e:
                problems.append(Problem(name, row, str(e), "bad_label", path))
            bad = [(t, x) for t, x in zip(label.split(), parsed, strict=False) if not 0 <= x < limit]
            if bad:
                text, value = bad[0]
                shown = text if len(text) <= 20 else text[:17] + "..."
                most = f" (at most {MAX_CLASSES} classes)" if value >= MAX_CLASSES else ""
                message = f"label {shown} outside [0, {limit - 1}]{most}"
                problems.append(Problem(name, row, message, "label_out_of_range", path))
                parsed = []
            if multilabel is False and len(parsed) > 1:
                problems.append(
                    Problem(name, row, f"{len(parsed)} labels {label!r} but multilabel is off", "multiple_labels", path)
                )
            if len(set(parsed)) != len(parsed):
                problems.append(Problem(name, row, f"label {label!r} repeats a class", "bad_label", path))
            if subset not in SUBSETS:
                problems.append(
                    Problem(
                        name,
                        row,
                        f"unknown subset {subset!r} (expected one of {', '.join(SUBSETS)})",
                        "unknown_subset",
                        path,
                    )
                )
        labels.append(parsed)
    if flag_duplicates:
        first_seen: dict[str, int] = {}
        for row, path in zip(df["row"], df["image_path"], strict=True):
            key = normalize_rel(path)
            if key in first_seen:
                problems.append(Problem(name, row, f"duplicate of line {first_seen[key]}", "duplicate_row", path))
            else:
                first_seen[key] = row
    return labels, problems


def path_problem(path: str) -> str | None:
    """Why an image_path cannot name a file before any file is looked at (empty, a control character)."""
    return "empty image_path" if not path else storage.control_character(path)


def rows_fingerprint(rows: Iterable[int], paths: Iterable[str]) -> str:
    """sha256 of the (line, image_path) pairs a run read: what infer stores and evaluate compares, so a CSV
    whose rows moved, appeared or vanished since inference is refused instead of joined to the wrong labels."""
    digest = hashlib.sha256()
    for row, path in zip(rows, paths, strict=True):
        digest.update(f"{row}\t{path}\n".encode())
    return digest.hexdigest()


def normalize_rel(path: str) -> str:
    """'./images/a.jpg' and 'images/a.jpg' name the same file."""
    return posixpath.normpath(path.replace("\\", "/")) if path else path


# The eval transform `validate` runs on every image when it has no model to take one from: what passes
# it passes training's and inference's transforms too (the resize is bounded for any shape; images.py).
CHECK_PREPROCESS = PreprocessConfig()


def load_image(data_root: str, rel: str, pre: PreprocessConfig, aug: Augment | None = None) -> np.ndarray:
    """Read `rel` under `data_root` and preprocess it to uint8 (3, S, S): the one path training, inference
    and `validate` take from a CSV row to pixels. Raises; `image_failure` says what for."""
    return preprocess(storage.read_bytes(storage.resolve_under(data_root, rel)), pre, aug)


def image_failure(e: Exception) -> tuple[str, str]:
    """(code, reason) for whatever `load_image` raised for one row. A failure we did not foresee is still
    that row's problem, not the whole job's: it is reported with its type, and logged with its traceback so
    a bug of ours stays visible."""
    if isinstance(e, ImageError | storage.PathEscapeError):
        return e.code, str(e)
    if isinstance(e, storage.StorageError):
        return "missing_file", "file not found" if e.missing else f"cannot read {e.path}: {e.reason}"
    if isinstance(e, OSError):
        return "missing_file", f"cannot read file: {e.strerror or e}"
    logger.warning("unexpected %s while loading an image", type(e).__name__, exc_info=e)
    return "unexpected_error", f"cannot load the image ({type(e).__name__}: {e})"


def check_image(
    data_root: str, rel: str, max_pixels: int = DEFAULT_MAX_PIXELS, pre: PreprocessConfig = CHECK_PREPROCESS
) -> tuple[str, str] | None:
    """(code, message) when the file at `rel` is not a usable image, else None: read, full decode and the
    eval transform, exactly as inference does."""
    try:
        load_image(data_root, rel, replace(pre, max_pixels=max_pixels))
    except Exception as e:  # noqa: BLE001 - every failure is this row's (image_failure)
        return image_failure(e)
    return None


def check_images(
    data_root: str, df: pd.DataFrame, name: str, max_pixels: int = DEFAULT_MAX_PIXELS, threads: int = 8
) -> list[Problem]:
    """Decode every image in a thread pool (PIL releases the GIL while decoding). For large datasets use
    `rayimgcls.data.check_images_on_ray`, which spreads the same check over the cluster."""
    paths = list(df["image_path"])
    with ThreadPoolExecutor(threads) as pool:  # a path check_rows already refuses is not opened
        results = list(pool.map(lambda p: None if path_problem(p) else check_image(data_root, p, max_pixels), paths))
    return [
        Problem(name, int(row), msg, code, path)
        for row, path, res in zip(df["row"], paths, results, strict=True)
        if res is not None
        for code, msg in [res]
    ]


@dataclass
class Report:
    """What `rayimgcls validate` prints: counts, the class decision and every problem."""

    data_root: str
    num_classes: int
    classes_source: str
    multilabel: bool
    rows: dict[str, int] = field(default_factory=dict)  # per CSV
    subsets: dict[str, int] = field(default_factory=dict)
    classes: dict[str, int] = field(default_factory=dict)  # class name -> images
    labels_per_image: dict[int, int] = field(default_factory=dict)  # multi-label cardinality histogram
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ok"] = self.ok
        return d


def summarize(
    data_root: str, df: pd.DataFrame, labels: list[list[int]], classes: ClassInfo, multilabel: bool
) -> Report:
    report = Report(data_root, classes.num_classes, classes.source, multilabel)
    report.subsets = dict(Counter(df["subset"]))
    counts = Counter(c for ls in labels for c in ls)
    report.classes = {
        classes.names[c] if c < len(classes.names) else str(c): counts[c]
        for c in sorted(set(range(classes.num_classes)) | set(counts))
    }
    report.labels_per_image = dict(sorted(Counter(len(ls) for ls in labels).items()))
    return report


ImageChecker = Callable[[str, pd.DataFrame, str, int], list[Problem]]


def validate(
    data_root: str,
    num_intended_classes: int | None = None,
    multilabel: bool | None = None,
    images: bool = True,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    image_checker: ImageChecker = check_images,
) -> Report:
    """Check labels.csv (and predictions.csv when present) and report every problem.

    `multilabel=None` infers it (any row with several labels); `image_checker` decodes every image
    (threads here, `rayimgcls.data.check_images_on_ray` on a cluster).
    """
    df = read_csv(data_root, LABELS_CSV)
    raw_labels, _ = check_rows(df, LABELS_CSV, None, None, flag_duplicates=False)
    if multilabel is None:
        multilabel = any(len(ls) > 1 for ls in raw_labels)
    classes = resolve_classes(data_root, raw_labels, num_intended_classes)
    labels, problems = check_rows(df, LABELS_CSV, classes.num_classes, multilabel)
    if images:
        problems += image_checker(data_root, df, LABELS_CSV, max_pixels)
    report = summarize(data_root, df, labels, classes, multilabel)
    report.rows[LABELS_CSV] = len(df)
    if storage.exists(storage.join(data_root, PREDICTIONS_CSV)):
        try:
            pred = read_csv(data_root, PREDICTIONS_CSV, required=("image_path",))
        except DatasetError as e:
            problems += e.problems
        else:
            report.rows[PREDICTIONS_CSV] = len(pred)
            problems += check_rows(pred, PREDICTIONS_CSV, None, None, need_labels=False, flag_duplicates=False)[1]
            if images:
                problems += image_checker(data_root, pred, PREDICTIONS_CSV, max_pixels)
    report.problems = sorted(problems, key=lambda p: (p.file, p.line or 0))
    return report


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def from_folders(
    src: str, out: str, split: tuple[float, float, float] = (0.8, 0.1, 0.1), seed: int = 0
) -> pd.DataFrame:
    """Turn a class-per-folder tree (torchvision's ImageFolder layout) into labels.csv + class_to_idx.json.

    Classes are the sorted sub-folder names (ImageFolder's order). With `out` == `src` the CSV is written into
    the tree; otherwise the images are hard-linked (copied across filesystems) to `out/images/<class>/`, so
    every path stays inside the data root. Each class is split by `split` with a seeded shuffle.
    """
    src_p, out_p = Path(src).resolve(), Path(out).resolve()
    classes = sorted(d.name for d in src_p.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DatasetError([Problem(str(src_p), None, "no class sub-folders found", "no_classes")])
    rng = random.Random(seed)
    rows = []
    for idx, cls in enumerate(classes):
        files = sorted(p for p in (src_p / cls).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        rng.shuffle(files)
        n_val, n_test = round(split[1] * len(files)), round(split[2] * len(files))
        for j, f in enumerate(files):
            subset = "validation" if j < n_val else "test" if j < n_val + n_test else "train"
            if out_p == src_p:
                rel = f.relative_to(src_p).as_posix()
            else:
                rel = (Path("images") / f.relative_to(src_p)).as_posix()
                dst = out_p / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                if not dst.exists():
                    try:
                        os.link(f, dst)
                    except OSError:
                        shutil.copy2(f, dst)
            rows.append({"image_path": rel, "label": str(idx), "subset": subset, "metadata": ""})
    out_p.mkdir(parents=True, exist_ok=True)
    df = pd.DataFrame(rows, columns=["image_path", "label", "subset", "metadata"])
    df.to_csv(out_p / LABELS_CSV, index=False)
    (out_p / CLASS_TO_IDX_JSON).write_text(json.dumps({c: i for i, c in enumerate(classes)}, indent=2) + "\n")
    return df
