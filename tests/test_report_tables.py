"""Aggregation, paired relative change, recommendations and loading, checked against hand-computed numbers."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from report_fixtures import cell, failed_cell, timed, write_run

from kvcompare.analysis import (
    ALL_RULES,
    Recommendation,
    aggregate,
    analyse,
    baseline_lengths,
    load_run,
    recommend,
    relative_changes,
    summary,
)
from kvcompare.cli import main
from kvcompare.report import ReportError, build_report
from kvcompare.report.tables import recommendation_table, relative_table


def _frame(run_dir: Path, rows: list[dict]) -> pl.DataFrame:
    return load_run(write_run(run_dir, rows)).cells


def _timed_recommendations(run_dir: Path, rows: list[dict], spread: float = 0.001) -> list[Recommendation]:
    """The recommendations of a run whose cells were timed in rounds (report_fixtures.timed): speed rules need
    trial pairs, whose intervals a tiny jitter keeps narrow."""
    cells, timings = timed(rows, spread=spread)
    return analyse(load_run(write_run(run_dir, cells, timings=timings))).recommendations


def _row(frame: pl.DataFrame, label: str, cache_size: int | None = None) -> dict:
    matches = frame.filter(pl.col("policy_label") == label)
    if cache_size is not None:
        matches = matches.filter(pl.col("cache_size") == cache_size)
    assert matches.height == 1
    return matches.row(0, named=True)


@pytest.fixture
def paired_cells(tmp_path: Path) -> pl.DataFrame:
    """Two samples whose baselines differ, so a paired mean differs from a ratio of means."""
    return _frame(
        tmp_path,
        [
            cell(
                "full",
                None,
                256,
                0,
                ppl=40.0,
                tpot_s=0.010,
                ttft_s=0.1,
                throughput_tok_s=100.0,
                accuracy=0.50,
            ),
            cell("full", None, 256, 1, ppl=50.0, tpot_s=0.020, ttft_s=0.2, throughput_tok_s=50.0, accuracy=0.40),
            cell(
                "streaming",
                64,
                256,
                0,
                ppl=44.0,
                tpot_s=0.008,
                ttft_s=0.1,
                throughput_tok_s=120.0,
                accuracy=0.49,
            ),
            cell(
                "streaming",
                64,
                256,
                1,
                ppl=50.0,
                tpot_s=0.010,
                ttft_s=0.1,
                throughput_tok_s=60.0,
                accuracy=0.38,
            ),
        ],
    )


def test_relative_change_is_paired_per_sample(paired_cells: pl.DataFrame) -> None:
    row = _row(relative_changes(paired_cells), "streaming")
    assert row["n_paired"] == 2
    # ppl: sample 0 44/40 -> +10%, sample 1 50/50 -> 0%; mean +5% (a ratio of means would give +4.44%)
    assert row["ppl_change_pct"] == pytest.approx(5.0)
    # tpot: 0.008/0.010 -> -20%, 0.010/0.020 -> -50%; mean -35%
    assert row["tpot_s_change_pct"] == pytest.approx(-35.0)
    # ttft: 0%, -50% -> -25%; throughput: +20%, +20% -> +20%
    assert row["ttft_s_change_pct"] == pytest.approx(-25.0)
    assert row["throughput_tok_s_change_pct"] == pytest.approx(20.0)
    # accuracy in % of the baseline accuracy: 0.49/0.50 -> -2%, 0.38/0.40 -> -5%; mean -3.5%
    assert row["accuracy_change_pct"] == pytest.approx(-3.5)


def test_aggregate_mean_std_n(paired_cells: pl.DataFrame) -> None:
    row = _row(aggregate(paired_cells), "full")
    assert row["n"] == 2
    assert row["ppl_mean"] == pytest.approx(45.0)
    assert row["ppl_std"] == pytest.approx(7.0710678)  # sample std of 40 and 50
    assert row["cache_size"] is None


def test_relative_table_formats_signed_percentages(paired_cells: pl.DataFrame) -> None:
    """Without raw timings (an old run) speed changes are per-sample means with no interval, and say so."""
    table = relative_table(summary(paired_cells), 256, has_baseline=True)
    no_interval = "(n=2, no interval)"
    assert table.rows == [
        [
            "streaming",
            "64",
            "2",
            "–",  # no trial pairs
            f"-25.0% {no_interval}",
            "–",  # no one-pass TTFT of full in these cells
            f"-35.0% {no_interval}",
            f"+20.0% {no_interval}",
            "+5.0%",
            "-3.5%",
        ]
    ]
    assert "negative TTFT/TPOT = faster" in table.note and "positive PPL = worse" in table.note


def test_sample_without_baseline_is_left_out_of_the_pairing(tmp_path: Path) -> None:
    cells = _frame(
        tmp_path,
        [
            cell("full", None, 256, 0, ppl=40.0),
            failed_cell("full", None, 256, 1, error="CUDA out of memory"),
            cell("recent", 32, 256, 0, ppl=44.0),
            cell("recent", 32, 256, 1, ppl=70.0),
        ],
    )
    row = _row(relative_changes(cells), "recent")
    assert row["n_paired"] == 1
    assert row["ppl_change_pct"] == pytest.approx(10.0)


def test_length_without_baseline_says_no_baseline(tmp_path: Path) -> None:
    cells = _frame(
        tmp_path,
        [
            cell("full", None, 256, 0),
            cell("l2", 32, 256, 0),
            cell("l2", 32, 512, 0),
            cell("l2", 32, 512, 1),
        ],
    )
    assert baseline_lengths(cells) == {256}
    table = relative_table(summary(cells), 512, has_baseline=False)
    assert table.rows == [] and "no baseline" in table.empty


def test_other_position_mode_has_no_baseline(tmp_path: Path) -> None:
    cells = _frame(tmp_path, [cell("full", None, 256, 0), cell("l2", 32, 256, 0, positions="shift")])
    table = relative_table(summary(cells), 256, has_baseline=True)
    assert table.rows == [["l2, positions=shift", "32", "0", "–", *["no baseline"] * 6]]


def _recommendation_cells(ppl_changes: dict[tuple[str, int], float]) -> list[dict]:
    """One sample at length 256: baseline ppl 100, tpot 0.01, throughput 100; policies at given changes."""
    rows = [cell("full", None, 256, 0, ppl=100.0, tpot_s=0.010, throughput_tok_s=100.0, peak_kv_bytes=4096)]
    for i, ((label, cache_size), change) in enumerate(ppl_changes.items()):
        rows.append(
            cell(
                label,
                cache_size,
                256,
                0,
                ppl=100.0 + change,
                tpot_s=0.009 - 0.001 * i,
                throughput_tok_s=110.0 + 10 * i,
                peak_kv_bytes=32 * cache_size,
            )
        )
    return rows


def test_recommendations_follow_the_rules(tmp_path: Path) -> None:
    recommendations = _timed_recommendations(
        tmp_path,
        _recommendation_cells(
            {
                ("streaming", 32): 3.0,  # smallest cache, but above the 2% quality limit; TPOT -10%
                ("recent", 64): 1.5,  # smallest cache within 2% -> quality first; TPOT -20%
                ("l2", 128): 0.5,  # best PPL, larger cache; TPOT -30%
                ("l2:mode=random", 128): 25.0,  # fastest (TPOT -40%) but beyond the 10% speed limit
            }
        ),
    )
    chosen = {
        r.scenario: (r.choice["policy_label"], r.choice["cache_size"]) if r.choice else r.reason
        for r in recommendations
    }
    assert chosen == {
        "quality first": ("recent", 64),
        "speed first": ("l2", 128),
        "memory-bound": ("streaming", 32),
        "long text": ("l2", 128),
    }


def test_no_qualifying_configuration_is_said_not_invented(tmp_path: Path) -> None:
    cells = _frame(tmp_path, _recommendation_cells({("streaming", 32): 20.0, ("l2", 64): 30.0}))
    recommendations = recommend(summary(cells), baseline_lengths(cells))
    by_scenario = {r.scenario: r for r in recommendations}
    assert by_scenario["quality first"].choice is None
    assert by_scenario["quality first"].reason == "no configuration within +2% PPL"
    assert by_scenario["speed first"].choice is None
    assert by_scenario["memory-bound"].choice is not None  # has no PPL ceiling by its rule
    rows = recommendation_table(recommendations).rows
    assert ["quality first", "256", "no configuration within +2% PPL", "–"] in rows


def test_rules_needing_a_baseline_say_so(tmp_path: Path) -> None:
    cells = _frame(tmp_path, [cell("streaming", 32, 512, 0)])
    reasons = {r.scenario: r.reason for r in recommend(summary(cells), baseline_lengths(cells))}
    assert reasons["quality first"] == "no baseline at this length"
    assert reasons["long text"] == "no baseline at this length"
    assert reasons["memory-bound"] == ""


def test_load_tolerates_missing_and_unreadable_files(tmp_path: Path) -> None:
    write_run(tmp_path / "no-cells", [])  # run.json only, as a run leaves it before its first cell
    empty = load_run(tmp_path / "no-cells")
    assert empty.cells.is_empty() and empty.curves.is_empty() and empty.meta["run_id"] == "test-run"
    write_run(tmp_path, [cell("full", None, 256, 0)])
    (tmp_path / "run.json").unlink()  # cells without run.json: still a results folder
    (tmp_path / "cells" / "half-written.parquet").write_bytes(b"PAR1 not really")
    run = load_run(tmp_path)
    assert run.cells.height == 1
    assert run.curves.is_empty()
    assert len(run.problems) == 1 and "half-written.parquet" in run.problems[0]
    assert run.meta == {}


def test_resumed_cell_keeps_the_successful_attempt(tmp_path: Path) -> None:
    failed = failed_cell("l2", 32, 256, 0, error="killed")
    failed["finished_at"] = "2025-01-02T00:00:00"
    write_run(tmp_path, [cell("l2", 32, 256, 0)])
    write_run(tmp_path / "retry", [failed])
    (tmp_path / "retry" / "cells" / "l2-32-256-0.parquet").rename(tmp_path / "cells" / "attempt-1.parquet")
    cells = load_run(tmp_path).cells
    assert cells.height == 1 and cells["status"].to_list() == ["ok"]


def _slower_than_full_cells() -> list[dict]:
    """Within the PPL limits, streaming is slower than full; l2 is faster but loses 30% PPL."""
    return [
        cell("full", None, 256, 0, ppl=100.0, tpot_s=0.010, throughput_tok_s=100.0),
        cell("streaming", 32, 256, 0, ppl=101.0, tpot_s=0.012, throughput_tok_s=90.0),
        cell("l2", 64, 256, 0, ppl=130.0, tpot_s=0.005, throughput_tok_s=200.0),
    ]


def test_speed_is_not_recommended_when_nothing_beat_full(tmp_path: Path) -> None:
    by_scenario = {r.scenario: r for r in _timed_recommendations(tmp_path, _slower_than_full_cells())}
    assert by_scenario["speed first"].choice is None
    assert by_scenario["speed first"].reason.startswith("nothing beat full significantly on TPOT at this length")
    assert by_scenario["long text"].choice is None
    assert by_scenario["long text"].reason.startswith("nothing beat full significantly on Throughput at this length")
    assert by_scenario["quality first"].choice is not None  # streaming stays within +2% PPL
    rows = recommendation_table(list(by_scenario.values())).rows
    assert ["speed first", "256", by_scenario["speed first"].reason, "–"] in rows


def test_speed_rules_take_only_configurations_faster_than_full(tmp_path: Path) -> None:
    """A faster configuration within the limit wins even when a slower one has a better PPL."""
    rows = [
        *_slower_than_full_cells(),
        cell("recent", 64, 256, 0, ppl=105.0, tpot_s=0.0099, throughput_tok_s=100.5),
    ]
    chosen = {r.scenario: r.choice for r in _timed_recommendations(tmp_path, rows)}
    speed, long_text = chosen["speed first"], chosen["long text"]
    assert speed is not None and speed["policy_label"] == "recent" and speed["tpot_s_change_pct"] < 0
    assert long_text is not None and long_text["policy_label"] == "recent"
    assert long_text["throughput_tok_s_change_pct"] > 0


def test_speed_rule_texts_say_significant_and_beyond_the_noise_floor() -> None:
    texts = {rule.scenario: rule.text for rule in ALL_RULES}
    assert (
        "TPOT change against full is significant and below 0 (its 95% interval over paired trials entirely below 0"
        in (texts["speed first"])
    )
    assert "Throughput change against full is significant and above 0" in texts["long text"]
    assert all("beyond the run's noise floor" in texts[s] for s in ("speed first", "long text"))


@pytest.mark.parametrize("kind", ["missing", "file", "empty"])
def test_not_a_results_folder_is_refused(tmp_path: Path, kind: str) -> None:
    run_dir = tmp_path / "run"
    if kind == "file":
        run_dir.write_text("not a folder")
    elif kind == "empty":
        run_dir.mkdir()
        (run_dir / "curves").mkdir()  # curves alone do not make a results folder
    why = {"missing": "it does not exist", "file": "it is not a folder", "empty": r"no run\.json, no cells/\*\.parquet"}
    with pytest.raises(ReportError, match=rf"is not a kvcompare results folder \({why[kind]}\)"):
        load_run(run_dir)
    with pytest.raises(ReportError, match="give the folder a `kvcompare run --out` wrote"):
        build_report(run_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not (run_dir / "report").exists()


def test_cli_report_of_missing_folder_exits_2_and_creates_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "no-such-run"
    assert main(["report", str(missing)]) == 2
    assert not missing.exists()
    err = capsys.readouterr().err
    assert err.startswith(f"kvcompare: error: {missing} is not a kvcompare results folder")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["report", str(empty), "--out", str(tmp_path / "out")]) == 2
    assert list(empty.iterdir()) == [] and not (tmp_path / "out").exists()


def test_old_cell_files_without_context_columns_load(tmp_path: Path) -> None:
    """Cells written before max_positions/beyond_context existed load next to new ones, as nulls."""
    write_run(tmp_path, [cell("full", None, 256, 0), cell("l2", 32, 256, 0, max_positions=8192, beyond_context=False)])
    old = tmp_path / "cells" / "full-None-256-0.parquet"
    pq.write_table(pq.read_table(old).drop_columns(["max_positions", "beyond_context"]), old)
    assert "beyond_context" not in pq.read_schema(old).names
    cells = load_run(tmp_path).cells.sort("policy")
    assert cells.schema["beyond_context"] == pl.Boolean and cells.schema["max_positions"] == pl.Int64
    assert cells["beyond_context"].to_list() == [None, False]
    assert cells["max_positions"].to_list() == [None, 8192]
    only_old = tmp_path / "only-old"
    (only_old / "cells").mkdir(parents=True)
    pq.write_table(
        pa.Table.from_pylist([cell("full", None, 256, 0)]).drop_columns(["beyond_context"]),
        only_old / "cells" / "a.parquet",
    )
    assert load_run(only_old).cells["beyond_context"].to_list() == [None]


def test_beyond_context_notice_names_each_length_once(tmp_path: Path) -> None:
    from kvcompare.report.notices import beyond_context_notices

    cells = _frame(
        tmp_path,
        [
            cell("full", None, 9000, 0, max_positions=8192, beyond_context=True),
            cell("full", None, 9000, 1, max_positions=8192, beyond_context=True),
            cell("l2", 32, 9000, 0, max_positions=8192, beyond_context=True),
            cell("full", None, 4000, 0, max_positions=8192, beyond_context=False),
        ],
    )
    assert beyond_context_notices(cells) == [
        "Length 9000 goes beyond the model's 8192 trained positions (prompt + generated tokens of the latency pass): "
        "the full cache is then outside what the model was trained for, which is an experiment, not a typical use."
    ]
