"""The result directory's format (rayimgcls.results): the shard plan, the writer, and reading shards back
(evaluate's input), where Arrow's parse must agree with json's and the line parser names a bad line."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import NUM_CLASSES

from rayimgcls.model import Predictor
from rayimgcls.results import (
    PipelineError,
    ResultDirError,
    ShardWriter,
    error_line,
    parse_shard_fast,
    parse_shard_lines,
    plan_shards,
    prediction_line,
    read_shards,
)


def test_plan_shards_fixed_ranges() -> None:
    rows = np.array([2, 3, 5, 8, 9, 12, 13])
    shards = plan_shards(rows, 3)
    assert [(s.start, s.stop, s.first_row, s.last_row) for s in shards] == [(0, 3, 2, 5), (3, 6, 8, 12), (6, 7, 13, 13)]
    assert [s.file for s in shards] == [f"predictions-0000{k}.jsonl" for k in range(3)]


def test_shard_writer_counts_rows_not_lines(tmp_path) -> None:
    """A row that comes back twice (a retried task) must not stand in for a missing one."""

    rows = np.array([2, 3, 4, 5])
    writer = ShardWriter(str(tmp_path), plan_shards(rows, 2), rows, 2)
    assert writer.add(np.array([2, 2]), np.array(['{"row": 2}', '{"row": 2}'], dtype=object)) == []
    assert not list(tmp_path.iterdir())
    assert [s.index for s in writer.add(np.array([3, 5, 4]), np.array(['{"row": 3}', "5", "4"], dtype=object))] == [
        0,
        1,
    ]
    assert (tmp_path / "predictions-00000.jsonl").read_text() == '{"row": 2}\n{"row": 3}\n'
    with pytest.raises(PipelineError, match="row 9, which is not an input row"):
        writer.add(np.array([9]), np.array(["x"], dtype=object))


# ---------------------------------------------------------------------------------------------------------
# Reading shards back (evaluate's input): Arrow's parse agrees with json's, and the line parser names the line


@pytest.fixture(scope="module")
def shard_lines(model_dir, multilabel_model_dir, shapes_root) -> dict[str, tuple[list[str], int]]:
    """Shard texts as infer writes them (its own prediction_line / error_line, real probabilities), by case."""

    out = {}
    images = sorted((shapes_root / "images").iterdir())[:4]
    for kind, directory in (("multiclass", model_dir), ("multilabel", multilabel_model_dir)):
        predictor = Predictor.from_dir(directory)
        probs = predictor.predict_batch(np.stack([predictor.preprocess(p) for p in images]))
        lines = [prediction_line(f"images/{p.name}", 2 + i, probs[i], predictor.card, 5) for i, p in enumerate(images)]
        lines.insert(2, error_line('images/"odd", name.jpg', 9, "cannot identify image file"))
        out[kind] = lines, predictor.card.num_classes
    out["errors only"] = [error_line(f"x{i}.jpg", i, f"missing file {i}") for i in range(3)], NUM_CLASSES
    out["empty"] = [], NUM_CLASSES
    return out


def write_shard(out: Path, lines: list[str], text: str | None = None) -> tuple[Path, dict]:
    """One shard file plus the manifest fields `read_shards` checks it against."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "predictions-00000.jsonl"
    path.write_text("".join(x + "\n" for x in lines) if text is None else text, encoding="utf-8")
    rows = [json.loads(x)["row"] for x in lines]
    shard = {"file": path.name, "index": 0, "start": 0, "stop": len(rows)}
    shard |= {"first_row": rows[0] if rows else 0, "last_row": rows[-1] if rows else 0}
    return path, {"model": {"num_classes": NUM_CLASSES}, "shards": [shard]}


@pytest.mark.parametrize("case", ["multiclass", "multilabel", "errors only", "empty"])
def test_arrow_and_line_parsers_agree(shard_lines, case: str) -> None:

    lines, num_classes = shard_lines[case]
    data = "".join(x + "\n" for x in lines).encode()
    fast, slow = parse_shard_fast(io.BytesIO(data), num_classes), parse_shard_lines("p.jsonl", data, num_classes)
    assert (fast is None) == (case == "empty")  # Arrow refuses an empty file: the line parser reads it
    fast = fast or slow
    assert fast.rows.dtype == slow.rows.dtype == np.int64 and fast.rows.tolist() == slow.rows.tolist()
    assert fast.inputs == slow.inputs and fast.errors == slow.errors
    assert fast.probs.shape == slow.probs.shape == (len(lines) - sum('"error"' in x for x in lines), num_classes)
    assert fast.probs.tobytes() == slow.probs.tobytes()  # bit for bit, not close
    if lines:
        want = [json.loads(x) for x in lines]
        assert slow.errors == [x.get("error", "") for x in want]
        assert slow.probs.tolist() == [x["predictions"] for x in want if "error" not in x]


def _edit(lines: list[str], n: int, fn) -> list[str]:
    """Line n (1-based) replaced by fn(its dict) dumped, or by fn's string."""
    new = fn(json.loads(lines[n - 1]))
    return lines[: n - 1] + [new if isinstance(new, str) else json.dumps(new)] + lines[n:]


