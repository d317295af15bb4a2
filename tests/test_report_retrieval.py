"""Passkey probes in the report: kept apart from the PPL cells, aggregated by hand-checkable numbers, shown in a
section of their own with a heat map per policy, and weighed by the quality-first recommendation."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from report_fixtures import cell, channels, failed_cell, probe, spec_rows, write_run

from kvcompare.analysis import (
    ALL_RULES,
    QUALITY_FIRST,
    QUALITY_FIRST_WITH_RETRIEVAL,
    RunData,
    analyse,
    load_run,
    retrieval_by_config,
    retrieval_by_probe,
    retrieval_gaps,
    summary,
)
from kvcompare.report import ReportPaths, build_report, summary_table
from kvcompare.report.document import Definitions, Table
from kvcompare.report.sections import assemble
from kvcompare.report.tables import relative_table
from kvcompare.report.task_tables import retrieval_table
from kvcompare.report.wording import RETRIEVAL_HEADING
from kvcompare.schema import RESULT_SCHEMA

DEPTHS = (0.0, 0.5, 1.0)

#: Length 256, one sample: full; streaming loses 1% PPL at limit 32; recent loses 1.5% at limit 64.
PPL_CELLS = [
    cell("full", None, 256, 0, ppl=100.0, task="ppl"),
    cell("streaming", 32, 256, 0, ppl=101.0),  # task null: a row written before tasks existed
    cell("recent", 64, 256, 0, ppl=101.5, task="ppl"),
]


def _probes(label: str, cache_size: int | None, answers: list[bool], seq_len: int = 256, **fields: Any) -> list[dict]:
    """One probe per answer, spread over DEPTHS in turn, a new sample each time round."""
    return [
        probe(label, cache_size, seq_len, DEPTHS[i % len(DEPTHS)], i // len(DEPTHS), correct, **fields)
        for i, correct in enumerate(answers)
    ]


#: full always finds the key; streaming @ 32 finds it at depth 0, once of two at 0.5, never at 1 (one failed).
PROBES = [
    *_probes("full", None, [True] * 6),
    *_probes("streaming", 32, [True, True, False, True, False, False]),
    probe("streaming", 32, 256, 1.0, 2, False, status="failed", error="boom", correct=None),
    *_probes("recent", 64, [True] * 6),
]


def _only(frame: pl.DataFrame, **keys: Any) -> dict[str, Any]:
    found = frame
    for column, value in keys.items():
        found = found.filter(pl.col(column).eq_missing(value))
    assert found.height == 1, found
    return found.row(0, named=True)


# --- Loading: probes apart, PPL cells as before ---------------------------------------------------------------


def test_probes_are_kept_apart_and_leave_the_ppl_tables_unchanged(tmp_path: Path) -> None:
    without = load_run(write_run(tmp_path / "ppl", PPL_CELLS))
    run = load_run(write_run(tmp_path / "both", [*PPL_CELLS, *PROBES]))
    assert run.cells.height == 3 and set(run.cells["policy_label"]) == {"full", "streaming", "recent"}
    assert run.retrieval.height == len(PROBES) and set(run.retrieval["task"]) == {"passkey"}
    # every RESULT_SCHEMA column, and the needle's depth from probe_params
    assert run.retrieval.drop("depth").schema == without.cells.schema
    assert run.retrieval["depth"].null_count() == 0
    assert summary(run.cells).equals(summary(without.cells))
    assert relative_table(summary(run.cells), 256, True) == relative_table(summary(without.cells), 256, True)
    assert without.retrieval.is_empty() and without.retrieval.drop("depth").columns == RESULT_SCHEMA.names


def test_run_data_built_without_probes_has_an_empty_retrieval() -> None:
    empty = pl.DataFrame()
    run = RunData(Path("run"), {}, empty, empty, empty)
    assert run.retrieval.is_empty() and run.retrieval.columns == RESULT_SCHEMA.names


# --- Aggregation ------------------------------------------------------------------------------------------------


def test_accuracy_per_length_and_depth(tmp_path: Path) -> None:
    by_probe = retrieval_by_probe(load_run(write_run(tmp_path, [*PPL_CELLS, *PROBES])).retrieval)
    streaming = {r["depth"]: r for r in by_probe.filter(pl.col("policy") == "streaming").iter_rows(named=True)}
    assert {d: (r["accuracy_pct"], r["n"], r["failed"]) for d, r in streaming.items()} == {
        0.0: (100.0, 2, 0),
        0.5: (50.0, 2, 0),
        1.0: (0.0, 2, 1),  # the failed probe is counted beside n, not as wrong
    }
    assert streaming[0.5]["logprob_mean"] == pytest.approx((-0.5 - 6.0) / 2)
    assert by_probe["policy"].to_list()[:3] == ["full"] * 3  # the baseline first


def test_accuracy_per_configuration_over_every_probe(tmp_path: Path) -> None:
    overall = retrieval_by_config(load_run(write_run(tmp_path, [*PPL_CELLS, *PROBES])).retrieval)
    assert overall["policy_label"].to_list() == ["full", "recent", "streaming"]
    row = _only(overall, policy_label="streaming")
    assert (row["accuracy_pct"], row["n"], row["failed"]) == (50.0, 6, 1)
    assert row["logprob_mean"] == pytest.approx((3 * -0.5 + 3 * -6.0) / 6)
    assert _only(overall, policy_label="full")["accuracy_pct"] == 100.0


def test_gap_to_full_counts_only_lengths_and_modes_both_were_probed_at(tmp_path: Path) -> None:
    rows = [
        *_probes("full", None, [True] * 3),
        *_probes("full", None, [False] * 3, positions="shift"),  # another mode's baseline: not this one's
        *_probes("full", None, [False] * 3, seq_len=512, positions="shift"),
        *_probes("l2", 32, [True, True, False]),
        *_probes("l2", 32, [False] * 3, seq_len=512),  # this mode's full was never probed at 512: left out
    ]
    gap = _only(retrieval_gaps(load_run(write_run(tmp_path, rows)).retrieval), policy_label="l2")
    assert gap["retrieval_pct"] == pytest.approx(200 / 3)
    assert gap["retrieval_full_pct"] == 100.0
    assert gap["retrieval_gap_pts"] == pytest.approx(100 / 3)


def _variant(label: str, cache_size: int | None, haystack: str, sample_id: int, score: float) -> dict:
    """One probe of RULER's niah_single in the variant that ``haystack`` names."""
    return probe(
        label,
        cache_size,
        256,
        0.5,
        sample_id,
        score == 1.0,
        task="niah_single",
        task_params=json.dumps({"haystack": haystack, "needles": 1}, sort_keys=True),
        source=f"niah_single:{haystack}:{sample_id}",
        score=score,
        cell_id=f"niah-{haystack}-{label}-{sample_id}",
    )


