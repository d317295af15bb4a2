"""Speed from the raw timings: trials paired within a session and round, intervals, the A/A noise floor,
significance in every table, and speed recommendations that refuse what the noise could explain."""

from __future__ import annotations

import re
from html import unescape
from pathlib import Path

import polars as pl
import pytest
from report_fixtures import cell, synthetic_run, timed, trial_rows, write_run

from kvcompare.analysis import (
    NOISE_CHANGES,
    THROUGHPUT_CHANGE,
    TPOT_CHANGE,
    TTFT_CHANGE,
    TTFT_ONESHOT_CHANGE,
    RunData,
    analyse,
    estimate,
    load_run,
    noise_floor,
    relative_changes,
    trial_figures,
)
from kvcompare.report import build_report, summary_table
from kvcompare.report.formatting import format_estimate
from kvcompare.report.notices import load_notices, noise_line
from kvcompare.report.tables import absolute_table, physics_table, relative_table
from kvcompare.stats import Estimate, mean_estimate

FULL = cell("full", None, 256, 0)
STREAMING = cell("streaming", 64, 256, 0)
STEPS = 4


def trial(row: dict, round_index: int, ttft: float, step: float, role: str = "cell", session: int = 0) -> list[dict]:
    """A trial whose counted steps all take `step` seconds: its TPOT is `step`, its throughput 1 / `step`."""
    return trial_rows(row, role, round_index, ttft, [step] * STEPS, session=session)


def rounds(row: dict, steps: list[float], role: str = "cell", ttft: float = 1.0) -> list[dict]:
    """One trial per round, round r with steps of `steps[r]` seconds."""
    return [t for r, step in enumerate(steps) for t in trial(row, r, ttft, step, role)]


def _only(frame: pl.DataFrame, label: str) -> dict:
    rows = frame.filter(pl.col("policy_label") == label)
    assert rows.height == 1
    return rows.row(0, named=True)


def _run(tmp_path: Path, cells: list[dict], timings: list[dict]) -> RunData:
    return load_run(write_run(tmp_path, cells, timings=timings))


# --- Pairing ------------------------------------------------------------------------------------------------


def test_a_trial_is_its_ttft_its_median_step_and_steps_over_their_time(tmp_path: Path) -> None:
    rows = trial_rows(FULL, "cell", 0, 0.5, [0.01, 0.03, 0.02])
    rows += trial_rows(FULL, "cell", 0, 0.2, [], kind="ttft_oneshot")
    figures = trial_figures(_run(tmp_path, [FULL], rows).timings).row(0, named=True)
    assert figures["ttft_s"] == 0.5 and figures["ttft_oneshot_s"] == 0.2
    assert figures["tpot_s"] == pytest.approx(0.02)
    assert figures["throughput_tok_s"] == pytest.approx(3 / 0.06)


def test_speed_change_pairs_each_trial_with_full_of_its_session_and_round(tmp_path: Path) -> None:
    """Two rounds: TTFT -10% and -20%, TPOT -20% and -10%; the cells' own figures (equal) are not used."""
    timings = [
        *trial(FULL, 0, 1.0, 0.010),
        *trial(FULL, 1, 1.0, 0.010),
        *trial(STREAMING, 0, 0.9, 0.008),
        *trial(STREAMING, 1, 0.8, 0.009),
    ]
    run = _run(tmp_path, [FULL, STREAMING], timings)
    row = _only(relative_changes(run.cells, run.timings), "streaming")
    assert row["speed_from_trials"] is True
    # a bootstrap of two pairs resamples {a, a}, {a, b}, {b, b}: its 95% interval is [min, max]
    assert estimate(row, TTFT_CHANGE) == Estimate(pytest.approx(-15.0), pytest.approx(-20.0), pytest.approx(-10.0), 2)
    assert estimate(row, TPOT_CHANGE) == Estimate(pytest.approx(-15.0), pytest.approx(-20.0), pytest.approx(-10.0), 2)
    throughput = estimate(row, THROUGHPUT_CHANGE)  # 1/0.008 = 125 (+25%), 1/0.009 = 111.1 (+11.1%)
    assert throughput.value == pytest.approx((25.0 + 100 / 9) / 2) and throughput.significant
    assert row[TTFT_ONESHOT_CHANGE.n] == 0  # no one-pass trial of full in these timings


