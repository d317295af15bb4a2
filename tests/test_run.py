"""`kvcompare run` on a tiny local model and corpus: the protocol, results, resume, interruption, bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import ClassVar

import polars as pl
import pytest
import torch
from runs import CORPUS, tiny_run

from kvcompare.cli import main
from kvcompare.errors import KVCompareError
from kvcompare.run.figures import latency_fields, position_buckets, quality_fields
from kvcompare.run.results import ResultsError
from kvcompare.run.runner import RunConfig, run


def config(model_dir: Path, **changes: object) -> RunConfig:
    values: dict[str, object] = {
        "policies": ["streaming", "recent"],
        "cache_sizes": [16, 32],
        "lengths": [64],
        "samples": [2],
        "gen": 3,
        "warmup": 1,
        "repeats": 1,
    }
    return tiny_run(model_dir, **{**values, **changes})


def test_quality_fields_match_a_hand_computation() -> None:
    import numpy as np

    nll = np.array([1.0, 2.0, 3.0])
    fields = quality_fields(nll, np.array([True, False, True]))
    assert fields["ppl"] == pytest.approx(math.exp(2.0))
    assert fields["accuracy"] == pytest.approx(2 / 3)
    assert fields["nll_sum"] == 6.0 and fields["tokens_scored"] == 3
    assert position_buckets(np.arange(5.0), 2) == [
        {"bucket_start": 1, "bucket_end": 3, "nll_sum": 1.0, "tokens": 2},
        {"bucket_start": 3, "bucket_end": 5, "nll_sum": 5.0, "tokens": 2},
        {"bucket_start": 5, "bucket_end": 6, "nll_sum": 4.0, "tokens": 1},
    ]
    from kvcompare.engine.executor import LatencyResult

    def trial(ttft: float, steps: list[float], evict: list[float]) -> LatencyResult:
        return LatencyResult(ttft, steps, evict, [0.0] * len(steps), [], 0, 0)

    one = latency_fields([trial(0.5, [0.1, 0.3, 0.2, 0.4], [0.0, 0.1, 0.0, 0.1])])
    assert one["tpot_s"] == pytest.approx(0.25) and one["throughput_tok_s"] == pytest.approx(4 / 1.0)
    assert one["evict_share"] == pytest.approx(0.2) and one["tpot_ci_low"] is None  # one trial: no interval
    three = latency_fields(
        [trial(0.5, [0.1, 0.3], [0, 0]), trial(0.7, [0.2, 0.2], [0, 0]), trial(0.6, [0.4, 0.4], [0.1, 0.1])],
        oneshot_ttft=[0.2, 0.3, 0.25],
    )
    # medians over trials of each trial's figure: TPOTs 0.2, 0.2, 0.4; throughputs 5, 5, 2.5
    assert three["ttft_s"] == pytest.approx(0.6) and three["tpot_s"] == pytest.approx(0.2)
    assert three["throughput_tok_s"] == pytest.approx(5.0) and three["ttft_oneshot_s"] == pytest.approx(0.25)
    assert three["tpot_ci_low"] == pytest.approx(0.2) and three["tpot_ci_high"] == pytest.approx(0.4)
    assert three["decode_s"] == pytest.approx(1.6) and three["evict_share"] == pytest.approx(0.2 / 1.6)


def test_run_writes_one_row_per_cell_with_its_configuration(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = run(config(tiny_model_dir), tmp_path / "run", progress=False)
    cells = pl.read_parquet(out / "cells" / "*.parquet")
    assert cells.height == 2 * (1 + 2 * 2)  # samples x (full + 2 policies x 2 limits)
    assert set(cells["status"]) == {"ok"}
    assert sorted(cells.filter(pl.col("policy") != "full")["cache_size"].unique()) == [16, 32]
    assert cells.filter(pl.col("policy") == "full")["cache_size"].null_count() == 2
    assert set(cells["seq_len"]) == {64} and set(cells["tokens_scored"]) == {63}
    assert set(cells["skip_layers"]) == {"[0]"} and set(cells["positions"]) == {"shift"}
    passages = cells.select("sample_id", "source", "token_offset").unique()
    assert passages.height == 2 and passages["token_offset"].n_unique() == 2  # one file: two windows of it
    row = cells.filter((pl.col("policy") == "full") & (pl.col("sample_id") == 0)).row(0, named=True)
    assert row["ppl"] == pytest.approx(math.exp(row["nll_sum"] / row["tokens_scored"]))
    assert row["ttft_s"] > 0 and row["tpot_s"] > 0 and row["peak_kv_bytes"] > 0 and row["peak_mem_bytes"] > 0
    curves = pl.read_parquet(out / "curves" / "*.parquet")
    assert curves.filter(pl.col("cell_id") == row["cell_id"])["tokens"].sum() == 63
    meta = json.loads((out / "run.json").read_text())
    assert meta["cells_planned"] == 10 and meta["finished_at"] and meta["environment"]["versions"]["torch"]


def test_the_full_row_matches_a_plain_forward(tiny_model_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    out = run(config(tiny_model_dir, policies=["full"], samples=[1]), tmp_path / "run", progress=False)
    row = pl.read_parquet(out / "cells" / "*.parquet").row(0, named=True)
    from kvcompare.corpus import load_corpus, rebuild_passage
    from kvcompare.models import load_model

    loaded = load_model(str(tiny_model_dir))
    ids = torch.tensor(rebuild_passage(load_corpus(str(CORPUS)), loaded.encode, row["source"], row["token_offset"], 64))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        logp = torch.log_softmax(model(ids.view(1, -1)).logits[0, :-1], dim=-1)
    nll = -logp.gather(1, ids[1:].view(-1, 1))
    assert row["nll_sum"] == pytest.approx(float(nll.sum()), rel=1e-5)
    assert row["accuracy"] == pytest.approx(float((logp.argmax(-1) == ids[1:]).float().mean()))


def test_resume_skips_finished_cells_and_an_existing_out_is_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = config(tiny_model_dir, samples=[1], cache_sizes=[16])
    run(cfg, out, progress=False)
    before = {p.name: p.stat().st_mtime_ns for p in (out / "cells").iterdir()}
    with pytest.raises(ResultsError, match="--resume"):
        run(cfg, out, progress=False)
    run(cfg, out, resume=True, progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in (out / "cells").iterdir()} == before
    run(cfg, out, force=True, progress=False)
    assert len(list((out / "cells").iterdir())) == len(before)


def test_an_interrupted_run_keeps_finished_passages_and_resumes(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kvcompare.engine.executor import Executor

    real = Executor.score_batch
    calls = {"n": 0}

    def interrupt_in_second_passage(*args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 4:  # the second passage's second batched quality pass (full, then the 4 others)
            raise KeyboardInterrupt
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Executor, "score_batch", interrupt_in_second_passage)
    out = tmp_path / "run"
    cfg = config(tiny_model_dir, samples=[2])
    with pytest.raises(KeyboardInterrupt):
        run(cfg, out, progress=False)
    kept = pl.read_parquet(out / "cells" / "*.parquet")
    assert kept.height == 5 and kept["sample_id"].unique().to_list() == [0]
    assert len(list((out / "timings").glob("*.parquet"))) == 1
    assert not list(out.rglob(".*tmp"))
    monkeypatch.setattr(Executor, "score_batch", real)
    run(cfg, out, resume=True, progress=False)
    assert pl.read_parquet(out / "cells" / "*.parquet").height == 10


def test_a_crashing_policy_is_recorded_and_the_others_are_kept(
    tiny_model_dir: Path, tmp_path: Path, register_plugin
) -> None:  # type: ignore[no-untyped-def]
    import dataclasses

    from kvcompare.hookspecs import hookimpl
    from kvcompare.policy import KVPolicy

    @dataclasses.dataclass
    class Crashes(KVPolicy):
        name = "crashes"

        def select(self, keys, keep, positions):  # type: ignore[no-untyped-def]
            raise RuntimeError("boom")

    class Plugin:
        @hookimpl
        def register_policies(self, register):  # type: ignore[no-untyped-def]
            register(Crashes)

    register_plugin(Plugin(), "crashing-plugin")
    out = run(
        config(tiny_model_dir, policies=["crashes", "recent"], samples=[1], cache_sizes=[16]),
        tmp_path / "run",
        progress=False,
    )
    cells = pl.read_parquet(out / "cells" / "*.parquet")
    failed = cells.filter(pl.col("status") == "failed").row(0, named=True)
    assert failed["policy"] == "crashes" and "boom" in failed["error"] and failed["plugin"] == "crashing-plugin"
    assert set(cells.filter(pl.col("status") == "ok")["policy"]) == {"full", "recent"}


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"policies": ["stremaing"]}, "Did you mean 'streaming'"),
        ({"cache_sizes": [4], "stride": 2}, "start_size"),
        ({"stride": 40}, "must be below the cache limit"),
        ({"stride": 0}, "positive"),
        ({"gen": -1}, "positive"),
        ({"samples": [1, 2]}, "one per length"),
        ({"positions": ["absolute"]}, "true and/or shift"),
        ({"lengths": [100000]}, "longest"),
        ({"skip_layers": [9]}, "layers 0..3"),
        ({"dataset": "pg91"}, "gutenberg"),
        ({"model": "/no/such/model"}, "no such file or folder"),
    ],
)
def test_bad_input_is_refused_before_any_measurement(
    tiny_model_dir: Path, tmp_path: Path, changes: dict[str, object], message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kvcompare.engine.executor import Executor

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("measured despite bad input")

    monkeypatch.setattr(Executor, "score_batch", never)
    monkeypatch.setattr(Executor, "generate", never)
    with pytest.raises(KVCompareError, match=message):
        run(config(tiny_model_dir, **changes), tmp_path / "run", progress=False)


def test_cli_bad_input_exits_2_with_a_clear_message(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["run", "--policies", "l2:mode=rnd", "--model", str(tiny_model_dir), "--out", str(tmp_path / "x")])
    assert code == 2
    assert "not one of keep_low, keep_high, random" in capsys.readouterr().err


def test_cli_run_prints_the_table_and_writes_the_report(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cli"
    args = [
        "run",
        "--policies",
        "streaming,l2:mode=random",
        "--cache",
        "16",
        "--lengths",
        "48",
        "--samples",
        "1",
        "--model",
        str(tiny_model_dir),
        "--dataset",
        str(CORPUS),
        "--stride",
        "8",
        "--gen",
        "2",
        "--warmup",
        "0",
        "--skip-layers",
        "none",
        "--out",
        str(out),
        "--quiet",
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "l2:mode=random" in printed and "streaming" in printed and str(out) in printed
    assert (out / "report" / "index.html").exists() and (out / "report" / "report.md").exists()
    cells = pl.read_parquet(out / "cells" / "*.parquet")
    assert set(cells["skip_layers"]) == {"[]"}
    assert json.loads(cells.filter(pl.col("policy") == "l2")["policy_params"][0]) == {"mode": "random", "seed": 0}


class RecordingBar:
    """Stands in for tqdm: records the total and every update."""

    bars: ClassVar[list[RecordingBar]] = []

    def __init__(self, total: int, **kwargs: object) -> None:
        self.total, self.done, self.at_end = total, 0, ""
        self.bars.append(self)

    def update(self, n: int) -> None:
        self.done += n

    def set_postfix_str(self, label: str, refresh: bool = True) -> None:
        self.at_end = label

    def close(self) -> None:
        pass


def test_the_progress_bar_counts_every_pass_controls_included(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import kvcompare.run.runner

    monkeypatch.setattr(kvcompare.run.runner, "tqdm", RecordingBar)
    RecordingBar.bars.clear()
    grid = {"cache_sizes": [16], "samples": [1], "repeats": 2}
    out = run(config(tiny_model_dir, policies=["recent", "l2"], **grid), tmp_path / "run", progress=False)
    # 3 quality passes; per round 3 trials, the A/A control and full's one-pass prefill
    run(config(tiny_model_dir, policies=["recent", "l2", "streaming"], **grid), out, resume=True, progress=False)
    # 1 quality pass; per round streaming, full timed again as a baseline and its A/A control
    first, resumed = RecordingBar.bars
    assert (first.total, first.done) == (3 + 2 * 5, 3 + 2 * 5)
    assert (resumed.total, resumed.done) == (1 + 2 * 3, 1 + 2 * 3)
    assert "aa_control" in first.at_end or "cell" in first.at_end