def test_variants_of_one_task_are_scored_apart_and_named(tmp_path: Path) -> None:
    """`--task niah_single,niah_single:haystack=text`: one task, two variants (task_params). The score across
    tasks and the tasks' tables keep them apart, named by what tells them apart, rather than one niah_single
    averaging both; recent @ 64 finds every needle in noise and none in text."""
    rows = [
        *(_variant("full", None, haystack, sample, 1.0) for haystack in ("noise", "text") for sample in (0, 1)),
        *(_variant("recent", 64, "noise", sample, 1.0) for sample in (0, 1)),
        *(_variant("recent", 64, "text", sample, 0.0) for sample in (0, 1)),
    ]
    markdown = build_report(write_run(tmp_path, [*PPL_CELLS, *rows])).markdown.read_text()
    across = markdown.split("### Score across tasks", 1)[1].split("###", 1)[0]
    assert "| Mean score (%) | niah_single:haystack=noise | niah_single:haystack=text |" in across
    assert "| full | – | 100.0 | 100.0 | 100.0 |" in across and "| recent | 64 | 50.0 | 100.0 | 0.0 |" in across
    noise = markdown.split("### Task niah_single:haystack=noise", 1)[1].split("###", 1)[0]
    text = markdown.split("### Task niah_single:haystack=text", 1)[1].split("###", 1)[0]
    assert "| recent | 64 | 100.0 | 100.0 | 2 | 100.0 |" in noise and "| recent | 64 | 0.0 | 0.0 | 2 | 0.0 |" in text
    assert "### Task niah_single\n" not in markdown
    assert "; lengths 256 tokens, 2 probes per task and length" in markdown


