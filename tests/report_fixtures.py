"""Synthetic run directories for the report tests (RESULT_SCHEMA/CURVE_SCHEMA/TIMINGS_SCHEMA rows as a runner
writes), and readers of the Vega-Lite specs a report writes."""

from __future__ import annotations

import json
import math
import statistics
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from kvcompare.schema import CURVE_SCHEMA, RESULT_SCHEMA, RUN_JSON, TIMINGS_SCHEMA
from kvcompare.stats import median_estimate

RUN_ID = "test-run"
LENGTHS = (256, 512)
CACHE_SIZES = (32, 64)
SAMPLES = (0, 1)
POLICY_LABELS = ("streaming", "l2", "l2:mode=random", "recent")
BUCKET = 64
ROUNDS = 3
WEIGHT_BYTES = 8 * 2**20
BANDWIDTH = 1e9  # bytes/s, as run.json's speed.memory_bandwidth_bytes_s
KV_BYTES_PER_TOKEN = 4096


def cell(policy_label: str, cache_size: int | None, seq_len: int, sample_id: int, **metrics: Any) -> dict[str, Any]:
    """One RESULT_SCHEMA row; unspecified fields get plausible values, `metrics` overrides any of them."""
    policy = policy_label.split(":")[0]
    row: dict[str, Any] = {name: None for name in RESULT_SCHEMA.names}
    row.update(
        run_id=RUN_ID,
        cell_id=f"{policy_label}-{cache_size}-{seq_len}-{sample_id}",
        status="ok",
        model="tiny",
        dataset="synthetic",
        source="book.txt",
        token_offset=1000 * sample_id,
        sample_id=sample_id,
        policy=policy,
        policy_label=policy_label,
        policy_params="{}",
        plugin=policy,
        cache_size=cache_size,
        seq_len=seq_len,
        stride=1,
        evict_block=1,
        positions="true",
        skip_layers="[]",
        device="cpu",
        dtype="float32",
        gen_tokens=16,
        warmup=1,
        ttft_s=0.1,
        tpot_s=0.01,
        throughput_tok_s=100.0,
        ppl=40.0,
        accuracy=0.5,
        nll_sum=seq_len * math.log(40.0),
        tokens_scored=seq_len,
        peak_kv_bytes=1024 * (cache_size or seq_len),
        peak_mem_bytes=10 * 2**20,
        evict_s=0.0,
        evict_share=0.0,
        decode_s=0.16,
        repeats=1,
        prefill_chunk=1,
        threads=2,
        kv_read_bytes=KV_BYTES_PER_TOKEN * min(cache_size or seq_len + 1, seq_len + 1),
        weight_bytes=WEIGHT_BYTES,
        quality_s=1.0,
        quality_batch=1,
        wall_s=2.0,
        finished_at="2025-01-01T00:00:00",
    )
    row["tpot_floor_s"] = (row["weight_bytes"] + row["kv_read_bytes"]) / BANDWIDTH
    row.update(metrics)
    return row


#: What a failed cell did not measure.
MEASURED_COLUMNS = (
    "ttft_s",
    "tpot_s",
    "throughput_tok_s",
    "ppl",
    "accuracy",
    "nll_sum",
    "tokens_scored",
    "peak_kv_bytes",
    "peak_mem_bytes",
    "evict_s",
    "evict_share",
    "decode_s",
    "quality_s",
    "quality_batch",
)


def failed_cell(policy_label: str, cache_size: int | None, seq_len: int, sample_id: int, error: str) -> dict[str, Any]:
    row = cell(policy_label, cache_size, seq_len, sample_id, status="failed", error=error)
    row.update(dict.fromkeys(MEASURED_COLUMNS))
    return row


#: What a passkey probe does not measure: its row leaves these null, as a run writes it.
PPL_ONLY_COLUMNS = MEASURED_COLUMNS
#: A passkey probe's task_params as a run writes them: the task's parameters, the same on every probe of the run
#: whatever the probe's own depth (here those of `--task passkey:depths=0/0.5/1`); rows whose task_params differ
#: are variants of the task (`--task passkey,passkey:haystack=text`), which the report keeps apart.
PASSKEY_PARAMS = json.dumps({"depths": [0.0, 0.5, 1.0], "haystack": "repeat"}, sort_keys=True)


def probe(
    policy_label: str,
    cache_size: int | None,
    seq_len: int,
    depth: float,
    sample_id: int,
    right: bool,
    **fields: Any,
) -> dict[str, Any]:
    """One passkey probe (task "passkey") as RESULT_SCHEMA row: its own cell id, the PPL and speed columns
    null; a wrong answer matched 2 of 3 tokens and is less likely. `fields` overrides any column."""
    row = cell(policy_label, cache_size, seq_len, sample_id)
    row.update({name: None for name in PPL_ONLY_COLUMNS})
    row.update(
        task="passkey",
        task_params=PASSKEY_PARAMS,
        probe_params=json.dumps({"depth": depth, "needle_start": int(depth * seq_len), "sample": sample_id}),
        correct=right,
        score=1.0 if right else 2 / 3,
        answer_matched=3 if right else 2,
        answer_tokens=3,
        answer_logprob=-0.5 if right else -6.0,
    )
    row.update(fields)
    if "cell_id" not in fields:
        row["cell_id"] = f"passkey-{policy_label}-{cache_size}-{seq_len}-{depth}-{sample_id}-{row['positions']}"
    return row


