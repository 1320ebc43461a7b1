"""The result directory of `rayimgcls infer` (DESIGN §5): its one reader and writer.

`manifest.json` (what was predicted with what, and the shard plan), `predictions-NNNNN.jsonl` shards of one
JSON line per input row (a prediction or an error), the optional merged `predictions.jsonl`, and the names of
everything else rayimgcls writes there. Shard k always covers input positions [k * rows_per_shard, (k + 1) *
rows_per_shard), whatever order Ray finishes the rows in: a shard is written under a temporary name once its
last row arrived and then renamed, so a file named predictions-NNNNN.jsonl is always complete and `--resume`
can skip it. Batch inference writes it (rayimgcls.infer), evaluation reads it (rayimgcls.evaluate).
"""

from __future__ import annotations

import io
import json
import logging
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pa_json

from rayimgcls import storage
from rayimgcls.card import ModelCard, format_prediction
from rayimgcls.config import InferConfig

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


def shard_name(index: int) -> str:
    return f"predictions-{index:05d}.jsonl"


class ResultDirError(ValueError):
    """A result directory that cannot be written (not empty, or not resumable) as asked."""


class PipelineError(RuntimeError):
    """The Ray pipeline failed (a model actor could not start, a node died ...); Ray logged the details."""


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


def prediction_line(path: str, row: int, probs: np.ndarray, card: ModelCard, top_k: int) -> str:
    return json.dumps({"input": path, **format_prediction(probs, card, top_k), "row": row})


def error_line(path: str, row: int, error: str) -> str:
    return json.dumps({"input": path, "row": row, "error": error})
