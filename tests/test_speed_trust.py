"""Speed numbers you can trust (issue 9): trials, rounds, the A/A control, raw timings and their statistics."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from runs import tiny_run

from kvcompare.config import ConfigError, RunConfig
from kvcompare.run.figures import round_order
from kvcompare.run.runner import run
from kvcompare.stats import Estimate, mean_estimate, median_estimate


def config(model_dir: Path, **changes: object) -> RunConfig:
    return tiny_run(model_dir, **{"policies": ["streaming", "recent"], "gen": 3, "warmup": 1, **changes})


# -- the bootstrap, on hand-made trial data ------------------------------------------------------------------
def test_the_bootstrap_of_two_values_spans_them() -> None:
    # resampling two values gives means a, (a+b)/2, b with chances 1/4, 1/2, 1/4: the 95% interval is [a, b]
    assert mean_estimate([1.0, 3.0]) == Estimate(2.0, 1.0, 3.0, 2)


def test_significance_needs_an_interval_that_excludes_zero() -> None:
    assert mean_estimate([1.0, 3.0]).significant  # [1, 3]
    assert mean_estimate([-3.0, -1.0]).significant  # [-3, -1]
    assert not mean_estimate([-1.0, 1.0]).significant  # [-1, 1] holds 0
    at_boundary = mean_estimate([0.0, 2.0])
    assert (at_boundary.low, at_boundary.high) == (0.0, 2.0) and not at_boundary.significant  # touching 0: no


def test_one_trial_has_no_interval_and_ties_have_a_point_interval() -> None:
    single = median_estimate([0.25])
    assert single.value == 0.25 and single.low is None and not single.significant
    assert median_estimate([0.2, 0.2, 0.2]) == Estimate(0.2, 0.2, 0.2, 3)
    assert mean_estimate([]) == Estimate(None, None, None, 0)
    assert mean_estimate([1.0, float("nan"), 3.0]).n == 2  # not-finite values are dropped


def test_the_bootstrap_is_seeded() -> None:
    values = np.random.default_rng(5).normal(size=12)
    assert mean_estimate(values) == mean_estimate(values)
    wide = mean_estimate(values)
    assert wide.low is not None and wide.high is not None and wide.low < float(values.mean()) < wide.high


# -- the order of trials ---------------------------------------------------------------------------------------
def test_rounds_rotate_the_order_of_trials() -> None:
    items = ["full", "streaming", "recent", "aa"]
    orders = [round_order(items, r) for r in range(4)]
    assert orders[0] == items and orders[1] == ["streaming", "recent", "aa", "full"]
    assert {order[0] for order in orders} == set(items)  # every trial goes first once in four rounds
    assert round_order([], 3) == []


# -- a run: trials, controls and raw timings -------------------------------------------------------------------
@pytest.fixture(scope="module")
def measured(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return run(
        config(tiny_model_dir, positions=["true", "shift"]), tmp_path_factory.mktemp("speed") / "run", progress=False
    )


def test_every_trial_is_kept_raw_and_the_cells_summarise_them(measured: Path) -> None:
    cells = pl.read_parquet(measured / "cells" / "*.parquet")
    timings = pl.read_parquet(measured / "timings" / "*.parquet")
    assert set(cells["repeats"]) == {2} and set(cells["status"]) == {"ok"}
    for row in cells.iter_rows(named=True):
        own = timings.filter((pl.col("cell_id") == row["cell_id"]) & (pl.col("role") == "cell"))
        assert own.filter(pl.col("kind") == "ttft").height == 2  # one TTFT per round
        steps = own.filter(pl.col("kind") == "step")
        assert steps.height == 2 * 3 and set(steps["step"]) == {0, 1, 2}  # gen counted steps per round
        per_trial = steps.group_by("round").agg(pl.col("seconds").median()).sort("round")["seconds"].to_list()
        assert row["tpot_s"] == pytest.approx(float(np.median(per_trial)))
        assert row["tpot_ci_low"] <= row["tpot_s"] <= row["tpot_ci_high"]
        assert row["ttft_ci_low"] <= row["ttft_s"] <= row["ttft_ci_high"]
        assert row["decode_s"] == pytest.approx(float(steps["seconds"].sum()))
        assert row["kv_read_bytes"] > 0 and row["weight_bytes"] > 0 and row["tpot_floor_s"] > 0
        assert row["threads"] >= 1 and row["prefill_chunk"] == 8


def test_the_aa_control_is_timed_every_round_and_never_a_policy(measured: Path) -> None:
    cells = pl.read_parquet(measured / "cells" / "*.parquet")
    timings = pl.read_parquet(measured / "timings" / "*.parquet")
    full_ids = set(cells.filter(pl.col("policy") == "full")["cell_id"])
    control = timings.filter(pl.col("role") == "aa_control")
    assert set(control["cell_id"]) == full_ids  # the full cell of each position mode, timed twice per round
    assert sorted(control.filter(pl.col("kind") == "ttft")["round"].to_list()) == [0, 0, 1, 1]
    assert cells.height == 2 * 3  # 2 position modes x (full, streaming, recent): no row for the control
    assert set(timings["role"]) == {"cell", "aa_control"}


def test_only_full_gets_a_one_pass_ttft(measured: Path) -> None:
    cells = pl.read_parquet(measured / "cells" / "*.parquet")
    timings = pl.read_parquet(measured / "timings" / "*.parquet")
    oneshot = timings.filter(pl.col("kind") == "ttft_oneshot")
    assert set(oneshot["cell_id"]) == set(cells.filter(pl.col("policy") == "full")["cell_id"])
    assert cells.filter(pl.col("policy") != "full")["ttft_oneshot_s"].null_count() == 4
    assert cells.filter(pl.col("policy") == "full")["ttft_oneshot_s"].null_count() == 0


def test_trials_rotate_within_each_round(measured: Path) -> None:
    timings = pl.read_parquet(measured / "timings" / "*.parquet").filter(pl.col("kind") == "ttft")
    firsts = timings.filter(pl.col("order") == 0).sort("round")
    assert firsts.height == 2 and firsts["cell_id"][0] != firsts["cell_id"][1]


def test_run_json_records_the_speed_setting(measured: Path) -> None:
    meta = json.loads((measured / "run.json").read_text())
    speed = meta["speed"]
    assert speed["threads"] >= 1 and speed["memory_bandwidth_bytes_s"] > 0 and speed["cpu_count"] >= 1
    assert len(speed["load_average_start"]) == 3 and len(speed["load_average_end"]) == 3
    floor = speed["noise_floor"]  # 2 position modes x 2 rounds of A/A pairs
    assert floor["pairs"] == 4 and floor["reason"] == "" and set(floor["pct"]) == {"TTFT", "TPOT", "Throughput"}
    assert all(value >= 0 for value in floor["pct"].values())


def test_a_resumed_passage_retimes_its_finished_baseline(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    run(config(tiny_model_dir, policies=["recent"]), out, progress=False)
    run(config(tiny_model_dir, policies=["recent", "streaming"]), out, resume=True, progress=False)
    timings = pl.read_parquet(out / "timings" / "*.parquet")
    later = timings.filter(pl.col("session") == 1)
    assert set(later["role"]) == {"cell", "baseline", "aa_control"}
    cells = pl.read_parquet(out / "cells" / "*.parquet")
    full_id = cells.filter(pl.col("policy") == "full")["cell_id"][0]
    assert set(later.filter(pl.col("role") == "baseline")["cell_id"]) == {full_id}


# -- settings ----------------------------------------------------------------------------------------------------
def test_prefill_chunk_must_fit_beside_the_kept_tokens(tiny_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--prefill-chunk 16 must be below the cache limit 16"):
        run(config(tiny_model_dir, prefill_chunk=16), tmp_path / "run", progress=False)
    with pytest.raises(ConfigError, match=r"--repeats must be 0 \(a quality-only run: no speed measured\) or more"):
        run(config(tiny_model_dir, repeats=-1), tmp_path / "run", progress=False)


def test_prefill_chunk_and_threads_are_recorded(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = run(
        config(tiny_model_dir, cache_sizes=[24], prefill_chunk=12, threads=1, repeats=1),
        tmp_path / "run",
        progress=False,
    )
    cells = pl.read_parquet(out / "cells" / "*.parquet")
    assert set(cells["prefill_chunk"]) == {12} and set(cells["threads"]) == {1}


def test_kv_read_bytes_counts_what_one_decode_step_attends() -> None:
    import torch

    from kvcompare.config import CacheConfig
    from kvcompare.engine.physics import kv_read_bytes, tpot_floor
    from kvcompare.engine.storage import CacheLayout

    layout = CacheLayout(num_layers=4, kv_heads=2, head_dim=8, dtype=torch.float32, device=torch.device("cpu"))
    per_token = 2 * 2 * 8 * 4  # keys and values, 2 heads of 8 float32
    assert kv_read_bytes(layout, CacheConfig(None, 8), 99) == per_token * 4 * 100
    # one skip layer holds all 100 tokens, three compressed layers hold the limit
    assert kv_read_bytes(layout, CacheConfig(16, 8, skip_layers=(0,)), 99) == per_token * (100 + 3 * 16)
    assert tpot_floor(1000, 1000, 1e6) == pytest.approx(2e-3) and tpot_floor(1, 1, None) is None
