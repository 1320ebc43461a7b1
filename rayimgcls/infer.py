"""Ray Data batch inference -> sharded JSON Lines (DESIGN §5).

Rows are read on the driver (only there is each record's CSV line known), decoded to uint8 by Ray Data CPU
tasks (`data.image_dataset`), and run through `Predictor` in an actor pool that also formats each line, so
the driver only routes finished strings into shards. Shard k always covers input positions
[k * rows_per_shard, (k + 1) * rows_per_shard), whatever order Ray finishes the rows in: a shard is written
under a temporary name once its last row arrived and then renamed, so a file named predictions-NNNNN.jsonl
is always complete and `--resume` can skip it.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import os
import re
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, BinaryIO

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pa_json

from rayimgcls import console, storage, telemetry
from rayimgcls.config import InferConfig
from rayimgcls.dataset import IMAGE_EXTENSIONS, DatasetError, Problem, read_csv, rows_fingerprint
from rayimgcls.images import PreprocessConfig
from rayimgcls.model import ModelCard, check_model_dir

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MERGED = "predictions.jsonl"
SHARD_GLOB = "predictions-*.jsonl"
TMP_SUFFIX = ".tmp"
# Everything rayimgcls writes into a result dir (evaluate's reports included), with the temporary names of
# storage.write_bytes (".name.tmp-PID") and of shards ("name.tmp"): what --overwrite may delete.
OWN_FILE = re.compile(
    r"\.?(predictions-\d{5,}\.jsonl|predictions\.jsonl|manifest\.json"
    r"|evaluation(-\w+)?\.json|confusion_matrix(-\w+)?\.(csv|png)|report(-\w+)?\.html|ray\.log)(\.tmp(-\d+)?)*"
)
CPU_ACTOR_CPUS = 0.5  # see plan_pool
ERROR_EXAMPLES = 5  # error lines the summary shows


def shard_name(index: int) -> str:
    return f"predictions-{index:05d}.jsonl"


class ResultDirError(ValueError):
    """A result directory that cannot be written (not empty, or not resumable) as asked."""


class PipelineError(RuntimeError):
    """The Ray pipeline failed (a model actor could not start, a node died ...); Ray logged the details."""


# ---------------------------------------------------------------------------------------------------------
# Inputs: a CSV (by default predictions.csv) or a folder / glob of images.


@dataclass(frozen=True)
class Inputs:
    """The rows to predict (`row`, `image_path`), the root their paths are relative to, and the manifest's
    description of them (which also decides whether a result dir can be resumed)."""

    frame: pd.DataFrame
    data_root: str
    description: dict


def read_inputs(cfg: InferConfig) -> Inputs:
    if cfg.images:
        return _image_inputs(cfg.images, cfg.data_root)
    required = ("image_path", "subset") if cfg.subset else ("image_path",)
    df = read_csv(cfg.data_root, cfg.csv, required)
    if cfg.subset:
        df = df[df["subset"] == cfg.subset]
        if df.empty:
            problem = Problem(cfg.csv, None, f"no rows with subset {cfg.subset!r}", "empty_subset")
            raise DatasetError([problem])
    # The labels' fingerprint lets evaluate say when it scores against labels edited since inference.
    labels = {"labels_sha256": rows_fingerprint(df["row"], df["label"])}
    return _inputs(
        df[["row", "image_path"]].reset_index(drop=True),
        cfg.data_root,
        {"kind": "csv", "data_root": cfg.data_root, "csv": cfg.csv, "subset": cfg.subset, **labels},
    )


def _inputs(frame: pd.DataFrame, root: str, description: dict) -> Inputs:
    """`sha256` fingerprints the (line, image_path) rows predicted: resume and evaluate compare it."""
    fingerprint = rows_fingerprint(frame["row"], frame["image_path"])
    return Inputs(frame, root, {**description, "rows": len(frame), "sha256": fingerprint})


def _image_inputs(pattern: str, data_root: str) -> Inputs:
    """Every image file in a folder (recursively, by extension) or every file a glob matches, sorted.
    `row` is the 1-based position in that list; `input` the path relative to data_root (when given, and a
    relative pattern is taken inside it) or else to the folder / the glob's fixed prefix."""
    if data_root and not storage.is_uri(pattern) and not pattern.startswith("/"):
        pattern = storage.join(data_root, pattern)
    base, glob = _split_glob(pattern)
    if glob:
        regex = glob_regex(glob)
        found = [p for p in storage.walk_files(base) if regex.match(p)]
    else:
        found = [p for p in storage.walk_files(base) if p.lower().endswith(IMAGE_EXTENSIONS)]
    if not found:
        what = "files matching" if glob else f"images ({', '.join(IMAGE_EXTENSIONS)}) in"
        raise DatasetError([Problem("--images", None, f"no {what} {pattern}", "no_images")])
    root = data_root or base
    prefix = _relative_prefix(root, base)
    frame = pd.DataFrame({"row": np.arange(1, len(found) + 1), "image_path": [prefix + p for p in found]})
    return _inputs(frame, root, {"kind": "images", "data_root": root, "images": pattern})


