"""Every summary line, section and chart speaks of what the run measured: a quality-only run (--repeats 0), a
passkey-only run, and panels with nothing to compare (issue 20)."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
from report_fixtures import channels, synthetic_run
from runs import tiny_run

from kvcompare.report import build_report, summary_table
from kvcompare.report.charts import nothing_to_compare
from kvcompare.run.runner import run

SPEED_WORDS = ("TTFT", "TPOT", "Throughput", "speed first", "long text", "A/A control", "Physics of a decode step")


def test_a_quality_only_run_measures_no_speed_and_says_so(tiny_model_dir: Path, tmp_path: Path) -> None:
    grid = {"policies": ["recent", "streaming"], "cache_sizes": [16]}
    out = run(tiny_run(tiny_model_dir, repeats=0, **grid), tmp_path / "q", progress=False)
    timed = run(tiny_run(tiny_model_dir, repeats=1, **grid), tmp_path / "t", progress=False)
    cells = pl.read_parquet(out / "cells" / "*.parquet").sort("policy")
    assert cells["repeats"].to_list() == [0, 0, 0] and cells["tpot_s"].is_null().all()
    assert cells["ttft_s"].is_null().all() and not list((out / "timings").glob("*.parquet"))
    same = pl.read_parquet(timed / "cells" / "*.parquet").sort("policy")
    assert cells["ppl"].to_list() == pytest.approx(same["ppl"].to_list(), rel=1e-9)  # quality as measured with speed
    summary = summary_table(out)
    assert summary.startswith("**Speed:** not measured in this run (--repeats 0: a quality-only run")
    assert "Δ PPL" in summary and not any(word in summary for word in SPEED_WORDS)
    markdown = build_report(out).markdown.read_text()
    assert "latency trials**: none (--repeats 0" in markdown and "quality first" in markdown
    findings = markdown.split("## Run")[0]  # the run's metadata and the protocol are the reference part
    assert not any(word in findings for word in SPEED_WORDS), [w for w in SPEED_WORDS if w in findings]
    meta = json.loads((out / "run.json").read_text())
    assert "--repeats 0" in meta["speed"]["noise_floor"]["reason"]


def test_a_passkey_only_run_speaks_of_retrieval_only(tiny_model_dir: Path, tmp_path: Path) -> None:
    config = tiny_run(tiny_model_dir, policies=["recent"], tasks=["passkey"], lengths=[200], depths=[0.5])
    out = run(config, tmp_path / "run", progress=False)
    summary = summary_table(out)
    assert summary.startswith("**Speed:** not measured in this run (the run measured passkey retrieval only)")
    assert "Passkey retrieval by configuration" in summary and "no finished cells" not in summary
    markdown = build_report(out).markdown.read_text()
    for wrong in ("not recorded tokens", "no successful evicting cells", "nothing to tabulate", "predates",
                  "Results by length", "## Charts", "with no successful `full`"):  # fmt: skip
        assert wrong not in markdown, wrong
    assert "**policies**: recent against `full`" in markdown and "recommendations, which rest on perplexity" in markdown


def test_chart_panels_with_nothing_to_compare_are_left_out(tmp_path: Path) -> None:
    one = pl.DataFrame({"ttft_oneshot_s": [0.1]})
    zeros = pl.DataFrame({"signal_share": [0.0, 0.0, 0.0]})
    assert nothing_to_compare(one, "ttft_oneshot_s") and nothing_to_compare(zeros, "signal_share")
    assert not nothing_to_compare(pl.DataFrame({"ppl_change_pct": [0.0, 0.0]}), "ppl_change_pct")  # equal to full
    assert not nothing_to_compare(pl.DataFrame({"signal_share": [0.0, 0.2]}), "signal_share")
    paths = build_report(synthetic_run(tmp_path / "run"))
    spec = json.loads(next(p for p in paths.specs if p.name.startswith("metrics_by_config")).read_text())
    drawn = {y.get("field") for y in channels(spec, "y")}
    assert "ttft_oneshot_s" not in drawn and "signal_share" not in drawn and "tpot_s" in drawn
