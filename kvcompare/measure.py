"""Measuring one cell: a quality pass, then a latency pass, turned into the fields of its result row.

What these passes do is stated once, for readers, in ``kvcompare.protocol.PROTOCOL_MD``.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

import numpy as np
import torch

from kvcompare.config import CacheConfig, LatencySettings
from kvcompare.executor import Executor
from kvcompare.policy import KVPolicy


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
    return {
        "ppl": math.exp(float(nll.mean())),
        "accuracy": float(correct.mean()),
        "nll_sum": float(nll.sum()),
        "tokens_scored": int(nll.size),
    }


def latency_fields(ttft_s: float, step_s: list[float], evict_s: list[float]) -> dict[str, Any]:
    decode_s = float(sum(step_s))
    evicted = float(sum(evict_s))
    return {
        "ttft_s": ttft_s,
        "tpot_s": statistics.median(step_s) if step_s else None,
        "throughput_tok_s": len(step_s) / decode_s if decode_s > 0 else None,
        "decode_s": decode_s,
        "evict_s": evicted,
        "evict_share": evicted / decode_s if decode_s > 0 else None,
    }


def measure_cell(
    executor: Executor,
    tokens: torch.Tensor,
    policy: KVPolicy,
    config: CacheConfig,
    latency: LatencySettings,
    bucket: int,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Measure one policy on one passage; return the metric fields of its result row and its position curve."""
    quality = executor.score(tokens, policy, config)
    timed = executor.generate(tokens, policy, config, gen=latency.gen, warmup=latency.warmup)
    fields = {
        **quality_fields(quality.nll, quality.correct),
        **latency_fields(timed.ttft_s, timed.step_s, timed.evict_s),
        "peak_kv_bytes": max(quality.peak_kv_bytes, timed.peak_kv_bytes),
        "peak_mem_bytes": max(quality.peak_mem_bytes, timed.peak_mem_bytes),
        "quality_s": quality.wall_s,
    }
    return fields, position_buckets(quality.nll, bucket)