def curve_rows(row: dict[str, Any]) -> list[dict[str, Any]]:
    """Position buckets whose perplexity drifts from the cell's ppl, worse later for evicting policies."""
    rows = []
    drift = 0.0 if row["cache_size"] is None else 0.2
    for start in range(1, row["seq_len"], BUCKET):
        end = min(start + BUCKET, row["seq_len"])
        nll_per_token = math.log(row["ppl"]) + drift * start / row["seq_len"]
        rows.append(
            {
                "run_id": row["run_id"],
                "cell_id": row["cell_id"],
                "policy": row["policy"],
                "policy_label": row["policy_label"],
                "cache_size": row["cache_size"],
                "seq_len": row["seq_len"],
                "positions": row["positions"],
                "sample_id": row["sample_id"],
                "bucket_start": start,
                "bucket_end": end,
                "nll_sum": nll_per_token * (end - start),
                "tokens": end - start,
            }
        )
    return rows


def write_run(
    run_dir: Path,
    cells: list[dict[str, Any]],
    curves: list[dict[str, Any]] | None = None,
    cells_planned: int | None = None,
    timings: list[dict[str, Any]] | None = None,
    speed: dict[str, Any] | None = None,
) -> Path:
    """Write run.json, one cells/*.parquet per cell, (when given) one curves/*.parquet per cell and one
    timings/*.parquet per passage and session; `speed` replaces run.json's "speed" entry."""
    (run_dir / "cells").mkdir(parents=True, exist_ok=True)
    for row in cells:
        pq.write_table(
            pa.Table.from_pylist([row], schema=RESULT_SCHEMA), run_dir / "cells" / f"{row['cell_id']}.parquet"
        )
    if curves is not None:
        (run_dir / "curves").mkdir(exist_ok=True)
        by_cell: dict[str, list[dict[str, Any]]] = {}
        for curve in curves:
            by_cell.setdefault(curve["cell_id"], []).append(curve)
        for cell_id, rows in by_cell.items():
            pq.write_table(pa.Table.from_pylist(rows, schema=CURVE_SCHEMA), run_dir / "curves" / f"{cell_id}.parquet")
    if timings is not None:
        (run_dir / "timings").mkdir(exist_ok=True)
        by_passage: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
        for timing in timings:
            key = (timing["seq_len"], timing["sample_id"], timing["session"])
            by_passage.setdefault(key, []).append(timing)
        for (seq_len, sample_id, session), rows in by_passage.items():
            pq.write_table(
                pa.Table.from_pylist(rows, schema=TIMINGS_SCHEMA),
                run_dir / "timings" / f"{seq_len}-{sample_id}-s{session}.parquet",
            )
    meta = {
        "run_id": RUN_ID,
        "command": "kvcompare run --model tiny",
        "config": {
            "model": "tiny",
            "dataset": "synthetic",
            "policies": list(POLICY_LABELS),
            "cache_sizes": list(CACHE_SIZES),
            "lengths": list(LENGTHS),
            "samples": len(SAMPLES),
            "seed": 0,
            "device": "cpu",
            "dtype": "float32",
            "repeats": ROUNDS,
        },
        "environment": {
            "git_sha": "abc123",
            "versions": {"torch": "2.13.0"},
            "device_name": "cpu",
            "platform": "linux",
        },
        "started_at": "2025-01-01T00:00:00",
        "finished_at": "2025-01-01T01:00:00",
        "cells_planned": len(cells) if cells_planned is None else cells_planned,
        "speed": {
            "threads": 2,
            "memory_bandwidth_bytes_s": BANDWIDTH,
            "load_average_start": [0.5, 0.4, 0.3],
            "load_average_end": [1.5, 1.0, 0.6],
        }
        if speed is None
        else speed,
    }
    (run_dir / RUN_JSON).write_text(json.dumps(meta))
    return run_dir


def full_grid_cells() -> list[dict[str, Any]]:
    """Every policy at every cache size and length: smaller caches cost quality; eviction gains speed."""
    rows = []
    for seq_len in LENGTHS:
        for sample_id in SAMPLES:
            base_ppl = 40.0 + 10 * sample_id
            rows.append(
                cell(
                    "full",
                    None,
                    seq_len,
                    sample_id,
                    ppl=base_ppl,
                    tpot_s=0.01 * seq_len / 256,
                    throughput_tok_s=100.0 * 256 / seq_len,
                    peak_kv_bytes=1024 * seq_len,
                )
            )
            for rank, label in enumerate(POLICY_LABELS):
                for cache_size in CACHE_SIZES:
                    loss = (1 + rank) * 0.02 * 64 / cache_size
                    rows.append(
                        cell(
                            label,
                            cache_size,
                            seq_len,
                            sample_id,
                            ppl=base_ppl * (1 + loss),
                            accuracy=0.5 * (1 - loss / 2),
                            tpot_s=0.008 * (1 + 0.1 * rank),
                            throughput_tok_s=120.0 - rank,
                            ttft_s=0.1 + 0.01 * rank,
                            peak_kv_bytes=1024 * cache_size,
                            evict_share=0.05,
                        )
                    )
    return rows


