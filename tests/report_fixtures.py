"""Synthetic run directories for the report tests (RESULT_SCHEMA/CURVE_SCHEMA rows as a runner writes), and
readers of the Vega-Lite specs a report writes."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from kvcompare.schema import CURVE_SCHEMA, RESULT_SCHEMA, RUN_JSON

RUN_ID = "test-run"
LENGTHS = (256, 512)
CACHE_SIZES = (32, 64)
SAMPLES = (0, 1)
POLICY_LABELS = ("streaming", "l2", "l2:mode=random", "recent")
BUCKET = 64


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
        quality_s=1.0,
        wall_s=2.0,
        finished_at="2025-01-01T00:00:00",
    )
    row.update(metrics)
    return row


def failed_cell(policy_label: str, cache_size: int | None, seq_len: int, sample_id: int, error: str) -> dict[str, Any]:
    row = cell(policy_label, cache_size, seq_len, sample_id, status="failed", error=error)
    for name in (
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
    ):
        row[name] = None
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
) -> Path:
    """Write run.json, one cells/*.parquet per cell and (when given) one curves/*.parquet per cell."""
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


def synthetic_run(run_dir: Path) -> Path:
    """A complete run: full grid with curves."""
    cells = full_grid_cells()
    return write_run(run_dir, cells, [c for row in cells for c in curve_rows(row)])


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