BAD_LINES = {  # how line 2 is broken -> what the message says after "predictions-00000.jsonl:2: "
    "not json": (lambda x: '{"input": "b.jpg", "row": 3', "not valid JSON"),
    "not an object": (lambda x: "[1, 2]", "not a JSON object"),
    "short": (lambda x: x | {"predictions": x["predictions"][:-1]}, 'row 3: "predictions" is not 4 probabilities'),
    "a string in it": (lambda x: x | {"predictions": ["0.5"] * 4}, "is not 4 probabilities"),
    "a null in it": (lambda x: x | {"predictions": [None] * 4}, "is not 4 probabilities"),
    "a bool in it": (lambda x: x | {"predictions": [True] * 4}, "is not 4 probabilities"),
    "no predictions": (lambda x: {"input": x["input"], "row": 3}, "is not 4 probabilities"),
    "row missing": (lambda x: {k: v for k, v in x.items() if k != "row"}, 'no integer "row"'),
    "row a float": (lambda x: x | {"row": 3.0}, 'no integer "row"'),
    "input missing": (lambda x: {k: v for k, v in x.items() if k != "input"}, 'row 3: no string "input"'),
    "empty error": (lambda x: {"input": x["input"], "row": 3, "error": ""}, '"error" is not a message'),
    "blank line": (lambda x: "", "not valid JSON"),
    "two on one line": (lambda x: json.dumps(x) + json.dumps(x), "not valid JSON"),
}


@pytest.mark.parametrize("case", list(BAD_LINES))
def test_a_bad_line_is_named_by_file_and_line(shard_lines, tmp_path, case: str) -> None:
    """Arrow's parse is not trusted with these: it gives up (or its checks fail) and the line parser names
    the line. Some of them Arrow would read (a blank line, two objects on a line, a row without predictions)."""

    lines, _ = shard_lines["multiclass"]
    lines = [json.dumps(json.loads(x) | {"row": 2 + i}) for i, x in enumerate(lines)]  # rows 2..6
    edit, message = BAD_LINES[case]
    bad = _edit(lines, 2, edit)
    path, manifest = write_shard(tmp_path, lines, "".join(x + "\n" for x in bad))
    assert parse_shard_fast(io.BytesIO(path.read_bytes()), NUM_CLASSES) is None
    with pytest.raises(ResultDirError) as e:
        list(read_shards(str(tmp_path), manifest))
    assert str(e.value).startswith(f"{path}:2: ") and message in str(e.value)


def test_shards_on_s3_are_streamed_the_same(shard_lines, s3, tmp_path) -> None:
    from rayimgcls import storage

    lines, _ = shard_lines["multiclass"]
    path, manifest = write_shard(tmp_path / "out", lines)
    (local,) = read_shards(str(tmp_path / "out"), manifest)
    uri = s3.upload(tmp_path / "out", "result")
    (remote,) = read_shards(uri, manifest)
    with storage.open_input(f"{uri}/{path.name}") as f:
        assert parse_shard_fast(f, NUM_CLASSES) is not None  # through Arrow, not the fallback
    assert remote.rows.tolist() == local.rows.tolist() and remote.inputs == local.inputs
    assert remote.errors == local.errors and remote.probs.tobytes() == local.probs.tobytes()


def test_unusual_but_valid_shards_read_as_json_reads_them(shard_lines, tmp_path) -> None:
    """What Arrow refuses or infer never writes, but JSON allows, is read, not refused: non-ASCII text,
    integer probabilities, CRLF line ends, no newline after the last line, fields in another order."""

    lines, _ = shard_lines["multiclass"]
    variants = {
        "utf-8": _edit(lines, 1, lambda x: x | {"input": "images/çà.jpg"}),
        "ints": _edit(lines, 1, lambda x: x | {"predictions": [0, 1, 0, 0]}),
        "reordered": _edit(lines, 1, lambda x: dict(reversed(x.items()))),
    }
    texts = {k: "".join(x + "\n" for x in v) for k, v in variants.items()}
    texts["utf-8"] = texts["utf-8"].replace("\\u00e7\\u00e0", "çà")
    texts["crlf"] = "".join(x + "\r\n" for x in lines)
    texts["no last newline"] = "\n".join(lines)
    for name, text in texts.items():
        out = tmp_path / name.replace(" ", "_")
        path, manifest = write_shard(out, lines, text)
        (got,) = read_shards(str(out), manifest)
        want = parse_shard_lines(str(path), text.encode(), NUM_CLASSES)
        assert got.rows.tolist() == want.rows.tolist() == [json.loads(x)["row"] for x in lines], name
        assert got.inputs == want.inputs and got.errors == want.errors, name
        assert got.probs.tobytes() == want.probs.tobytes(), name
    assert got.inputs[0] == json.loads(lines[0])["input"]


def test_a_shard_without_its_planned_rows_is_refused(shard_lines, tmp_path) -> None:
    """A truncated or re-written shard would otherwise be evaluated as if those rows never existed."""

    lines, _ = shard_lines["multiclass"]
    path, manifest = write_shard(tmp_path, lines, "".join(x + "\n" for x in lines[:-1]))
    with pytest.raises(
        ResultDirError, match=rf"{path}: 4 lines where the manifest plans 5 \(rows 2\.\.5\); .*--resume"
    ):
        list(read_shards(str(tmp_path), manifest))
    shifted = [json.dumps(json.loads(x) | {"row": 20 + i}) for i, x in enumerate(lines)]
    path.write_text("".join(x + "\n" for x in shifted))
    with pytest.raises(ResultDirError, match=r"rows 20\.\.24 where the manifest plans 2\.\.5"):
        list(read_shards(str(tmp_path), manifest))