def trial_rows(
    row: dict[str, Any],
    role: str,
    round_index: int,
    ttft: float,
    steps: list[float],
    session: int = 0,
    kind: str = "ttft",
) -> list[dict[str, Any]]:
    """One latency trial of the cell `row` as TIMINGS_SCHEMA rows: its TTFT (of `kind`), then its counted steps."""
    keys = {
        "run_id": row["run_id"],
        "cell_id": row["cell_id"],
        "role": role,
        "session": session,
        "round": round_index,
        "order": 0,
        "seq_len": row["seq_len"],
        "sample_id": row["sample_id"],
        "positions": row["positions"],
    }
    rows = [{**keys, "kind": kind, "step": None, "seconds": ttft, "evict_seconds": None}]
    rows += [{**keys, "kind": "step", "step": i, "seconds": s, "evict_seconds": 0.0} for i, s in enumerate(steps)]
    return rows


def jitter(*key: object, spread: float = 0.01) -> float:
    """A deterministic factor in [1 - spread, 1 + spread] for the trial named by `key`."""
    return 1 + spread * (zlib.crc32("/".join(map(str, key)).encode()) % 2001 / 1000 - 1)


def timed(
    cells: list[dict[str, Any]], rounds: int = ROUNDS, spread: float = 0.01
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Trials for every ok cell, as a runner takes them: `rounds` rounds, each trial its row's TTFT and TPOT
    (every counted step alike) scaled by a jitter of its own; `full` also as the A/A control and in one pass
    (half its chunked TTFT). Returns the cells with their speed columns recomputed from their trials (medians
    over trials with intervals, as kvcompare.run.figures writes them) and the timings rows."""
    timings: list[dict[str, Any]] = []
    out = []
    for row in cells:
        if row["status"] != "ok":
            out.append(row)
            continue
        figures: dict[str, list[float]] = {"ttft": [], "tpot": [], "throughput": [], "ttft_oneshot": []}
        for r in range(rounds):
            factor = jitter(row["cell_id"], r, spread=spread)
            ttft, tpot = row["ttft_s"] * factor, row["tpot_s"] * factor
            steps = [tpot] * row["gen_tokens"]
            timings += trial_rows(row, "cell", r, ttft, steps)
            figures["ttft"].append(ttft)
            figures["tpot"].append(tpot)
            figures["throughput"].append(len(steps) / sum(steps))
            if row["policy"] == "full":
                aa = jitter(row["cell_id"], r, "aa", spread=spread)
                timings += trial_rows(
                    row, "aa_control", r, row["ttft_s"] * aa, [row["tpot_s"] * aa] * row["gen_tokens"]
                )
                timings += trial_rows(row, "cell", r, ttft / 2, [], kind="ttft_oneshot")
                figures["ttft_oneshot"].append(ttft / 2)
        speed: dict[str, Any] = {"repeats": rounds}
        for name, column in (
            ("ttft", "ttft_s"),
            ("tpot", "tpot_s"),
            ("throughput", "throughput_tok_s"),
            ("ttft_oneshot", "ttft_oneshot_s"),
        ):
            values = figures[name]
            estimate = median_estimate(values)
            speed[column] = statistics.median(values) if values else None
            speed[f"{name}_ci_low"], speed[f"{name}_ci_high"] = estimate.low, estimate.high
        out.append({**row, **speed})
    return out, timings


def synthetic_run(run_dir: Path) -> Path:
    """A complete run: full grid with curves and raw timings."""
    cells, timings = timed(full_grid_cells())
    return write_run(run_dir, cells, [c for row in cells for c in curve_rows(row)], timings=timings)


def walk(node: Any, key: str) -> Iterator[Any]:
    """Every value stored under `key` anywhere in a nested spec."""
    if isinstance(node, dict):
        for k, value in node.items():
            if k == key:
                yield value
            yield from walk(value, key)
    elif isinstance(node, list):
        for item in node:
            yield from walk(item, key)


def channels(spec: dict[str, Any], channel: str) -> list[dict[str, Any]]:
    """Every encoding of `channel` (x, y, color...) in a spec."""
    return [enc[channel] for enc in walk(spec, "encoding") if channel in enc]


def spec_rows(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """The data rows a spec carries."""
    return [row for values in spec.get("datasets", {}).values() for row in values]


def marks(spec: dict[str, Any], mark: str) -> list[dict[str, Any]]:
    """The encodings of every layer drawn with `mark` (errorbar, line, bar...) in a spec."""
    found = []
    for node in walk(spec, "layer"):
        for layer in node:
            kind = layer.get("mark")
            kind = kind.get("type") if isinstance(kind, dict) else kind
            if kind == mark and "encoding" in layer:
                found.append(layer["encoding"])
    return found