def _passkey_variant(label: str, cache_size: int | None, haystack: str, answers: list[bool]) -> list[dict]:
    """Probes of passkey in the variant that ``haystack`` names (`--task passkey,passkey:haystack=text`)."""
    params = json.dumps({"depths": list(DEPTHS), "haystack": haystack}, sort_keys=True)
    return [
        {**row, "cell_id": f"{haystack}-{row['cell_id']}"}
        for row in _probes(label, cache_size, answers, task_params=params)
    ]


def test_gap_to_full_is_taken_per_variant_then_averaged_over_variants(tmp_path: Path) -> None:
    """Each variant of passkey is compared with full on the same variant, and a configuration's figures are the
    mean over its variants (as over tasks), not its probes pooled. full finds every key in repeat, 2 of 3 in text;
    recent @ 64 finds its 3 in repeat and misses its one text probe; l2 @ 32 was probed in repeat only."""
    rows = [
        *_passkey_variant("full", None, "repeat", [True] * 3),
        *_passkey_variant("full", None, "text", [True, True, False]),
        *_passkey_variant("recent", 64, "repeat", [True] * 3),
        *_passkey_variant("recent", 64, "text", [False]),
        *_passkey_variant("l2", 32, "repeat", [True] * 3),
    ]
    gaps = retrieval_gaps(load_run(write_run(tmp_path, rows)).retrieval)
    recent = _only(gaps, policy_label="recent")  # pooled it would be 3/4 = 75% against full's 5/6, 8.3 points
    assert recent["retrieval_pct"] == pytest.approx((100 + 0) / 2)
    assert recent["retrieval_full_pct"] == pytest.approx((100 + 200 / 3) / 2)
    assert recent["retrieval_gap_pts"] == pytest.approx(100 / 3)
    l2 = _only(gaps, policy_label="l2")  # against full in repeat alone: full's text probes are another variant's
    assert (l2["retrieval_pct"], l2["retrieval_full_pct"], l2["retrieval_gap_pts"]) == (100.0, 100.0, 0.0)


# --- The section and its heat maps --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def probed_report(tmp_path_factory: pytest.TempPathFactory) -> ReportPaths:
    return build_report(write_run(tmp_path_factory.mktemp("run"), [*PPL_CELLS, *PROBES]))


def _headings(markdown: str) -> list[str]:
    return re.findall(r"^## (.*)$", markdown, flags=re.M)


def test_section_follows_the_results_in_both_renderings(probed_report: ReportPaths) -> None:
    markdown, html = probed_report.markdown.read_text(), probed_report.html.read_text()
    headings = _headings(markdown)
    assert headings.index(RETRIEVAL_HEADING) == headings.index("Results by length") + 1
    assert f"<h2>{RETRIEVAL_HEADING}</h2>" in html
    section = markdown.split(f"## {RETRIEVAL_HEADING}", 1)[1].split("\n## ", 1)[0]
    assert "A probe is one prompt" in section and "greedy decoding gives the key exactly" in section
    assert "teacher-forced log-probability of the key's tokens" in section
    assert "| Policy | Cache limit (tokens) | Accuracy (%) | n | Mean log-prob of the key | depth 0 | depth 0.5 " in (
        section
    )
    assert "| full | – | 100.0 | 6 | -0.50 | 100.0 | 100.0 | 100.0 |" in section
    assert "| streaming | 32 | 50.0 | 6 (+1 failed) | -3.25 | 100.0 | 50.0 | 0.0 |" in section
    assert "![Passkey retrieval: streaming]" in section  # the heat maps are in the section, not under Charts
    assert "passkey at depth 1" in markdown  # the failed probe is listed with the failed cells
    assert (
        "- **passkey retrieval**: recent, streaming against `full` at cache limits 32, 64; lengths 256 tokens, "
        "needle depths 0, 0.5, 1, 3 keys per length and depth" in markdown
    )
    assert "| 22 | 21 | 1 | 0 |" in markdown  # cells planned, ok and failed count the probes too


