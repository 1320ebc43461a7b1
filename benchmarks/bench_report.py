"""Evaluation at scale: 100,000 predictions of a 1,000-class model -> evaluation.json + report.html.

The result dir is written with infer's own code (`read_inputs`, `plan_shards`, `build_manifest`,
`ShardWriter`, `prediction_line`) from the real probabilities of an untrained 1,000-class tiny ViT on
--images distinct images; row i shows image i % --images, so every thumbnail is a real file. Each figure is
measured in a fresh process (peak memory is per process; the file cache is warm after the first read), in
wall seconds and in CPU seconds (all threads), which other jobs on a shared machine inflate far less; the load
average is printed with them:

- parse: stream every shard through `pyarrow.json` (the fields evaluate reads, in the blocks it reads, with
  none of its checks), keeping nothing: the floor of evaluate's reader, and the ratio's baseline (a plain
  `read_json` of a whole shard needs about twice the memory);
- json: the same with `json.loads` line by line (how evaluate read shards before), for comparison;
- evaluate: `import rayimgcls.evaluate` and `evaluate()` (load, join, metrics, evaluation.json, confusion
  CSV/PNG, report.html), as `rayimgcls evaluate` runs them, with the import and the report.html step timed
  inside it.

    python benchmarks/bench_report.py                      # 100,000 x 1,000: ~2.5 GB of shards, a few minutes
    python benchmarks/bench_report.py --rows 20000 --runs 3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np

TINY_VIT = {"patch_size": 4, "depth": 2, "embed_dim": 48, "num_heads": 2}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--images", type=int, default=1000, help="distinct image files the rows cycle through")
    p.add_argument("--runs", type=int, default=1, help="timed runs of each measurement (median)")
    p.add_argument("--workdir", default="/tmp/rayimgcls-bench-report")
    return p.parse_args()


def build(args: argparse.Namespace) -> Path:
    """data/ (images + labels.csv), model/ and result/ (shards + manifest), made once per setting."""
    from rayimgcls.config import InferConfig
    from rayimgcls.infer import build_manifest, read_inputs
    from rayimgcls.model import Predictor, make_untrained_model_dir
    from rayimgcls.results import ShardWriter, plan_shards, prediction_line, write_manifest
    from rayimgcls.synth import SynthConfig, make_dataset

    work = Path(args.workdir) / f"{args.rows}x{args.classes}"
    if (work / "result" / "manifest.json").exists():
        return work
    data = make_dataset(work / "data", SynthConfig(num_images=args.images, num_classes=4, seed=0))
    images = [line.split(",")[0] for line in (data / "labels.csv").read_text().splitlines()[1:]]
    rng = np.random.default_rng(0)
    labels = rng.integers(0, args.classes, args.rows)
    csv = "".join(f"{images[i % len(images)]},{labels[i]},test\n" for i in range(args.rows))
    (data / "labels.csv").write_text("image_path,label,subset\n" + csv)
    (data / "class_to_idx.json").unlink()
    make_untrained_model_dir(work / "model", num_classes=args.classes, image_size=32, model_kwargs=TINY_VIT)
    predictor = Predictor.from_dir(work / "model")
    probs = predictor.predict_batch(np.stack([predictor.preprocess(data / p) for p in images]))
    cfg = InferConfig(
        model_dir=str(work / "model"), data_root=str(data), result_dir=str(work / "result"), csv="labels.csv"
    )
    inputs = read_inputs(cfg)
    rows = inputs.frame["row"].to_numpy()
    shards = plan_shards(rows, cfg.rows_per_shard)
    (work / "result").mkdir()
    write_manifest(cfg.result_dir, build_manifest(cfg, predictor.card, inputs, shards))
    # One line per image, then only `row` differs: the same text prediction_line writes, 100x faster to make.
    lines = [prediction_line(p, 0, probs[k], predictor.card, cfg.top_k) for k, p in enumerate(images)]
    assert all(line.endswith(', "row": 0}') for line in lines)
    writer = ShardWriter(cfg.result_dir, shards, rows, cfg.rows_per_shard)
    for start in range(0, len(rows), 5000):
        chunk = rows[start : start + 5000]
        text = [f"{lines[(start + i) % len(lines)][:-2]}{r}}}" for i, r in enumerate(chunk)]
        writer.add(chunk, np.array(text, dtype=object))
    return work


def peak_mb() -> float:
    """This process's peak resident memory (VmHWM starts over at exec, unlike getrusage's ru_maxrss)."""
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0]) / 1024


def cpu_s() -> float:
    """CPU seconds of this process, all its threads: what other jobs on a shared machine inflate least."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def parse_only(result: str) -> dict:
    import pyarrow.json as pa_json

    from rayimgcls.results import BLOCK_BYTES, LINE_SCHEMA

    options = pa_json.ParseOptions(explicit_schema=LINE_SCHEMA, unexpected_field_behavior="ignore")
    blocks = pa_json.ReadOptions(block_size=BLOCK_BYTES)
    start, cpu = time.perf_counter(), cpu_s()
    for shard in sorted(Path(result).glob("predictions-*.jsonl")):
        pa_json.open_json(shard, blocks, options).read_all()
    return {"s": time.perf_counter() - start, "cpu": cpu_s() - cpu, "mb": peak_mb()}


