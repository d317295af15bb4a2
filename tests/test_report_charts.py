"""Chart specs carry the intended encodings and data; real PNGs; partial data skips charts, saying why."""

from __future__ import annotations

import json
import math
from html import escape
from pathlib import Path
from typing import Any

import pytest
from report_fixtures import cell, channels, curve_rows, failed_cell, marks, spec_rows, synthetic_run, walk, write_run

from kvcompare.report import ReportPaths, build_report
from kvcompare.report.charting import BASELINE_COLOR

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ALL_CHARTS = {
    "metrics_by_config_256",
    "metrics_by_config_512",
    "cache_tradeoff",
    "length_effect",
    "policies_at_cache",
    "ppl_by_position",
}


@pytest.fixture(scope="module")
def full_report(tmp_path_factory: pytest.TempPathFactory) -> ReportPaths:
    return build_report(synthetic_run(tmp_path_factory.mktemp("run")))


def _spec(paths: ReportPaths, name: str) -> dict[str, Any]:
    spec_path = next(p for p in paths.specs if p.name == f"{name}.vl.json")
    return json.loads(spec_path.read_text())


def test_every_chart_written_as_png_and_spec(full_report: ReportPaths) -> None:
    assert {p.name.removesuffix(".png") for p in full_report.charts} == ALL_CHARTS
    assert full_report.skipped_charts == {}
    for png in full_report.charts:
        data = png.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000
        assert png.with_name(png.name.removesuffix(".png") + ".vl.json").exists()


def test_cache_tradeoff_uses_ordinal_cache_sizes_and_paired_changes(full_report: ReportPaths) -> None:
    spec = _spec(full_report, "cache_tradeoff")
    assert {"field": "cache_size", "type": "ordinal"}.items() <= channels(spec, "x")[0].items()
    y_fields = {y.get("field") for y in channels(spec, "y")}
    assert {"ppl_change_pct", "ttft_s_change_pct", "tpot_s_change_pct"} <= y_fields
    assert any(y.get("datum") == 0 for y in channels(spec, "y"))  # the 0% baseline rule
    rows = spec_rows(spec)
    assert {r["cache_size"] for r in rows} == {32, 64}
    # fixture: streaming (rank 0) at cache 64 loses 0.02 * 64/64 = 2% PPL at every length
    changes = [r["ppl_change_pct"] for r in rows if r["series"] == "streaming" and r["cache_size"] == 64]
    assert len(changes) == 2 and changes == [pytest.approx(2.0)] * 2  # one per length


def _interval_fields(spec: dict[str, Any]) -> dict[str, str]:
    """Error-bar layers of a spec: the field of their low end (y) -> the field of their high end (y2)."""
    return {bar["y"]["field"]: bar["y2"]["field"] for bar in marks(spec, "errorbar")}


def test_relative_speed_changes_carry_their_intervals(full_report: ReportPaths) -> None:
    spec = _spec(full_report, "cache_tradeoff")
    speed = ["ttft_s_change_pct", "tpot_s_change_pct", "throughput_tok_s_change_pct"]
    assert _interval_fields(spec) == {f"{field}_low": f"{field}_high" for field in speed}  # PPL: points only
    assert all(bar["color"]["field"] == "series" for bar in marks(spec, "errorbar"))
    for row in spec_rows(spec):
        for field in speed:
            assert row[f"{field}_low"] <= row[field] <= row[f"{field}_high"]
    policies = _spec(full_report, "policies_at_cache")  # quality only: no interval
    assert marks(policies, "errorbar") == []


def test_absolute_speed_charts_carry_their_intervals(full_report: ReportPaths) -> None:
    bars = _interval_fields(_spec(full_report, "metrics_by_config_256"))
    assert {"tpot_s_low": "tpot_s_high", "throughput_tok_s_low": "throughput_tok_s_high"}.items() <= bars.items()
    rows = [r for r in spec_rows(_spec(full_report, "metrics_by_config_256")) if r["series"] == "full"]
    # speed: the bounds are the cells' intervals over trials
    assert rows and all(r["tpot_s_low"] < r["tpot_s"] < r["tpot_s_high"] for r in rows)
    assert _interval_fields(_spec(full_report, "length_effect")) == {"throughput_tok_s_low": "throughput_tok_s_high"}