def test_no_probes_no_section(tmp_path: Path) -> None:
    paths = build_report(write_run(tmp_path, PPL_CELLS))
    markdown = paths.markdown.read_text()
    assert RETRIEVAL_HEADING not in _headings(markdown)
    before_protocol = markdown.split("\n## Protocol", 1)[0].lower()  # the protocol describes every task
    assert "passkey" not in before_protocol and "retriev" not in before_protocol
    assert not any(p.name.startswith("passkey") for p in paths.specs)


def _heat_maps(paths: ReportPaths) -> dict[str, dict[str, Any]]:
    return {p.name: json.loads(p.read_text()) for p in paths.specs if p.name.startswith("passkey")}


def test_one_heat_map_per_policy_of_depth_length_and_accuracy(probed_report: ReportPaths) -> None:
    maps = _heat_maps(probed_report)
    assert set(maps) == {"passkey_recent.vl.json", "passkey_streaming.vl.json"}
    assert {p.name for p in probed_report.charts} >= {"passkey_recent.png", "passkey_streaming.png"}
    spec = maps["passkey_streaming.vl.json"]
    assert {"field": "depth", "type": "ordinal"}.items() <= channels(spec, "x")[0].items()
    assert {"field": "seq_len", "type": "ordinal"}.items() <= channels(spec, "y")[0].items()
    color = next(c for c in channels(spec, "color") if c.get("field") == "accuracy_pct")
    assert color["scale"]["domain"] == [0, 100]
    assert spec["facet"]["column"]["field"] == "limit"
    rows = spec_rows(spec)
    assert {r["series"] for r in rows} == {"full", "streaming"}  # the policy beside its reference
    assert {(r["limit"], r["depth"]): r["accuracy_pct"] for r in rows if r["series"] == "streaming"} == {
        ("32", 0.0): 100.0,
        ("32", 0.5): 50.0,
        ("32", 1.0): 0.0,
    }


def test_passkey_variants_get_a_table_and_heat_maps_each(tmp_path: Path) -> None:
    """`--task passkey,passkey:haystack=text`: recent @ 64 finds every key in repeat and none in text. Each variant
    has its own table and heat maps, headed by its label, rather than one passkey table averaging both to 50%."""
    rows = [
        *_passkey_variant("full", None, "repeat", [True] * 3),
        *_passkey_variant("full", None, "text", [True] * 3),
        *_passkey_variant("recent", 64, "repeat", [True] * 3),
        *_passkey_variant("recent", 64, "text", [False] * 3),
    ]
    paths = build_report(write_run(tmp_path, [*PPL_CELLS, *rows]))
    markdown = paths.markdown.read_text()
    assert "### Passkey retrieval by configuration\n" not in markdown
    repeat = markdown.split("### Passkey retrieval by configuration (passkey:haystack=repeat)\n", 1)[1]
    text = markdown.split("### Passkey retrieval by configuration (passkey:haystack=text)\n", 1)[1]
    assert "| recent | 64 | 100.0 | 3 | -0.50 | 100.0 | 100.0 | 100.0 |" in repeat.split("###", 1)[0]
    assert "| recent | 64 | 0.0 | 3 | -6.00 | 0.0 | 0.0 | 0.0 |" in text.split("###", 1)[0]
    maps = _heat_maps(paths)
    assert set(maps) == {"passkey_haystack_repeat_recent.vl.json", "passkey_haystack_text_recent.vl.json"}
    text_map = spec_rows(maps["passkey_haystack_text_recent.vl.json"])
    cells = {(r["series"], r["depth"]): r["accuracy_pct"] for r in text_map}
    assert cells == {**{("full", d): 100.0 for d in DEPTHS}, **{("recent", d): 0.0 for d in DEPTHS}}
    assert "![Passkey retrieval (passkey:haystack=text): recent]" in markdown
    terminal = summary_table(paths.markdown.parent.parent)
    assert "Passkey retrieval by configuration (passkey:haystack=text)" in terminal
    assert "Passkey retrieval by configuration (passkey:haystack=repeat)" in terminal


