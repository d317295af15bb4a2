"""Measuring one cell: a quality pass, then a latency pass, turned into the fields of its result row.

What these passes do is stated once, for readers, in ``kvcompare.protocol.PROTOCOL_MD``.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from typing import Any, TypeVar

import numpy as np

from kvcompare.engine.executor import LatencyResult
from kvcompare.stats import median_estimate

T = TypeVar("T")


def position_buckets(nll: np.ndarray, width: int) -> list[dict[str, Any]]:
    """NLL summed over buckets of ``width`` predicted positions; position i + 1 is predicted by entry i."""
    rows = []
    for start in range(0, nll.size, width):
        part = nll[start : start + width]
        rows.append(
            {
                "bucket_start": start + 1,
                "bucket_end": start + 1 + part.size,
                "nll_sum": float(part.sum()),
                "tokens": int(part.size),
            }
        )
    return rows


def quality_fields(nll: np.ndarray, correct: np.ndarray) -> dict[str, Any]:
    """The quality columns of a row from per-token negative log-likelihoods (nats) and hits, both ``[tokens]``."""
    return {
        "ppl": math.exp(float(nll.mean())),
        "accuracy": float(correct.mean()),
        "nll_sum": float(nll.sum()),
        "tokens_scored": int(nll.size),
    }


@dataclasses.dataclass(frozen=True)
class TrialFigures:
    """One latency trial's speed figures: the unit that intervals resample."""

    ttft_s: float
    tpot_s: float | None  # the median counted decode step of the trial
    throughput_tok_s: float | None  # counted tokens / counted decode time


def trial_figures(trial: LatencyResult) -> TrialFigures:
    """One latency trial's figures: TTFT, median TPOT, throughput and eviction/signal shares (seconds)."""
    decode_s = float(sum(trial.step_s))
    return TrialFigures(
        trial.ttft_s,
        statistics.median(trial.step_s) if trial.step_s else None,
        len(trial.step_s) / decode_s if decode_s > 0 else None,
    )


def latency_fields(trials: list[LatencyResult], oneshot_ttft: list[float] | None = None) -> dict[str, Any]:
    """A cell's speed columns from its trials: medians over trials with bootstrap intervals, and sums."""
    figures = [trial_figures(trial) for trial in trials]
    decode_s = float(sum(sum(t.step_s) for t in trials))
    evicted = float(sum(sum(t.evict_s) for t in trials))
    signalled = float(sum(sum(t.signal_s) for t in trials))
    compressions = [t.compress_s for t in trials if t.compress_s is not None]  # the prefill setting's
    compressed = float(sum(compressions)) if compressions else None
    ttft_s = float(sum(t.ttft_s for t in trials))
    fields: dict[str, Any] = {
        "compiled": all(t.compiled for t in trials) if trials else None,
        "compile_s": float(sum(t.compile_s for t in trials)) if trials else None,
        "compress_s": compressed,
        "compress_share": compressed / ttft_s if compressed is not None and ttft_s > 0 else None,
        "decode_s": decode_s,
        "evict_s": evicted,
        "evict_share": evicted / decode_s if decode_s > 0 else None,
        "signal_s": signalled,
        "signal_share": signalled / decode_s if decode_s > 0 else None,
    }
    for column, interval, values in (
        ("ttft_s", "ttft", [f.ttft_s for f in figures]),
        ("tpot_s", "tpot", [f.tpot_s for f in figures if f.tpot_s is not None]),
        ("throughput_tok_s", "throughput", [f.throughput_tok_s for f in figures if f.throughput_tok_s is not None]),
        ("ttft_oneshot_s", "ttft_oneshot", oneshot_ttft or []),
    ):
        estimate = median_estimate(values)
        fields.update(
            {column: estimate.value, f"{interval}_ci_low": estimate.low, f"{interval}_ci_high": estimate.high}
        )
    return fields


def timing_rows(trial: LatencyResult, kind: str = "ttft", **keys: Any) -> list[dict[str, Any]]:
    """The raw rows of one trial for the timings file: its TTFT, then each counted decode step.

    ``kind`` names the TTFT row ("ttft", or "ttft_oneshot" for the one-pass prefill); ``keys`` are the
    columns shared by every row of the trial (cell, role, session, round, order, pairing keys).
    """
    rows = [
        {
            **keys,
            "kind": kind,
            "step": None,
            "seconds": trial.ttft_s,
            "evict_seconds": None,
            "signal_seconds": None,
            "compress_seconds": trial.compress_s,
        }
    ]
    rows += [
        {**keys, "kind": "step", "step": index, "seconds": seconds, "evict_seconds": evict, "signal_seconds": signal}
        for index, (seconds, evict, signal) in enumerate(zip(trial.step_s, trial.evict_s, trial.signal_s, strict=True))
    ]
    return rows


def round_order(items: list[T], round_index: int) -> list[T]:
    """The order of a round's trials: rotated by one each round, so no cell is always first or last."""
    if not items:
        return []
    shift = round_index % len(items)
    return items[shift:] + items[:shift]