def test_pairs_never_cross_sessions_or_rounds(tmp_path: Path) -> None:
    timings = [
        *trial(FULL, 0, 1.0, 0.010),
        *trial(FULL, 1, 1.0, 0.010),
        *trial(STREAMING, 0, 0.9, 0.008),
        *trial(STREAMING, 1, 0.8, 0.009),
        *trial(STREAMING, 0, 0.1, 0.001, session=1),  # session 1 timed no full: left out, not paired with session 0
        *trial(STREAMING, 2, 0.1, 0.001),  # round 2 has no full trial: left out
        *trial(FULL, 0, 1.0, 0.010, role="baseline", session=2),  # full re-timed on a later --resume
        *trial(STREAMING, 0, 0.7, 0.010, session=2),  # paired with that re-timed baseline: -30% TTFT
    ]
    run = _run(tmp_path, [FULL, STREAMING], timings)
    found = estimate(_only(relative_changes(run.cells, run.timings), "streaming"), TTFT_CHANGE)
    assert found.n == 3 and found.value == pytest.approx(-20.0)  # -10, -20, -30


def test_failed_cells_trials_are_not_paired(tmp_path: Path) -> None:
    failed = {**STREAMING, "status": "failed", "error": "boom"}
    run = _run(tmp_path, [FULL, failed], [*trial(FULL, 0, 1.0, 0.01), *trial(failed, 0, 0.5, 0.005)])
    assert relative_changes(run.cells, run.timings).is_empty()


# --- Noise floor --------------------------------------------------------------------------------------------


def test_noise_floor_from_aa_trials(tmp_path: Path) -> None:
    aa = rounds(FULL, [0.0101, 0.0099, 0.0102], role="aa_control")  # TPOT +1%, -1%, +2% against full
    run = _run(tmp_path, [FULL, STREAMING], [*rounds(FULL, [0.010] * 3), *aa])
    noise = noise_floor(run.cells, run.timings)
    expected = mean_estimate([1.0, -1.0, 2.0])
    assert noise.changes[TPOT_CHANGE.column] == Estimate(
        pytest.approx(expected.value), pytest.approx(expected.low), pytest.approx(expected.high), 3
    )
    assert expected.low is not None and expected.high is not None
    floor = max(abs(expected.low), abs(expected.high))
    assert noise.floor(TPOT_CHANGE) == pytest.approx(floor)
    assert noise.floor(TTFT_CHANGE) == 0.0  # every A/A TTFT equals full's: a zero-width interval
    assert noise.pairs == 3 and noise.reason == ""
    throughput = noise.floor(THROUGHPUT_CHANGE)
    assert throughput is not None
    assert noise_line(noise) == (
        f"**Noise floor:** speed differences smaller than ±0.0% (TTFT), ±{floor:.1f}% (TPOT) and "
        f"±{throughput:.1f}% (Throughput) are not distinguishable on this machine in this run (per metric: the "
        "larger of |low| and |high| of the 95% interval of the A/A control's change, `full` timed twice in the "
        "same round, over 3 pairs)."
    )
    assert [r["seq_len"] for r in noise.by_length.iter_rows(named=True)] == [256]