def test_heat_maps_are_listed_once_in_the_html(probed_report: ReportPaths) -> None:
    html = probed_report.html.read_text()
    assert html.count('data-chart="passkey_streaming"') == 1 and html.count('data-chart="passkey_recent"') == 1


def test_table_names_position_modes_when_there_are_several(tmp_path: Path) -> None:
    rows = [*_probes("full", None, [True] * 3), *_probes("l2", 32, [True] * 3, positions="shift")]
    rows += _probes("full", None, [True] * 3, positions="shift")
    table = retrieval_table(load_run(write_run(tmp_path, rows)).retrieval, several_modes=True)
    assert [row[:2] for row in table.rows] == [
        ["full (for positions=shift)", "–"],
        ["full (for positions=true)", "–"],
        ["l2, positions=shift", "32"],
    ]


# --- Recommendations ------------------------------------------------------------------------------------------------


def _quality_first(run_dir: Path, rows: list[dict]) -> dict[str, Any] | None:
    analysis = analyse(load_run(write_run(run_dir, rows)))
    return next(r for r in analysis.recommendations if r.scenario == "quality first").choice


def _twenty(right: int) -> list[bool]:
    return [True] * right + [False] * (20 - right)


def test_quality_first_without_probes_picks_on_ppl_alone(tmp_path: Path) -> None:
    choice = _quality_first(tmp_path, PPL_CELLS)
    assert choice is not None and (choice["policy_label"], choice["cache_size"]) == ("streaming", 32)
    assert analyse(load_run(tmp_path)).rules == ALL_RULES


@pytest.mark.parametrize(
    ("recent_right", "chosen"),
    [
        pytest.param(19, ("recent", 64), id="5-points-below-full-qualifies"),
        pytest.param(18, None, id="10-points-below-full-does-not"),
    ],
)
def test_quality_first_asks_for_retrieval_within_5_points_of_full(
    tmp_path: Path, recent_right: int, chosen: tuple[str, int] | None
) -> None:
    """streaming @ 32 has the smaller limit and +1% PPL, but finds the key 20 points less often than full."""
    rows = [
        *PPL_CELLS,
        *_probes("full", None, _twenty(20)),
        *_probes("streaming", 32, _twenty(16)),
        *_probes("recent", 64, _twenty(recent_right)),
    ]
    recommendations = analyse(load_run(write_run(tmp_path, rows))).recommendations
    quality = next(r for r in recommendations if r.scenario == "quality first")
    if chosen is None:
        assert quality.choice is None
        assert quality.reason == "no configuration within +2% PPL retrieves the pass key within 5 points of full"
    else:
        assert quality.choice is not None
        assert (quality.choice["policy_label"], quality.choice["cache_size"]) == chosen
        assert quality.choice["retrieval_gap_pts"] == pytest.approx(5.0)


def _one_variant_per_depth(rows: list[dict]) -> list[dict]:
    """The rows as `--task passkey:depths=0,passkey:depths=0.5,passkey:depths=1` writes them: each probe's
    task_params name its own depth alone, three variants of passkey."""
    return [
        {**row, "task_params": json.dumps({"depths": [json.loads(row["probe_params"])["depth"]], "haystack": "repeat"})}
        for row in rows
    ]


def test_quality_first_weighs_each_variant_alike(tmp_path: Path) -> None:
    """With one variant per depth, recent @ 64's miss (its 20th probe, at depth 0.5) costs the 7 probes of its
    variant, not the 20 it made: 100%, 6/7 and 100% against full's 100% in each variant, a gap of
    100 - (100 + 600/7 + 100)/3 = 100/21 = 4.76 points (its probes pooled: 19/20, 5 points)."""
    probes = [*_probes("full", None, _twenty(20)), *_probes("streaming", 32, _twenty(16))]
    probes += _probes("recent", 64, _twenty(19))
    choice = _quality_first(tmp_path, [*PPL_CELLS, *_one_variant_per_depth(probes)])
    assert choice is not None and (choice["policy_label"], choice["cache_size"]) == ("recent", 64)
    assert choice["retrieval_gap_pts"] == pytest.approx(100 / 21)


