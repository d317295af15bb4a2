"""The compression setting in the report (protocol 8): each setting named, prefill cells paired with the prefill
`full`, probes of one ratio grouped whatever their limits, the accuracy-against-ratio chart, and a continuous-only
report that never speaks of prefill."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from report_fixtures import cell, probe, spec_rows, synthetic_run, walk, write_run
from runs import tiny_run

from kvcompare.analysis import load_run, relative_changes, retrieval_by_config, trial_pairs
from kvcompare.report import ReportPaths, build_report
from kvcompare.report.compression import RATIO_CHART
from kvcompare.report.task_tables import retrieval_table

POLICIES = ["streaming", "snapkv:window=4"]
RATIOS = [0.25, 0.5]
LENGTHS = [192, 256]
#: The setting by its name (not the prompt "prefilled in chunks", nor the column `prefill_chunk`).
PREFILL = re.compile(r"\bprefill\b", re.IGNORECASE)


@pytest.fixture(scope="module")
def both_settings(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> ReportPaths:
    """A tiny run of two policies at two ratios in both settings, perplexity and passkey, and its report."""
    from kvcompare.run.runner import run

    out = tmp_path_factory.mktemp("compression") / "run"
    config = tiny_run(
        tiny_model_dir,
        policies=POLICIES,
        cache_sizes=[],
        ratios=RATIOS,
        compression=["continuous", "prefill"],
        tasks=["ppl", "passkey:depths=0.5"],
        lengths=LENGTHS,
        positions=["true"],
        repeats=1,
        threads=1,
    )
    run(config, out, progress=False)
    return build_report(out)


def _run_dir(paths: ReportPaths) -> Path:
    return paths.markdown.parent.parent


def _without_protocol(markdown: str) -> str:
    """The report up to its protocol, which states both settings in every report."""
    return markdown.split("\n## Protocol\n", 1)[0]


def _table(markdown: str, title: str) -> list[dict[str, str]]:
    """The rows of the Markdown table under ``### title``, as dicts keyed by its headers."""
    section = markdown.split(f"### {title}\n", 1)[1].split("\n### ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    headers = [cell.strip() for cell in lines[0].strip("|").split(" | ")]
    return [dict(zip(headers, (c.strip() for c in line.strip("|").split(" | ")), strict=True)) for line in lines[2:]]


# --- A run of both settings ------------------------------------------------------------------------------------


def test_the_settings_and_ratios_are_named(both_settings: ReportPaths) -> None:
    markdown = both_settings.markdown.read_text()
    compared = markdown.split("- **compression setting**: ", 1)[1].splitlines()[0]
    assert compared.startswith("`continuous`: evicted continuously")
    assert "`prefill`: compressed once after the prefill" in compared and "query-agnostic" in compared
    assert "- **compression ratios**: 0.25 and 0.5 (the share of each context removed" in markdown
    assert "cache limits (tokens)" not in _without_protocol(markdown).split("## Compression", 1)[0]
    # every configuration says its setting (and, where its ratio is not in a column of its own, its ratio); the
    # two baselines are told apart
    names = {row["Policy"] for row in _table(markdown, "Passkey retrieval by configuration")}
    assert names == {"full", "full (prefill)", *POLICIES, *(f"{p}, prefill" for p in POLICIES)}
    (spec,) = [path for path in both_settings.specs if path.name == f"metrics_by_config_{LENGTHS[0]}.vl.json"]
    configs = {row["config"] for row in spec_rows(json.loads(spec.read_text()))}
    assert "snapkv:window=4, prefill, ratio 0.5" in configs and "snapkv:window=4, ratio 0.5" in configs
    recommended = _table(markdown, "Recommended configurations")
    assert any(re.search(r", ratio 0\.(25|5)", row["Choice"]) for row in recommended)
    assert "## Compression\n" in markdown
    assert "Speed and memory in the prefill setting" in markdown


def test_prefill_cells_are_paired_with_the_prefill_full(both_settings: ReportPaths) -> None:
    run = load_run(_run_dir(both_settings))
    cells = run.cells.filter(pl.col("status") == "ok")
    full = {
        (r["compression"], r["seq_len"]): r["ppl"]
        for r in cells.filter(pl.col("policy") == "full").iter_rows(named=True)
    }
    # the settings score different tokens: pairing across them would be visible
    assert all(full[("prefill", n)] != pytest.approx(full[("continuous", n)], rel=1e-6) for n in LENGTHS)
    changes = relative_changes(run.cells, run.timings)
    prefill = changes.filter(pl.col("compression") == "prefill")
    assert prefill.height == len(POLICIES) * len(RATIOS) * len(LENGTHS)
    for row in prefill.iter_rows(named=True):
        (own,) = cells.filter(
            (pl.col("policy_label") == row["policy_label"])
            & (pl.col("ratio") == row["ratio"])
            & (pl.col("seq_len") == row["seq_len"])
            & (pl.col("compression") == "prefill")
        )["ppl"].to_list()
        base = full[("prefill", row["seq_len"])]
        assert row["ppl_change_pct"] == pytest.approx(100 * (own - base) / base)
        assert row["n_paired"] == 1
    # every prefill trial met the prefill `full`'s trial of its round, and no other
    pairs = trial_pairs(run.cells, run.timings).policy
    by_setting = pairs.group_by("compression").len().sort("compression")["len"].to_list()
    assert by_setting == [len(POLICIES) * len(RATIOS) * len(LENGTHS)] * 2
    full_ttft = {
        (r["compression"], r["seq_len"]): r["ttft_s"]
        for r in cells.filter(pl.col("policy") == "full").iter_rows(named=True)
    }
    for row in pairs.iter_rows(named=True):
        assert row["ttft_s_base"] == pytest.approx(full_ttft[(row["compression"], row["seq_len"])])
    # the results intro says so
    assert "`full (prefill)`" in both_settings.markdown.read_text()


def test_a_run_of_both_settings_is_recommended_within_each(both_settings: ReportPaths) -> None:
    from kvcompare.analysis import analyse

    recommendations = analyse(load_run(_run_dir(both_settings))).recommendations
    per_length = [r for r in recommendations if r.scenario != "long text"]
    settings = ("continuous", "prefill")
    assert {(r.seq_len, r.setting) for r in per_length} == {(n, s) for n in LENGTHS for s in settings}
    for r in recommendations:
        assert r.choice is None or r.choice["compression"] == r.setting
    table = _table(both_settings.markdown.read_text(), "Recommended configurations")
    assert {row["Length (tokens)"] for row in table} == {f"{n} ({s})" for n in LENGTHS for s in settings}


def test_probes_of_one_ratio_are_grouped_whatever_their_limits(both_settings: ReportPaths) -> None:
    run = load_run(_run_dir(both_settings))
    limits = (
        run.retrieval.filter(pl.col("policy") != "full")
        .group_by("compression", "ratio")
        .agg(pl.col("cache_size").n_unique())
    )
    assert (limits["cache_size"] > 1).all()  # each length's context gives its own limit
    by_config = retrieval_by_config(run.retrieval)
    evicting = by_config.filter(pl.col("policy") != "full")
    assert evicting.height == len(POLICIES) * len(RATIOS) * 2  # one row per policy, ratio and setting
    assert (evicting["n"] == len(LENGTHS)).all()  # every length's probe in it
    rows = _table(both_settings.markdown.read_text(), "Passkey retrieval by configuration")
    row = next(r for r in rows if r["Policy"] == "streaming, prefill")  # the first ratio of the policy
    assert row["Compression ratio (share of the context removed)"] == "0.25 (25% removed)"
    low, high = sorted(
        run.retrieval.filter(
            (pl.col("policy_label") == "streaming") & (pl.col("compression") == "prefill") & (pl.col("ratio") == 0.25)
        )["cache_size"]
        .unique()
        .to_list()
    )
    assert row["Cache limit (tokens)"] == f"{low}–{high}" and row["n"] == str(len(LENGTHS))


def _layers(spec: dict[str, Any], mark: str) -> list[dict[str, Any]]:
    """Every layer of the chart drawn with ``mark``, with its data rows."""
    datasets = spec.get("datasets", {})
    found = []
    for node in walk(spec, "layer"):
        for layer in node:
            kind = layer.get("mark")
            kind = kind.get("type") if isinstance(kind, dict) else kind
            if kind == mark:
                found.append({**layer, "rows": datasets[layer["data"]["name"]]})
    return found


def test_the_accuracy_against_ratio_chart_has_a_line_per_policy(both_settings: ReportPaths) -> None:
    (spec_path,) = [path for path in both_settings.specs if path.name == f"{RATIO_CHART}.vl.json"]
    spec = json.loads(spec_path.read_text())
    lines = _layers(spec, "line")
    assert len(lines) == 2 * 2  # a panel per task (ppl, passkey) and setting
    for layer in lines:
        assert layer["encoding"]["x"]["field"] == "ratio"
        assert layer["encoding"]["color"]["field"] == "line"
        per_line: dict[str, list[float]] = {}
        for row in layer["rows"]:
            per_line.setdefault(row["line"], []).append(row["ratio"])
        assert sorted(per_line) == sorted(POLICIES)  # one line per policy
        assert all(sorted(ratios) == RATIOS for ratios in per_line.values())
        assert len({(row["task"], row["compression"]) for row in layer["rows"]}) == 1
    rules = _layers(spec, "rule")  # `full` of the panel's task and setting, the reference
    assert len(rules) == len(lines)
    references = {(row["task"], row["compression"]) for layer in rules for row in layer["rows"]}
    assert references == {(t, s) for t in ("ppl", "passkey") for s in ("continuous", "prefill")}
    assert all(row["policy"] == "full" for layer in rules for row in layer["rows"])
    run = load_run(_run_dir(both_settings))
    prefill_full = run.cells.filter((pl.col("policy") == "full") & (pl.col("compression") == "prefill"))["ppl"].mean()
    ppl_prefill = next(
        r for layer in rules for r in layer["rows"] if (r["task"], r["compression"]) == ("ppl", "prefill")
    )
    assert ppl_prefill["value"] == pytest.approx(prefill_full)
    markdown = both_settings.markdown.read_text()
    assert f"charts/{RATIO_CHART}.png" in markdown and "one line per policy" in markdown


def test_the_prefill_table_gives_speed_and_memory_per_ratio(both_settings: ReportPaths) -> None:
    rows = _table(both_settings.markdown.read_text(), "Speed and memory in the prefill setting")
    assert len(rows) == (len(POLICIES) * len(RATIOS) + 1) * len(LENGTHS)
    assert {r["Policy"] for r in rows} == {"full (prefill)", "streaming, prefill", "snapkv:window=4, prefill"}
    evicting = [r for r in rows if r["Policy"] != "full (prefill)"]
    assert {r["Compression ratio (share of the context removed)"] for r in evicting} == {
        "0.25 (25% removed)",
        "0.5 (50% removed)",
    }
    for r in evicting:
        assert float(r["Compression in TTFT (%)"]) > 0
        assert float(r["KV after compression (MiB)"]) < float(r["Peak KV (MiB)"])


# --- Runs of one setting ---------------------------------------------------------------------------------------


def test_a_continuous_only_report_does_not_mention_prefill(tmp_path: Path) -> None:
    paths = build_report(synthetic_run(tmp_path / "run"))
    markdown = paths.markdown.read_text()
    assert not PREFILL.search(_without_protocol(markdown))
    assert "## Compression" not in markdown
    assert not re.search(r"\bratios?\b", _without_protocol(markdown), re.IGNORECASE)
    assert "- **compression setting**: `continuous`: evicted continuously" in markdown
    assert "- **cache limits (tokens)**: 32, 64" in markdown
    body = paths.html.read_text().split("<body>", 1)[1].split("<h2>Protocol</h2>", 1)[0]
    assert not PREFILL.search(body)
    assert not [path for path in paths.specs if path.name == f"{RATIO_CHART}.vl.json"]


def _ratio_rows(ratio: float, limits: dict[int, int], **fields: Any) -> list[dict[str, Any]]:
    """Passkey probes of `l2` at one ratio and length 256, one per sample, each with its own limit."""
    return [
        probe("l2", limit, 256, 0.5, sample, right=sample % 2 == 0, ratio=ratio, **fields)
        | {"cell_id": f"l2-{ratio}-{sample}-{fields.get('compression')}"}
        for sample, limit in limits.items()
    ]


def test_a_continuous_ratio_run_groups_by_ratio_and_does_not_mention_prefill(tmp_path: Path) -> None:
    rows = [
        cell("full", None, 256, 0),
        cell("l2", 128, 256, 0, ratio=0.5, ppl=44.0),
        probe("full", None, 256, 0.5, 0, right=True),
        probe("full", None, 256, 0.5, 1, right=True),
        *_ratio_rows(0.5, {0: 120, 1: 124}),
    ]
    paths = build_report(write_run(tmp_path / "run", rows))
    markdown = paths.markdown.read_text()
    assert not PREFILL.search(_without_protocol(markdown))
    (row,) = [r for r in _table(markdown, "Passkey retrieval by configuration") if r["Policy"] == "l2"]
    assert row["Compression ratio (share of the context removed)"] == "0.5 (50% removed)"
    assert row["Cache limit (tokens)"] == "120–124" and row["n"] == "2" and row["Accuracy (%)"] == "50.0"
    (spec_path,) = [path for path in paths.specs if path.name == f"{RATIO_CHART}.vl.json"]
    lines = {row["line"] for row in spec_rows(json.loads(spec_path.read_text())) if row.get("role") == "policy"}
    assert lines == {"l2"}


def test_limits_of_one_ratio_are_one_configuration(tmp_path: Path) -> None:
    """Two probes of one length and ratio whose contexts gave limits 60 and 62: one row, not two."""
    rows = [
        probe("full", None, 256, 0.5, 0, right=True, compression="prefill"),
        *_ratio_rows(0.5, {0: 60, 1: 62}, compression="prefill"),
    ]
    retrieval = load_run(write_run(tmp_path, rows)).retrieval
    by_config = retrieval_by_config(retrieval).filter(pl.col("policy") == "l2")
    assert by_config.height == 1
    assert by_config.select("n", "cache_size_min", "cache_size_max").row(0) == (2, 60, 62)
    table = retrieval_table(retrieval)
    assert [r[:3] for r in table.rows] == [
        ["full (prefill)", "–", "–"],
        ["l2, prefill", "0.5 (50% removed)", "60–62"],
    ]


def test_variants_of_one_task_are_panels_of_their_own_on_the_ratio_chart(tmp_path: Path) -> None:
    """`--task niah_single,niah_single:haystack=text --ratio 0.5`: a panel per variant, named by its label; l2
    finds every needle in noise and none in text, not half of them in one niah_single."""

    def niah(policy: str, haystack: str, sample: int, score: float, **fields: Any) -> dict[str, Any]:
        return probe(
            policy,
            None if policy == "full" else 128,
            256,
            0.5,
            sample,
            score == 1.0,
            task="niah_single",
            task_params=json.dumps({"haystack": haystack, "needles": 1}),
            score=score,
            cell_id=f"niah-{haystack}-{policy}-{sample}",
            **fields,
        )

    rows = [
        cell("full", None, 256, 0),
        cell("l2", 128, 256, 0, ratio=0.5, ppl=44.0),
        *(niah("full", haystack, sample, 1.0) for haystack in ("noise", "text") for sample in (0, 1)),
        *(niah("l2", "noise", sample, 1.0, ratio=0.5) for sample in (0, 1)),
        *(niah("l2", "text", sample, 0.0, ratio=0.5) for sample in (0, 1)),
    ]
    paths = build_report(write_run(tmp_path / "run", rows))
    (spec_path,) = [path for path in paths.specs if path.name == f"{RATIO_CHART}.vl.json"]
    spec = json.loads(spec_path.read_text())
    scores = sorted(row["value"] for row in spec_rows(spec) if row.get("role") == "policy" and row["task"] != "ppl")
    assert scores == [0.0, 100.0]
    titles = set(walk(spec, "title"))
    assert {"niah_single:haystack=noise", "niah_single:haystack=text"} <= titles, titles