@pytest.mark.parametrize(
    ("timings", "reason"),
    [
        pytest.param(None, "the run has no raw timings (`timings/`; it predates repeated latency trials)", id="old"),
        pytest.param(rounds(FULL, [0.01, 0.01]), "the run recorded no A/A control trials", id="no-aa"),
        pytest.param(
            [*rounds(FULL, [0.01]), *rounds(FULL, [0.0101], role="aa_control")],
            "there is only 1 A/A pair (one round of one passage), and an interval needs at least two",
            id="one-round",
        ),
        pytest.param(
            [*rounds(FULL, [0.01]), *trial(FULL, 0, 1.0, 0.0101, role="aa_control", session=1)],
            "no A/A control trial has a successful `full` trial of the same passage, session and round to pair with",
            id="other-session",
        ),
    ],
)
def test_noise_floor_not_measured_says_why(tmp_path: Path, timings: list[dict] | None, reason: str) -> None:
    run = _run(tmp_path, [FULL, STREAMING], timings or [])
    noise = noise_floor(run.cells, run.timings if timings else None)
    assert not noise.measured and noise.reason == reason
    assert noise_line(noise) == (
        f"**Noise floor:** could not be measured in this run, because {reason}; speed changes are judged by their "
        "own intervals only."
    )


# --- Tables -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("found", "text"),
    [
        (Estimate(-12.3, -15.1, -9.0, 10), "-12.3% [-15.1, -9.0]"),
        (Estimate(2.1, -3.0, 7.4, 10), "≈ +2.1% [-3.0, +7.4]"),
        (Estimate(2.1, None, None, 1), "+2.1% (n=1, no interval)"),
        (Estimate(None, None, None, 0), "–"),
    ],
)
def test_format_estimate(found: Estimate, text: str) -> None:
    assert format_estimate(found) == text


def _significance_run(tmp_path: Path) -> Path:
    """streaming: TPOT -20% every round (significant); l2: +5, -3, +4 (interval spans 0); recent: one round."""
    l2, recent = cell("l2", 64, 256, 0), cell("recent", 64, 256, 0)
    timings = [
        *rounds(FULL, [0.010, 0.010, 0.010]),
        *rounds(STREAMING, [0.008, 0.0081, 0.0079]),
        *rounds(l2, [0.0105, 0.0097, 0.0104]),
        *rounds(recent, [0.0095]),
    ]
    return write_run(tmp_path / "run", [FULL, STREAMING, l2, recent], timings=timings)


def test_significance_is_marked_in_markdown_html_and_terminal(tmp_path: Path) -> None:
    run_dir = _significance_run(tmp_path)
    l2 = mean_estimate([5.0, -3.0, 4.0])
    streaming = mean_estimate([-20.0, -19.0, -21.0])
    assert l2.low is not None and l2.high is not None and streaming.low is not None and streaming.high is not None
    not_significant = f"≈ +2.0% [{l2.low:+.1f}, {l2.high:+.1f}]"
    significant = f"-20.0% [{streaming.low:+.1f}, {streaming.high:+.1f}]"
    single = "-5.0% (n=1, no interval)"
    paths = build_report(run_dir)
    markdown, html = paths.markdown.read_text(), unescape(paths.html.read_text())
    terminal = summary_table(run_dir)
    for text in (markdown, html, terminal):
        assert not_significant in text and significant in text and single in text
        assert f"≈ {significant}" not in text and f"≈ {single}" not in text
    assert terminal.startswith("**Noise floor:** could not be measured in this run, because the run recorded no A/A")
    table = relative_table(analyse(load_run(run_dir)).summary, 256, has_baseline=True)
    assert [row[0] for row in table.rows] == ["l2", "recent", "streaming"]
    assert [row[3] for row in table.rows] == ["3", "1", "3"]  # speed pairs