def test_baseline_is_black_and_dashed(full_report: ReportPaths) -> None:
    spec = _spec(full_report, "length_effect")
    scale = channels(spec, "color")[0]["scale"]
    assert scale["domain"][0] == "full" and scale["range"][0] == BASELINE_COLOR
    assert channels(spec, "strokeDash")[0]["field"] == "role"
    assert {"field": "seq_len", "type": "ordinal"}.items() <= channels(spec, "x")[0].items()
    # the baseline row is repeated under each cache limit so every facet shows it
    assert {r["cache_size"] for r in spec_rows(spec) if r["series"] == "full"} == {32, 64}


def test_policies_at_cache_facets_by_cache_size(full_report: ReportPaths) -> None:
    spec = _spec(full_report, "policies_at_cache")
    columns = list(walk(spec, "column"))
    assert columns and all(c["field"] == "cache_size" and c["type"] == "ordinal" for c in columns)
    assert {r["series"] for r in spec_rows(spec)} == {"streaming", "l2", "l2:mode=random", "recent"}


def test_ppl_by_position_pools_samples(full_report: ReportPaths) -> None:
    spec = _spec(full_report, "ppl_by_position")
    assert channels(spec, "x")[0]["field"] == "bucket_start"
    first = [r for r in spec_rows(spec) if r["series"] == "full" and r["seq_len"] == 256 and r["bucket_start"] == 1]
    # samples at ppl 40 and 50 with equal tokens: exp((log 40 + log 50) / 2) = sqrt(2000)
    assert first and all(r["ppl"] == pytest.approx(math.sqrt(2000)) for r in first)


def test_metrics_by_config_has_every_metric(full_report: ReportPaths) -> None:
    spec = _spec(full_report, "metrics_by_config_256")
    titles = {y.get("title") for y in channels(spec, "y")}
    assert {"TTFT (s)", "TPOT (s)", "Throughput (tokens/s)", "PPL", "Peak KV (MiB)"} <= titles


def test_partial_data_skips_charts_with_reasons(tmp_path: Path) -> None:
    """One length, one cache size, no curves: what can be drawn is, the rest says why not."""
    run_dir = write_run(tmp_path, [cell("full", None, 256, 0), cell("l2", 32, 256, 0, ppl=44.0)])
    paths = build_report(run_dir)
    assert {p.name for p in paths.charts} == {
        "metrics_by_config_256.png",
        "cache_tradeoff.png",
        "policies_at_cache.png",
    }
    assert paths.skipped_charts == {
        "length_effect": "only one length in the results",
        "ppl_by_position": "no perplexity-by-position curves in the results",
    }


def test_report_of_failed_run_without_curves_lists_failures(tmp_path: Path) -> None:
    rows = [cell("full", None, 256, 0), failed_cell("streaming", 32, 256, 0, error="RuntimeError: CUDA OOM")]
    paths = build_report(write_run(tmp_path, rows, cells_planned=4))
    for text in (paths.html.read_text(), paths.markdown.read_text()):
        assert "RuntimeError: CUDA OOM" in text
        assert "no perplexity-by-position curves" in text
    markdown = paths.markdown.read_text()
    assert "| 4 | 1 | 1 | 2 |" in markdown  # planned, ok, failed, missing
    assert "| streaming @ 32 | 256 | 0 |" in markdown


def test_run_with_no_successful_cell_still_reports(tmp_path: Path) -> None:
    paths = build_report(write_run(tmp_path, [failed_cell("l2", 32, 256, 0, error="boom")]))
    assert paths.charts == [] and "metrics_by_config" in paths.skipped_charts
    assert "boom" in paths.html.read_text()


def test_markdown_links_pngs_relatively(full_report: ReportPaths) -> None:
    markdown = full_report.markdown.read_text()
    for png in full_report.charts:
        assert f"](charts/{png.name})" in markdown
    assert "Relative change vs full" in markdown and "paired" in markdown


def test_curves_of_failed_cells_are_ignored(tmp_path: Path) -> None:
    ok = cell("full", None, 256, 0, ppl=40.0)
    failed = failed_cell("l2", 32, 256, 0, error="late failure")
    failed_curve = curve_rows({**failed, "ppl": 80.0})
    paths = build_report(write_run(tmp_path, [ok, failed], curve_rows(ok) + failed_curve))
    spec = _spec(paths, "ppl_by_position")
    assert {r["series"] for r in spec_rows(spec)} == {"full"}