def json_only(result: str) -> dict:
    start, cpu = time.perf_counter(), cpu_s()
    for shard in sorted(Path(result).glob("predictions-*.jsonl")):
        with shard.open() as f:
            for line in f:
                json.loads(line)
    return {"s": time.perf_counter() - start, "cpu": cpu_s() - cpu, "mb": peak_mb()}


def evaluate_once(result: str) -> dict:
    """Seconds with the imports, as `rayimgcls evaluate` pays them; of which imports and report.html."""
    start, cpu = time.perf_counter(), cpu_s()
    import rayimgcls.evaluate as ev

    imported = time.perf_counter() - start
    timed = {}
    write = ev.write_evaluation_report

    def write_timed(*a, **kw):
        start = time.perf_counter()
        write(*a, **kw)
        timed["report"] = time.perf_counter() - start

    ev.write_evaluation_report = write_timed
    ev.evaluate(result)
    out = {"s": time.perf_counter() - start, "cpu": cpu_s() - cpu, "mb": peak_mb()}
    return out | {"import": imported, "report": timed["report"]}


def summary(runs: list[dict]) -> dict:
    """The median of each figure over the runs; the largest peak memory."""
    return {k: max(r[k] for r in runs) if k == "mb" else statistics.median(r[k] for r in runs) for k in runs[0]}


def fresh(fn, *args):
    """Run fn in a new process (its own peak memory)."""
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def main() -> None:
    args = parse_args()
    start = time.perf_counter()
    work = build(args)
    result = str(work / "result")
    size = sum(f.stat().st_size for f in Path(result).glob("predictions-*.jsonl")) / 1e9
    print(
        f"result dir {result}: {args.rows} rows x {args.classes} classes, {size:.2f} GB of shards "
        f"(built/found in {time.perf_counter() - start:.0f} s)"
    )
    load_before = " ".join(f"{x:.1f}" for x in os.getloadavg())
    fresh(parse_only, result)  # warm-up: the file cache
    parse = [fresh(parse_only, result) for _ in range(args.runs)]
    loads = [fresh(json_only, result) for _ in range(args.runs)]
    evals = [fresh(evaluate_once, result) for _ in range(args.runs)]
    parse_m, json_m, eval_m = summary(parse), summary(loads), summary(evals)
    html = Path(result) / "report.html"
    print(f"load average before the runs: {load_before}, after: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    for label, m, note in (
        ("parse only:", parse_m, "pyarrow.json, no checks"),
        ("json.loads:", json_m, "every line, keeping nothing"),
    ):
        print(f"{label:12} {m['s']:6.1f} s ({m['cpu']:5.1f} s CPU), peak {m['mb']:6.0f} MB ({note})")
    print(
        f"evaluate:    {eval_m['s']:6.1f} s ({eval_m['cpu']:5.1f} s CPU), peak {eval_m['mb']:6.0f} MB "
        f"(imports {eval_m['import']:.1f} s, report.html {eval_m['report']:.1f} s, "
        f"{html.stat().st_size / 1e6:.1f} MB, {html.read_text().count('<img ')} images)"
    )
    eval_s, report_s = eval_m["s"], eval_m["report"]
    probs_mb = args.rows * args.classes * 8 / 1e6
    print(f"the probabilities alone as float64: {probs_mb:.0f} MB")
    print(f"RESULT evaluate_vs_parse ratio={eval_s / parse_m['s']:.2f} target=<1.5")
    print(f"RESULT evaluate_seconds_vs_minute ratio={eval_s / 60:.2f} target=<0.5")
    print(f"RESULT report_share ratio={report_s / eval_s:.3f} target=<0.1")
    print(f"RESULT evaluate_memory_vs_probs ratio={eval_m['mb'] / probs_mb:.2f} target=<1.5")


if __name__ == "__main__":
    main()