def _split_glob(pattern: str) -> tuple[str, str]:
    """'data/images/**/*.jpg' -> ('data/images', '**/*.jpg'); a plain folder -> (folder, '')."""
    parts = pattern.rstrip("/").split("/")
    fixed = next((i for i, p in enumerate(parts) if any(c in p for c in "*?[")), len(parts))
    return "/".join(parts[:fixed]) or ".", "/".join(parts[fixed:])


def _relative_prefix(root: str, base: str) -> str:
    """The path from `root` down to `base` ('' when equal), refusing a base outside root."""
    local = not storage.is_uri(root)
    root_n, base_n = (os.path.abspath(p) if local else p.rstrip("/") for p in (root, base))
    if base_n == root_n:
        return ""
    if not base_n.startswith(root_n.rstrip("/") + "/"):
        problem = Problem("--images", None, f"{base} lies outside the data root {root}", "path_escape")
        raise DatasetError([problem])
    return base_n[len(root_n.rstrip("/")) + 1 :] + "/"


def glob_regex(glob: str) -> re.Pattern[str]:
    """A shell glob over '/'-separated relative paths: `*`, `?` and `[...]` stay inside one folder, `**/`
    spans any number of folders (including none)."""
    out, i = [], 0
    while i < len(glob):
        if glob.startswith("**/", i):
            out.append("(?:[^/]+/)*")
            i += 3
        elif glob.startswith("**", i):
            out.append(".*")
            i += 2
        elif glob[i] in "*?":
            out.append("[^/]*" if glob[i] == "*" else "[^/]")
            i += 1
        elif glob[i] == "[" and (end := glob.find("]", i + 2)) > 0:
            body = glob[i + 1 : end]
            out.append("[" + ("^" + re.escape(body[1:]) if body[0] == "!" else re.escape(body)) + "]")
            i = end + 1
        else:
            out.append(re.escape(glob[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


# ---------------------------------------------------------------------------------------------------------
# Shards and the manifest


@dataclass(frozen=True)
class Shard:
    """Input positions [start, stop) and the CSV rows they are (first_row..last_row)."""

    index: int
    start: int
    stop: int
    first_row: int
    last_row: int

    @property
    def file(self) -> str:
        return shard_name(self.index)


def plan_shards(rows: np.ndarray, rows_per_shard: int) -> list[Shard]:
    """Consecutive fixed ranges of `rows_per_shard` input positions (the last one shorter)."""
    shards = []
    for k, start in enumerate(range(0, len(rows), rows_per_shard)):
        stop = min(start + rows_per_shard, len(rows))
        shards.append(Shard(k, start, stop, int(rows[start]), int(rows[stop - 1])))
    return shards


def effective_preprocess(cfg: InferConfig, card: ModelCard) -> PreprocessConfig:
    """The model's preprocessing, its pixel limit never above this run's --max-pixels."""
    return dataclasses.replace(card.preprocess, max_pixels=min(card.preprocess.max_pixels, cfg.max_pixels))


def build_manifest(cfg: InferConfig, card: ModelCard, inputs: Inputs, shards: list[Shard]) -> dict:
    """What the shards were computed from; `manifest_differences` compares it with a stored one, so
    `--resume` keeps shards only when they would come out the same: the weights' version, and also the
    kwargs and preprocessing config.json rebuilds them with (either changes every probability)."""
    return {
        "format": FORMAT_VERSION,
        "model": {
            "dir": cfg.model_dir,
            "name": card.model_name,
            "version": card.version,
            "kwargs": card.model_kwargs,
            "preprocess": effective_preprocess(cfg, card).to_dict(),
            "num_classes": card.num_classes,
            "multilabel": card.multilabel,
            "class_names": card.class_names,
            "thresholds": card.thresholds,
        },
        "input": inputs.description,
        "settings": {
            "precision": cfg.precision or card.precision,
            "top_k": cfg.top_k,
            "rows_per_shard": cfg.rows_per_shard,
        },
        "shards": [{"file": s.file, **asdict(s)} for s in shards],
        "complete": False,
    }


# Not compared on resume: a moved model directory holds the same model (its version says so), and labels
# edited since do not change a prediction.
RESUME_IGNORES = frozenset({("model", "dir"), ("input", "labels_sha256")})


def manifest_differences(old: dict, new: dict) -> list[str]:
    """Readable differences between a stored manifest and the run asked for (shards and summary aside); a
    mapping (the model's kwargs, its preprocessing) is compared key by key, so the difference shows."""
    out = []
    for section in ("model", "input", "settings"):
        before, after = old.get(section, {}), json.loads(json.dumps(new[section]))  # tuples as stored: lists
        for k in after:
            if before.get(k) == after[k] or (section, k) in RESUME_IGNORES:
                continue
            was, now = before.get(k), after[k]
            if isinstance(was, dict) and isinstance(now, dict):
                keys = sorted(set(was) | set(now), key=lambda x: (x not in now, str(x)))
                out += [
                    f"{section}.{k}.{j}: {_short(was.get(j))} -> {_short(now.get(j))}"
                    for j in keys
                    if was.get(j) != now.get(j)
                ]
            else:
                out.append(f"{section}.{k}: {_short(was)} -> {_short(now)}")
    return out


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 70 else text[:67] + "..."


def read_manifest(result_dir: str) -> dict:
    path = storage.join(result_dir, MANIFEST)
    if not storage.exists(path):
        raise ResultDirError(f"{result_dir}: no {MANIFEST} (run `rayimgcls infer` into it first)")
    try:
        manifest = json.loads(storage.read_text(path))
    except json.JSONDecodeError as e:
        raise ResultDirError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_VERSION:
        raise ResultDirError(f"{path}: not a rayimgcls manifest of format {FORMAT_VERSION}")
    return manifest


def write_manifest(result_dir: str, manifest: dict) -> None:
    storage.write_text(storage.join(result_dir, MANIFEST), json.dumps(manifest, indent=2) + "\n")


# The fields evaluate reads from a line; the others (top_k, labels) are skipped unconverted.
LINE_SCHEMA = pa.schema(
    [("input", pa.string()), ("row", pa.int64()), ("error", pa.string()), ("predictions", pa.list_(pa.float64()))]
)
_LINE_PARSE = pa_json.ParseOptions(explicit_schema=LINE_SCHEMA, unexpected_field_behavior="ignore")
BLOCK_BYTES = 4 << 20  # Arrow parses a shard in blocks of this (a block holds whole lines: see _block_bytes)


@dataclass(frozen=True)
class ShardLines:
    """One shard's lines as columns; `probs` holds the lines without an error, in order."""

    rows: np.ndarray  # int64, one per line
    inputs: list[str]
    errors: list[str]  # "" for a line with predictions
    probs: np.ndarray  # (lines without an error, classes) float64


def read_shards(result_dir: str, manifest: dict) -> Iterator[ShardLines]:
    """Every shard as columns, in input order, one shard in memory at a time. Refuses an incomplete result
    (a shard missing), a line that is not one of ours (naming the file and line) and a shard that does not
    hold exactly its planned rows."""
    files = set(storage.list_files(result_dir))
    missing = [s["file"] for s in manifest["shards"] if s["file"] not in files]
    if missing:
        raise ResultDirError(
            f"{result_dir}: {len(missing)} of {len(manifest['shards'])} shards missing "
            f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); "
            "finish the run with `rayimgcls infer ... --resume`"
        )
    num_classes = manifest["model"]["num_classes"]
    for shard in manifest["shards"]:
        path = storage.join(result_dir, shard["file"])
        with storage.open_input(path) as f:
            lines = parse_shard_fast(f, num_classes)
        lines = lines or parse_shard_lines(path, storage.read_bytes(path), num_classes)
        if problem := _planned_mismatch(lines.rows, shard):
            raise ResultDirError(f"{path}: {problem}; `rayimgcls infer ... --resume` computes it again")
        yield lines


class _LineCounter(io.RawIOBase):
    """A binary stream that counts the newlines Arrow reads through it and sees whether all was ASCII."""

    def __init__(self, f: BinaryIO) -> None:
        self.f, self.newlines, self.ascii = f, 0, True

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self.f.read(size)
        self.newlines += data.count(b"\n")
        self.ascii = self.ascii and data.isascii()
        return data


def parse_shard_fast(f: BinaryIO, num_classes: int) -> ShardLines | None:
    """A shard streamed through Arrow's JSON reader, block by block, with no Python step per line (3x
    json.loads, no float objects, a fraction of the shard in memory); None when it is not plainly lines as
    infer writes them, for `parse_shard_lines` to name what is wrong or read what Arrow refuses (non-ASCII
    text, say: json.dumps writes ASCII)."""
    counter = _LineCounter(f)
    options = pa_json.ReadOptions(block_size=_block_bytes(num_classes))
    try:
        table = pa_json.open_json(pa.PythonFile(counter, mode="r"), options, _LINE_PARSE).read_all()
    except pa.ArrowException:  # not JSON, a field of another type, a line longer than a block, an empty file
        return None
    if not counter.ascii or table.num_rows != counter.newlines:
        return None  # Arrow skips blank lines and reads two objects on one line
    if table["row"].null_count or table["input"].null_count:
        return None
    failed = pc.is_valid(table["error"]).to_numpy(zero_copy_only=False)
    predictions = table["predictions"].combine_chunks()
    if failed.any():
        if pc.any(pc.equal(table["error"], "")).as_py():
            return None
        predictions = predictions.filter(pa.array(~failed))
    if predictions.null_count or pc.any(pc.not_equal(pc.list_value_length(predictions), num_classes)).as_py():
        return None
    values = predictions.flatten()
    if values.null_count:
        return None
    return ShardLines(
        table["row"].to_numpy(),
        table["input"].to_pylist(),
        pc.fill_null(table["error"], "").to_pylist(),
        values.to_numpy().reshape(-1, num_classes),
    )


def _block_bytes(num_classes: int) -> int:
    """A block must hold the longest line: a probability is at most 24 characters as json.dumps writes it,
    a top-k entry some 60 plus its label (a longer line than this falls back to the line parser)."""
    return max(BLOCK_BYTES, 256 * num_classes + (1 << 20))


def parse_shard_lines(path: str, data: bytes, num_classes: int) -> ShardLines:
    """A shard parsed line by line with json: what `parse_shard_fast` reads, the same, and the first line
    that is not one of ours named (file:line) with what is wrong with it."""
    lines = storage.decode_text(data, path).split("\n")
    lines = lines[:-1] if not lines[-1] else lines
    rows, inputs, errors = [], [], []
    probs = np.empty((len(lines), num_classes), dtype=np.float64)
    predicted = 0
    for n, text in enumerate(lines, start=1):
        try:
            line = json.loads(text)
        except json.JSONDecodeError as e:
            raise ResultDirError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if problem := _line_problem(line, num_classes):
            raise ResultDirError(f"{path}:{n}: {problem}")
        rows.append(line["row"])
        inputs.append(line["input"])
        errors.append(line.get("error") or "")
        if not errors[-1]:
            probs[predicted] = line["predictions"]
            predicted += 1
    return ShardLines(np.array(rows, dtype=np.int64), inputs, errors, probs[:predicted])


def _line_problem(line: Any, num_classes: int) -> str | None:
    """What makes a parsed line other than a prediction or an error line as infer writes them (DESIGN §5)."""
    if not isinstance(line, dict):
        return "not a JSON object"
    row = line.get("row")
    if type(row) is not int or not -(2**63) <= row < 2**63:
        return 'no integer "row"'
    if not isinstance(line.get("input"), str):
        return f'row {row}: no string "input"'
    if line.get("error") is not None:
        return None if isinstance(line["error"], str) and line["error"] else f'row {row}: "error" is not a message'
    predictions = line.get("predictions")
    if (
        not isinstance(predictions, list)
        or len(predictions) != num_classes
        or not all(type(p) in (int, float) for p in predictions)
    ):
        return f'row {row}: "predictions" is not {num_classes} probabilities'
    return None


def _planned_mismatch(rows: np.ndarray, shard: dict) -> str | None:
    """Why a shard's rows are not the manifest's plan for it (how many, first and last); None when they are."""
    planned = shard["stop"] - shard["start"]
    if len(rows) != planned:
        return f"{len(rows)} lines where the manifest plans {planned} (rows {shard['first_row']}..{shard['last_row']})"
    if planned and (rows[0], rows[-1]) != (shard["first_row"], shard["last_row"]):
        return f"rows {rows[0]}..{rows[-1]} where the manifest plans {shard['first_row']}..{shard['last_row']}"
    return None


def prepare_result_dir(cfg: InferConfig, manifest: dict, rows: np.ndarray) -> set[int]:
    """Refuse a non-empty result dir unless --overwrite (delete our files, keep the rest) or --resume (keep
    the complete shards of an identical run that hold exactly their planned rows). Returns the indices of
    the shards to keep."""
    files = storage.list_files(cfg.result_dir)
    if not files:
        return set()
    if cfg.resume:
        return _resumable(cfg.result_dir, files, manifest, rows)
    if not cfg.overwrite:
        raise ResultDirError(
            f"{cfg.result_dir} is not empty ({len(files)} files, e.g. {files[0]}); "
            "--resume continues an interrupted run, --overwrite replaces our earlier output"
        )
    for name in files:
        if OWN_FILE.fullmatch(name):
            storage.delete_file(storage.join(cfg.result_dir, name))
    return set()


def _resumable(result_dir: str, files: list[str], manifest: dict, rows: np.ndarray) -> set[int]:
    if MANIFEST not in files:
        raise ResultDirError(f"{result_dir}: cannot resume, there is no {MANIFEST} (not our output?)")
    diffs = manifest_differences(read_manifest(result_dir), manifest)
    if diffs:
        raise ResultDirError(
            f"{result_dir}: cannot resume, the earlier run differs:\n  "
            + "\n  ".join(diffs)
            + "\n(--overwrite starts over)"
        )
    for name in files:  # partial shards and merged output of the interrupted run
        if OWN_FILE.fullmatch(name) and (name.endswith(TMP_SUFFIX) or ".tmp-" in name or name == MERGED):
            storage.delete_file(storage.join(result_dir, name))
    present, keep = set(files), set()
    for s in manifest["shards"]:
        if s["file"] not in present:
            continue
        problem = shard_mismatch(storage.read_bytes(storage.join(result_dir, s["file"])), rows[s["start"] : s["stop"]])
        if problem:
            logger.warning("%s: %s; computing it again", s["file"], problem)
            storage.delete_file(storage.join(result_dir, s["file"]))
        else:
            keep.add(s["index"])
    return keep


# The "row" key of a line as json.dumps writes it (prediction_line / error_line): after "{" or ", ", which
# inside a JSON string could only appear with the quote escaped.
_ROW_KEY = re.compile(rb'(?:^\{|, )"row": (-?\d+)[,}]')


def shard_mismatch(data: bytes, planned: np.ndarray) -> str | None:
    """Why a shard's bytes are not exactly one line per planned row, in order; None when they are."""
    lines = data.split(b"\n")
    if lines[-1]:
        return "the last line is cut short"
    found = []
    for n, line in enumerate(lines[:-1], start=1):
        keys = _ROW_KEY.findall(line)
        if len(keys) != 1:
            return f"line {n} is not one of our prediction lines"
        found.append(int(keys[0]))
    return _rows_mismatch(found, planned)


def _rows_mismatch(found: list[int], planned: np.ndarray) -> str | None:
    if found == planned.tolist():
        return None
    want, have = set(planned.tolist()), Counter(found)
    missing = sorted(want - set(have))
    extra = sorted(r for r in have if r not in want)
    doubled = sorted(r for r, c in have.items() if c > 1 and r in want)
    parts = [f"{len(found)} lines for {len(planned)} rows"]
    parts += [
        f"{what} row(s) {_few(rs)}"
        for what, rs in (("missing", missing), ("unplanned", extra), ("repeated", doubled))
        if rs
    ]
    return ", ".join(parts) if len(parts) > 1 else parts[0] + ", out of order"


def _few(rows: list[int]) -> str:
    return ", ".join(map(str, rows[:5])) + (f" (+{len(rows) - 5})" if len(rows) > 5 else "")


def check_complete(result_dir: str, shards: list[Shard]) -> None:
    """The end-of-run check: every planned shard is there (each was checked row by row as it was written)."""
    present = set(storage.list_files(result_dir))
    missing = [s.file for s in shards if s.file not in present]
    if missing:
        raise PipelineError(
            f"{result_dir}: {len(missing)} planned shard(s) missing after the run ({', '.join(missing[:3])}); "
            "re-run with --resume"
        )


class ShardWriter:
    """Collects lines by input row and writes each shard (temporary name, then rename) once every one of its
    planned rows has a line. Complete is counted by row number, not by lines: a row that came back twice (a
    retried Ray task) is kept once and can never stand in for a missing one."""

    def __init__(self, result_dir: str, shards: list[Shard], rows: np.ndarray, rows_per_shard: int) -> None:
        self.result_dir, self.shards, self.rows = result_dir, shards, rows
        self.rows_per_shard = rows_per_shard
        self.pending: dict[int, dict[int, str]] = {}

    def add(self, rows: np.ndarray, lines: np.ndarray) -> list[Shard]:
        """Route lines to their shards; return the shards this completed (and wrote)."""
        done = []
        position = np.searchsorted(self.rows, rows)
        for pos, row, line in zip(position, rows, lines, strict=True):
            if pos >= len(self.rows) or self.rows[pos] != row:
                raise PipelineError(f"the pipeline returned row {row}, which is not an input row (a bug)")
            k = int(pos) // self.rows_per_shard
            bucket = self.pending.setdefault(k, {})
            bucket.setdefault(int(row), line)
            shard = self.shards[k]
            if len(bucket) == shard.stop - shard.start:
                self._write(shard, self.pending.pop(k))
                done.append(shard)
        return done

    def _write(self, shard: Shard, lines: dict[int, str]) -> None:
        planned = self.rows[shard.start : shard.stop]
        found = sorted(lines)
        if problem := _rows_mismatch(found, planned):  # cannot happen by construction; cheap to make sure
            raise PipelineError(f"{shard.file}: {problem} (a bug)")
        final = storage.join(self.result_dir, shard.file)
        storage.write_text(final + TMP_SUFFIX, "".join(lines[r] + "\n" for r in found))
        storage.rename(final + TMP_SUFFIX, final)


def merge_shards(result_dir: str, shards: list[dict]) -> str:
    """predictions.jsonl = the shards in order, streamed (it may be larger than memory)."""
    path = storage.join(result_dir, MERGED)
    storage.write_chunks(path, (storage.read_bytes(storage.join(result_dir, s["file"])) for s in shards))
    return path


# ---------------------------------------------------------------------------------------------------------
# The model stage


def prediction_line(path: str, row: int, probs: np.ndarray, card: ModelCard, top_k: int) -> str:
    from rayimgcls.model import format_prediction

    return json.dumps({"input": path, **format_prediction(probs, card, top_k), "row": row})


def error_line(path: str, row: int, error: str) -> str:
    return json.dumps({"input": path, "row": row, "error": error})


class PredictLines:
    """Ray Data actor: decoded uint8 rows -> finished JSON lines. The model runs once per batch on the rows
    that decoded; the others become error lines, so no row is ever dropped."""

    def __init__(self, model_dir: str, device: str, precision: str | None, top_k: int, threads: int) -> None:
        import torch

        from rayimgcls.model import Predictor

        torch.set_num_threads(threads)  # Ray sets OMP_NUM_THREADS to the reserved CPUs; see plan_pool
        self.predictor = Predictor.from_dir(model_dir, device=device, precision=precision)
        self.top_k = top_k
        logger.info(
            "model actor ready: %s on %s, precision %s, %d threads",
            self.predictor.card.model_name,
            device,
            self.predictor.precision,
            threads,
        )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        errors, rows, paths = batch["error"], batch["row"], batch["image_path"]
        ok = np.flatnonzero(errors == "")
        lines = np.empty(len(rows), dtype=object)
        if len(ok):
            probs = self.predictor.predict_batch(batch["image"][ok])
            card = self.predictor.card
            for i, p in zip(ok, probs, strict=True):
                lines[i] = prediction_line(str(paths[i]), int(rows[i]), p, card, self.top_k)
        for i in np.flatnonzero(errors != ""):
            lines[i] = error_line(str(paths[i]), int(rows[i]), str(errors[i]))
        return {"row": np.asarray(rows, dtype=np.int64), "line": lines, "failed": errors != ""}


@dataclass(frozen=True)
class PoolPlan:
    """How the model stage is spread: actors, what each reserves, its torch threads, and the CPUs of a decode
    task."""

    actors: int
    cpus: float
    gpus: float
    threads: int
    decode_cpus: float = 1.0


def plan_pool(cfg: InferConfig) -> PoolPlan:
    """The pool for the cluster Ray is connected to; see size_pool."""

    from rayimgcls.runtime import check_resources, max_resources, node_cpus

    nodes = node_cpus()
    most = max_resources()  # an autoscaling cluster's maximum where it says it: an actor per GPU it can have
    pool = size_pool(cfg, nodes, gpus=most.get("GPU", 0.0), max_cpus=most.get("CPU", 0.0))
    check_resources("inference", cpus=pool.actors * pool.cpus, gpus=pool.actors * pool.gpus)
    return pool


def size_pool(cfg: InferConfig, nodes: list[float], gpus: float, max_cpus: float) -> PoolPlan:
    """With --use-gpu, as many actors as the cluster's GPUs hold at `gpus_per_actor` each (1: one per GPU;
    0.5: two share each GPU, which pays when one actor leaves the GPU idle between batches). On CPUs, by
    default one actor per node whose torch threads use all the node's cores while it reserves only
    CPU_ACTOR_CPUS. A matmul-bound model gains nothing from a second process on the same cores; the
    reservation only decides how many decode tasks run beside it. It must differ from a decode task's 1 CPU:
    with equal resource requests Ray Data fuses the decode into the actor (ray issue #54433), which
    serialises decoding with the model.

    Decoding must still find a CPU, or the pipeline waits forever: a CPU actor goes only on a node with room for
    a decode task beside it (nodes of one CPU decode), and on a lone one-CPU machine the decode tasks take the
    half CPU the actor leaves. `nodes`: the CPUs of each node now; `max_cpus`: what the cluster can scale to.
    """
    from rayimgcls.runtime import ResourceError

    cpus = cfg.cpus_per_actor or (1.0 if cfg.use_gpu else CPU_ACTOR_CPUS)
    gpu_share = (cfg.gpus_per_actor or 1.0) if cfg.use_gpu else 0.0
    roomy = [c for c in nodes if c >= cpus + 1.0]
    per_gpus = max(math.floor(gpus / gpu_share + 1e-9), 1) if cfg.use_gpu else 0  # 1e-9: 0.3 / 0.1 is 2.999...
    actors = cfg.num_actors or (per_gpus if cfg.use_gpu else max(len(roomy), 1))
    decode_cpus = min(1.0, max_cpus - actors * cpus)
    if decode_cpus <= 0:
        raise ResourceError(
            f"inference: {actors} model actor(s) of {cpus:g} CPU leave none of the cluster's "
            f"{max_cpus:g} CPUs to decode images with; use fewer --num-actors or --cpus-per-actor"
        )
    per_node = math.ceil(actors / max(len(roomy) or len(nodes), 1))
    threads = cfg.threads_per_actor or max(1, int(max(nodes, default=1)) // per_node)
    return PoolPlan(actors, cpus, gpu_share, threads, decode_cpus)


def predictions_dataset(frame: pd.DataFrame, data_root: str, card: ModelCard, cfg: InferConfig, pool: PoolPlan) -> Any:
    """Rows -> Ray Dataset of (`row`, `line`, `failed`): decode tasks, then the model actor pool."""
    import ray

    from rayimgcls.data import DecodeSpec, image_dataset

    spec = DecodeSpec(data_root, cfg.images or cfg.csv, effective_preprocess(cfg, card), on_error="keep")
    return image_dataset(frame, spec, num_cpus=pool.decode_cpus).map_batches(
        PredictLines,
        batch_size=cfg.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=pool.actors),
        fn_constructor_kwargs={
            "model_dir": cfg.model_dir,
            "device": "cuda" if cfg.use_gpu else "cpu",
            "precision": cfg.precision,
            "top_k": cfg.top_k,
            "threads": pool.threads,
        },
        num_cpus=pool.cpus,
        num_gpus=pool.gpus,
    )


# ---------------------------------------------------------------------------------------------------------
# The run


@dataclass
class InferSummary:
    """What a run did; printed by the CLI and stored in the manifest."""

    result_dir: str
    rows: int  # input rows in all
    computed: int  # rows predicted by this run (the rest were in kept shards)
    lines: int  # lines this run wrote
    errors: int  # error lines among them
    shards_written: int
    shards_kept: int
    seconds: float  # the pipeline's wall time (Ray's start excluded)
    startup_seconds: float = 0.0  # until the first lines came back: actor start, model load, first batch
    first_lines: int = 0  # lines in that first batch
    merged: str | None = None
    error_examples: list[str] = field(default_factory=list)

    @property
    def images_per_s(self) -> float:
        return self.computed / self.seconds if self.seconds > 0 else 0.0

    @property
    def steady_images_per_s(self) -> float:
        """The rate once the model actors run: what a long job approaches, start-up being a fixed cost
        (the plain rate when everything came back in one batch)."""
        if self.computed <= self.first_lines:
            return self.images_per_s
        return (self.computed - self.first_lines) / (self.seconds - self.startup_seconds)

    def record(self, lines: np.ndarray, failed: np.ndarray, shards: int, elapsed: float) -> None:
        """Count one batch of lines from the pipeline (`elapsed`: seconds since it started)."""
        if not self.first_lines:
            self.startup_seconds, self.first_lines = elapsed, len(lines)
        self.lines += len(lines)
        self.errors += int(failed.sum())
        self.error_examples += [str(x) for x in lines[failed]][: ERROR_EXAMPLES - len(self.error_examples)]
        self.shards_written += shards

    def to_dict(self) -> dict:
        return {
            **asdict(self),
            "images_per_s": round(self.images_per_s, 2),
            "steady_images_per_s": round(self.steady_images_per_s, 2),
        }

    def describe(self) -> str:
        """The final summary the CLI prints."""
        kept = f", {self.shards_kept} complete shard(s) kept from the earlier run" if self.shards_kept else ""
        out = [
            f"{self.rows} rows in: {self.computed} predicted -> {self.lines} lines ({self.errors} errors) "
            f"in {self.shards_written} shard(s){kept}"
        ]
        if self.computed:
            out.append(f"{self.images_per_s:.1f} images/s over {self.seconds:.1f} s")
        if self.computed > self.first_lines:
            out[-1] += (
                f" ({self.steady_images_per_s:.1f} images/s after the first "
                f"{self.startup_seconds:.1f} s of model start-up)"
            )
        out.append(
            f"results: {storage.join(self.result_dir, SHARD_GLOB)} and {MANIFEST}"
            + (f", merged into {self.merged}" if self.merged else "")
        )
        out += [f"  error line: {line}" for line in self.error_examples]
        return "\n".join(out)


class Progress:
    """Rows done of total, shards, errors, images/s and ETA on the driver (rayimgcls.console.RowsDisplay)."""

    def __init__(self, total: int, shards: int) -> None:
        from rayimgcls.console import RowsDisplay

        self.start = time.perf_counter()
        self.display = RowsDisplay(total, shards)

    def update(self, summary: InferSummary, written: list[Shard]) -> None:
        self.display.update(summary.lines, summary.shards_written + summary.shards_kept, summary.errors)

    def close(self) -> None:
        self.display.close()


def run_inference(cfg: InferConfig, address: str | None = None) -> InferSummary:
    """Predict every input row into `cfg.result_dir` (see the module docstring); returns the summary."""
    from rayimgcls.runtime import check_address, init_ray

    check_address(address)  # before the result dir is touched
    card = check_model_dir(cfg.model_dir)
    inputs = read_inputs(cfg)
    rows = inputs.frame["row"].to_numpy()
    shards = plan_shards(rows, cfg.rows_per_shard)
    manifest = build_manifest(cfg, card, inputs, shards)
    keep = prepare_result_dir(cfg, manifest, rows)
    storage.makedirs(cfg.result_dir)
    write_manifest(cfg.result_dir, manifest)
    todo = [s for s in shards if s.index not in keep]
    if keep:
        logger.info("resuming: %d of %d shards already complete", len(keep), len(shards))
    summary = InferSummary(
        cfg.result_dir,
        len(rows),
        computed=sum(s.stop - s.start for s in todo),
        lines=0,
        errors=0,
        shards_written=0,
        shards_kept=len(keep),
        seconds=0.0,
    )
    if todo:
        init_ray(address)
        start = time.perf_counter()  # Ray's own start-up is not the pipeline's speed
        frame = pd.concat([inputs.frame.iloc[s.start : s.stop] for s in todo], ignore_index=True)
        with console.ray_log(cfg.result_dir):
            _predict_into(frame, inputs, card, cfg, shards, rows, summary)
        summary.seconds = time.perf_counter() - start
    check_complete(cfg.result_dir, shards)
    if cfg.merge:
        summary.merged = merge_shards(cfg.result_dir, manifest["shards"])
    manifest.update(complete=True, summary=summary.to_dict())
    write_manifest(cfg.result_dir, manifest)
    return summary


def _predict_into(
    frame: pd.DataFrame,
    inputs: Inputs,
    card: ModelCard,
    cfg: InferConfig,
    shards: list[Shard],
    rows: np.ndarray,
    summary: InferSummary,
) -> None:
    import ray

    pool = plan_pool(cfg)
    logger.info(
        "predicting %d rows with %d model actor(s) (%g CPU, %g GPU, %d threads each), batch size %d",
        len(frame),
        pool.actors,
        pool.cpus,
        pool.gpus,
        pool.threads,
        cfg.batch_size,
    )
    writer = ShardWriter(cfg.result_dir, shards, rows, cfg.rows_per_shard)
    progress = Progress(len(frame), len(shards))
    run = telemetry.infer_run_id(cfg.result_dir, inputs.description["sha256"], card.version)
    logger.info("metrics label run=%s", run)
    ds = predictions_dataset(frame, inputs.data_root, card, cfg, pool)
    try:
        # prefetch_batches=0: with prefetching the iterator holds each block back until the next one
        # arrives, which delays every shard (and the progress) by a whole model batch.
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=0):
            written = writer.add(batch["row"], batch["line"])
            summary.record(batch["line"], batch["failed"], len(written), time.perf_counter() - progress.start)
            progress.update(summary, written)
            errors = [json.loads(line)["error"] for line in batch["line"][batch["failed"]]]
            rate = summary.lines / (time.perf_counter() - progress.start)
            telemetry.infer_progress(run, len(batch["line"]), errors, len(written), rate)
    except ray.exceptions.RayError as e:
        last = next((line for line in reversed(str(e).splitlines()) if line.strip()), type(e).__name__)
        raise PipelineError(
            f"inference stopped after {summary.shards_written} shards ({last.strip()}); "
            "complete shards are kept: fix the cause and re-run with --resume"
        ) from None
    finally:
        progress.close()