def test_unprobed_configuration_does_not_qualify_when_retrieval_was_measured(tmp_path: Path) -> None:
    rows = [*PPL_CELLS, *_probes("full", None, [True] * 3), *_probes("recent", 64, [True] * 3)]
    choice = _quality_first(tmp_path, rows)
    assert choice is not None and choice["policy_label"] == "recent"  # streaming was never probed


def test_rule_text_and_evidence_say_retrieval(tmp_path: Path) -> None:
    rows = [*PPL_CELLS, *_probes("full", None, _twenty(20)), *_probes("recent", 64, _twenty(19))]
    report = assemble(load_run(write_run(tmp_path, rows)), tmp_path / "charts")
    summary_blocks = report.sections[0].blocks
    rules = next(b for b in summary_blocks if isinstance(b, Definitions) and b.lead.startswith("Rules"))
    assert rules.items["quality first"] == QUALITY_FIRST_WITH_RETRIEVAL.text
    assert "at most +2%" in QUALITY_FIRST_WITH_RETRIEVAL.text
    assert "at most 5 percentage points below that of full" in QUALITY_FIRST_WITH_RETRIEVAL.text
    assert "retrieval" not in QUALITY_FIRST.text and QUALITY_FIRST in ALL_RULES
    table = next(b for b in summary_blocks if isinstance(b, Table) and b.title == "Recommended configurations")
    quality = next(row for row in table.rows if row[0] == "quality first")
    assert quality[2] == "recent @ 64" and "Retrieval 95.0% (full 100.0%)" in quality[3]


def test_failed_probes_alone_do_not_change_the_rules(tmp_path: Path) -> None:
    failed = probe("streaming", 32, 256, 0.5, 0, False, status="failed", error="boom", correct=None)
    analysis = analyse(load_run(write_run(tmp_path, [*PPL_CELLS, failed, failed_cell("l2", 32, 256, 0, "x")])))
    assert analysis.rules == ALL_RULES
    choice = next(r for r in analysis.recommendations if r.scenario == "quality first").choice
    assert choice is not None and choice["policy_label"] == "streaming"


def test_a_results_folder_of_protocol_6_gives_the_same_retrieval_figures(tmp_path: Path) -> None:
    """Older folders wrote passkey_* columns, depth and needle_start; they are mapped to today's columns on
    load, so their figures and report are what they were."""
    today = write_run(tmp_path / "today", [*PPL_CELLS, *PROBES])
    older = write_run(tmp_path / "older", [*PPL_CELLS, *PROBES])
    renamed = {
        "correct": "passkey_correct",
        "answer_matched": "passkey_matched",
        "answer_tokens": "passkey_tokens",
        "answer_logprob": "passkey_logprob",
    }
    for path in (older / "cells").glob("*.parquet"):
        frame = pl.read_parquet(path)
        if frame["task"][0] != "passkey":
            continue
        params = json.loads(frame["probe_params"][0])
        frame = frame.drop("probe_params", "task_params", "score").rename(renamed)
        frame = frame.with_columns(depth=pl.lit(params["depth"]), needle_start=pl.lit(params["needle_start"]))
        frame.write_parquet(path)
    new, old = load_run(today).retrieval, load_run(older).retrieval
    assert retrieval_by_probe(old).equals(retrieval_by_probe(new))
    assert retrieval_by_config(old).equals(retrieval_by_config(new))
    assert old["probe_params"].null_count() == 0
    assert old.sort("cell_id")["depth"].equals(new.sort("cell_id")["depth"])
    older_md = build_report(older).markdown.read_text().split("## Run")[0]
    today_md = build_report(today).markdown.read_text().split("## Run")[0]
    assert older_md.replace("older", "today") == today_md