def test_baseline_is_black_in_every_position_mode() -> None:
    import polars as pl

    from kvcompare.report.charting import series_color

    series = pl.DataFrame(
        {"series": ["streaming, positions=shift", "full, positions=shift"], "role": ["policy", "baseline"]}
    )
    scale = series_color(series).to_dict()["scale"]
    assert scale["domain"] == ["full, positions=shift", "streaming, positions=shift"]
    assert scale["range"][0] == BASELINE_COLOR and scale["range"][1] != BASELINE_COLOR


def test_protocol_bullets_with_continuation_lines_become_one_list() -> None:
    from kvcompare.protocol import PROTOCOL_MD
    from kvcompare.report.render import markdown_blocks

    html = markdown_blocks(PROTOCOL_MD)
    assert html.startswith("<ul>") and html.count("<li>") == PROTOCOL_MD.count("\n- ") + 1
    assert "<p>" not in html and "- **" not in html


def test_beyond_context_is_noted_at_the_top_of_both_renderings(tmp_path: Path) -> None:
    rows = [
        cell("full", None, 256, 0),
        cell("l2", 32, 256, 0),
        cell("full", None, 512, 0, max_positions=500, beyond_context=True),
        cell("l2", 32, 512, 0, max_positions=500, beyond_context=True),
        cell("full", None, 768, 0, max_positions=500, beyond_context=True),
        failed_cell("l2", 32, 1024, 0, error="boom") | {"max_positions": 500, "beyond_context": True},
    ]
    paths = build_report(write_run(tmp_path, rows))
    note = (
        "Lengths 512 and 768 go beyond the model's 500 trained positions (prompt + generated tokens of the latency "
        "pass): the full cache is then outside what the model was trained for, which is an experiment, not a "
        "typical use."
    )
    html, markdown = paths.html.read_text(), paths.markdown.read_text()
    assert f'<p class="notice"><strong>Note:</strong> {escape(note)}</p>' in html
    assert f"> **Note:** {note}" in markdown
    # at the top: before the summary, the cell counts and the protocol
    assert html.index(escape(note)) < html.index("<h2>Summary</h2>") < html.index("<h3>Cells</h3>")
    assert markdown.index(note) < markdown.index("## Summary") < markdown.index("### Cells")
    assert "1024" not in note  # only successful cells count


def test_no_beyond_context_note_within_trained_positions(tmp_path: Path) -> None:
    rows = [cell("full", None, 256, 0, max_positions=8192, beyond_context=False), cell("l2", 32, 256, 0)]
    paths = build_report(write_run(tmp_path, rows))
    for text in (paths.html.read_text(), paths.markdown.read_text()):
        assert "trained positions" not in text and "beyond the model" not in text


def test_title_shows_the_folder_and_a_differing_run_id(tmp_path: Path) -> None:
    folder = write_run(tmp_path / "20261128-011000", [cell("full", None, 256, 0)])  # run.json run_id: test-run
    paths = build_report(folder)
    title = "KV-cache eviction report: 20261128-011000 (run id test-run)"
    assert f"<h1>{title}</h1>" in paths.html.read_text() and f"<title>{title}</title>" in paths.html.read_text()
    assert paths.markdown.read_text().startswith(f"# {title}\n")
    same = write_run(tmp_path / "test-run", [cell("full", None, 256, 0)])
    assert build_report(same).markdown.read_text().startswith("# KV-cache eviction report: test-run\n")


@pytest.mark.parametrize("inside", [False, True], ids=["a file", "inside a file"])
def test_report_out_that_is_a_file_is_one_line_with_exit_status_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], inside: bool
) -> None:
    from kvcompare.cli import main

    run_dir = synthetic_run(tmp_path / "run")
    blocker = tmp_path / "report.html"
    blocker.write_text("mine")
    out = blocker / "report" if inside else blocker
    assert main(["report", str(run_dir), "--out", str(out)]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert lines == [f"kvcompare: error: --out {out} is a file, or inside one: choose a folder for the report"]
    assert blocker.read_text() == "mine"