def test_absolute_and_physics_tables_show_intervals_and_floor(tmp_path: Path) -> None:
    cells, timings = timed([FULL, STREAMING])
    stats = analyse(_run(tmp_path, cells, timings)).summary
    full = next(c for c in cells if c["policy"] == "full")
    absolute = absolute_table(stats, 256)
    ttft = absolute.headers.index("TTFT (s)")
    assert absolute.rows[0][ttft] == f"{full['ttft_s']:.4f} [{full['ttft_ci_low']:.4f}, {full['ttft_ci_high']:.4f}]"
    oneshot = absolute.headers.index("TTFT one pass (s)")
    assert absolute.rows[0][oneshot].startswith(f"{full['ttft_oneshot_s']:.4f} [")
    assert absolute.rows[1][oneshot] == "–"  # only full prefills in one pass
    assert "range the samples' intervals cover" in absolute.note
    physics = physics_table(stats, 256, {"speed": {"memory_bandwidth_bytes_s": 1e9}})
    # full reads 257 tokens × 4096 B = 1.00 MiB of KV and 8 MiB of weights: (8 MiB + 1 MiB) / 1 GB/s = 9.44 ms
    assert physics.rows[0][:4] == ["full", "1.00", "8.00", "9.44"]
    assert physics.rows[0][4].startswith(f"{full['tpot_s'] * 1000:.2f} [") and physics.rows[0][5] == "×1.1"
    assert physics.rows[1][:2] == ["streaming @ 64", "0.25"]
    assert "(1.0 GB/s)" in physics.note


def test_old_run_without_timings_falls_back_and_says_so(tmp_path: Path) -> None:
    paths = build_report(write_run(tmp_path / "run", [FULL, cell("streaming", 64, 256, 0, tpot_s=0.005)]))
    markdown = paths.markdown.read_text()
    assert "> **Note:** This run has no raw trial timings (`timings/`) paired with `full`" in markdown
    assert "| streaming | 64 | 1 | – | +0.0% (n=1, no interval) | – | -50.0% (n=1, no interval) |" in markdown
    assert "nothing beat full significantly on TPOT at this length" in markdown


# --- Recommendations ----------------------------------------------------------------------------------------


def _speed_first(tmp_path: Path, cells: list[dict], timings: list[dict]) -> tuple[str | None, str]:
    (choice, reason), *_ = [
        (r.choice["policy_label"] if r.choice else None, r.reason)
        for r in analyse(_run(tmp_path, cells, timings)).recommendations
        if r.scenario == "speed first"
    ]
    return choice, reason


def test_speed_first_refuses_a_gain_whose_interval_includes_zero(tmp_path: Path) -> None:
    l2 = cell("l2", 64, 256, 0)
    timings = [*rounds(FULL, [0.010] * 3), *rounds(l2, [0.0095, 0.0101, 0.0094])]  # -5%, +1%, -6%
    assert not mean_estimate([-5.0, 1.0, -6.0]).significant
    choice, reason = _speed_first(tmp_path, [FULL, l2], timings)
    assert choice is None and reason.startswith("nothing beat full significantly on TPOT at this length")


def test_speed_first_takes_a_significant_gain(tmp_path: Path) -> None:
    l2 = cell("l2", 64, 256, 0)
    timings = [
        *rounds(FULL, [0.010] * 3),
        *rounds(l2, [0.0095, 0.0101, 0.0094]),  # the larger mean gain, but not significant
        *rounds(STREAMING, [0.0098, 0.0097, 0.0098]),  # -2%, -3%, -2%: significant
    ]
    assert _speed_first(tmp_path, [FULL, l2, STREAMING], timings) == ("streaming", "")


def test_speed_first_refuses_a_significant_gain_inside_the_noise_floor(tmp_path: Path) -> None:
    timings = [
        *rounds(FULL, [0.010] * 3),
        *rounds(FULL, [0.0103, 0.0097, 0.0102], role="aa_control"),  # A/A: +3%, -3%, +2%: floor about 3%
        *rounds(STREAMING, [0.0099, 0.00989, 0.00991]),  # -1%: significant, but inside the floor
    ]
    run = _run(tmp_path, [FULL, STREAMING], timings)
    assert estimate(_only(analyse(run).summary, "streaming"), TPOT_CHANGE).significant
    choice, reason = _speed_first(tmp_path, [FULL, STREAMING], timings)
    assert choice is None
    assert reason == "no significant TPOT gain at this length is larger than the run's noise floor for TPOT"


def test_recommendation_evidence_shows_intervals(tmp_path: Path) -> None:
    markdown = build_report(_significance_run(tmp_path)).markdown.read_text()
    line = next(line for line in markdown.splitlines() if line.startswith("| speed first | 256 |"))
    assert "streaming @ 64" in line and "TPOT -20.0% [" in line


# --- Reading order and notices ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synthetic_report(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    paths = build_report(synthetic_run(tmp_path_factory.mktemp("run")))
    return paths.markdown.read_text(), paths.html.read_text()


def test_headline_comes_first(synthetic_report: tuple[str, str]) -> None:
    markdown, html = synthetic_report
    body = html.split("<body>", 1)[1].split("<script>", 1)[0]
    assert re.findall(r"<h2>(.*?)</h2>", body)[0] == "Summary"
    for text in (markdown, body):
        order = [
            "What was compared",
            "3 per cell, in interleaved rounds",
            "Noise floor:",
            "Recommended configurations",
            "A/A control (noise floor)",
            "Relative change vs full, length 256 tokens",
            "Absolute values, length 256 tokens",
            "Physics of a decode step, length 256 tokens",
        ]
        positions = [text.index(item) for item in order]
        assert positions == sorted(positions)
    assert "not distinguishable on this machine in this run" in markdown.split("## Results by length")[0]


def test_protocol_is_last_and_collapsed_in_html(synthetic_report: tuple[str, str]) -> None:
    markdown, html = synthetic_report
    body = html.split("<body>", 1)[1].split("<script>", 1)[0]
    assert re.findall(r"<h2>(.*?)</h2>", body)[-1] == "Protocol"
    opened = body.index("<details><summary><h2>Protocol</h2></summary>")
    assert opened < body.index("<strong>Cache limit.</strong>") < body.index("</details>", opened)
    assert body.count("<details>") == 1 and body.rstrip().endswith("</details>")
    assert re.findall(r"^## (.*)$", markdown, flags=re.M)[-1] == "Protocol"


def test_load_above_the_cores_is_warned(tmp_path: Path) -> None:
    busy = {"threads": 2, "load_average_start": [3.5, 2.0, 1.0], "load_average_end": [1.5, 1.0, 1.0]}
    assert load_notices({"speed": busy}) == [
        "The 1-minute load average was 3.5 at the start of the run, above the 2 threads the run used (run.json "
        "records no core count): other work competed for the processor, so speed figures may be slower and "
        "noisier than this machine allows."
    ]
    assert load_notices({"speed": {**busy, "cpu_count": 4}}) == []
    both = load_notices({"speed": {**busy, "cpu_count": 1}})  # and 2 threads on 1 CPU: oversubscribed too
    assert len(both) == 2 and "2 torch threads on 1 CPUs" in both[0]
    assert "3.5 at the start and 1.5 at the end of the run, above the 1 CPU cores" in both[1]
    assert load_notices({}) == []
    eager, compiled = (load_notices({"speed": busy, "config": {"compile": c, "device": "cpu"}}) for c in (False, True))
    assert "eager CPU steps took about 8 times as long" in eager[0] and "compiled" not in eager[0]
    assert "compiled CPU steps suffer far more than eager ones" in compiled[0] and "over 100 times" in compiled[0]
    paths = build_report(write_run(tmp_path, [FULL], speed=busy))
    assert "> **Note:** The 1-minute load average was 3.5" in paths.markdown.read_text()


def test_noise_changes_are_the_like_for_like_speed_changes() -> None:
    assert [c.title for c in NOISE_CHANGES] == ["TTFT", "TPOT", "Throughput"]
