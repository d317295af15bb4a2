"""The prefill setting as a run axis: --compression, --ratio and --query-aware from the command line to the rows.

The engine's kept sets are proven against reference implementations in test_prefill_compression; here: the
budget a ratio gives each cell (from its own context), the split of ppl and of probes, what the rows record,
the errors a bad combination gets, and that a resumed run may add the setting.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from families import FAMILIES, Family
from runs import tiny_run

from kvcompare.config import CacheConfig, ConfigError, RunConfig, ratio_limit
from kvcompare.engine.executor import Executor
from kvcompare.errors import KVCompareError
from kvcompare.plugins import get_registry
from kvcompare.run.plan import plan
from kvcompare.run.runner import run


def _args(**given: object) -> argparse.Namespace:
    args = argparse.Namespace(**{f.name: None for f in dataclasses.fields(RunConfig)}, preset=None, no_baseline=False)
    args.all_books, args.query_aware = False, False
    for key, value in given.items():
        setattr(args, key, value)
    return args


def test_ratio_replaces_the_cache_limits_and_both_together_are_refused() -> None:
    from kvcompare.cli import run_config

    assert run_config(_args(ratios=[0.5])).cache_sizes == []
    assert run_config(_args(ratios=[0.5], preset="report")).cache_sizes == []
    with pytest.raises(ConfigError, match="--cache and --ratio"):
        run_config(_args(ratios=[0.5], cache_sizes=[64]))


def test_ratio_limit_is_what_kvpress_keeps() -> None:
    # kvpress's ScorerPress keeps int(k_len * (1 - compression_ratio)) tokens.
    assert [ratio_limit(2048, r) for r in (0.25, 0.5, 0.75)] == [1536, 1024, 512]
    assert ratio_limit(101, 0.5) == 50
    assert ratio_limit(100, 0.0) == 100


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"ratios": [1.0], "cache_sizes": []}, "--ratio takes shares"),
        ({"ratios": [-0.1], "cache_sizes": []}, "--ratio takes shares"),
        ({"compression": ["once"]}, "--compression takes continuous and/or prefill"),
        ({"query_aware": True}, "--query-aware applies to the prefill setting"),
        ({"compression": ["prefill"], "policies": ["snapkv"], "cache_sizes": [16]}, "window=32"),
        (
            {"compression": ["prefill"], "layer_budget": "pyramid:window=16", "cache_sizes": [16]},
            "keeps a window of 16 tokens in every layer",
        ),
        ({"layer_budget": "pyramid:window=0"}, "pyramid:beta=B:window=W"),
    ],
)
def test_bad_settings_are_refused_before_measuring(
    tiny_model_dir: Path, tmp_path: Path, changes: dict[str, object], message: str
) -> None:
    with pytest.raises(KVCompareError, match=message):
        run(tiny_run(tiny_model_dir, **changes), tmp_path / "run", progress=False)


def test_a_pyramid_keeps_its_window_in_every_layer_in_the_prefill_setting(tiny_model_dir: Path) -> None:
    from kvcompare.engine.budgets import compressed_layer_budgets

    config = tiny_run(tiny_model_dir, layer_budget="pyramid:beta=4:window=12", compression=["prefill"])
    cache = config.cache_config(40, "true", "prefill")
    budgets = compressed_layer_budgets(cache, 4)  # skip layer 0: three compressed layers
    assert sum(budgets) == 3 * 40 and budgets == sorted(budgets, reverse=True)
    assert budgets[-1] == 12 + (40 - 12) // 4  # the top layer: the window and (limit - window) / beta
    continuous = compressed_layer_budgets(config.cache_config(40, "true"), 4)
    assert continuous != budgets  # the continuous setting keeps room for a chunk instead


def test_a_ratio_gives_each_cell_a_budget_from_its_own_context(tiny_model_dir: Path) -> None:
    config = tiny_run(
        tiny_model_dir,
        policies=["streaming"],
        cache_sizes=[],
        ratios=[0.5],
        compression=["continuous", "prefill"],
        tasks=["ppl", "passkey:depths=0.5"],
        lengths=[256],
    )
    grid = plan(config)
    ppl = {c.cache.compression: c for c in grid.cells if c.probe is None and c.policy.bounded}
    assert ppl["continuous"].cache.limit == 128  # the whole passage is the context
    assert ppl["continuous"].context_tokens is None
    assert ppl["prefill"].context_tokens == 128  # ppl: the passage's first half
    assert ppl["prefill"].cache.limit == 64
    assert len(ppl["prefill"].prompt) == 128  # the latency pass prefills the context alone
    probe = {c.cache.compression: c for c in grid.cells if c.probe is not None and c.policy.bounded}
    context = len(probe["prefill"].probe.context)  # type: ignore[union-attr]
    assert probe["prefill"].context_tokens == context < 256  # query-agnostic: the question is not compressed
    assert probe["prefill"].cache.limit == context // 2
    assert probe["continuous"].cache.limit == 128
    assert all(c.cache.ratio == 0.5 for c in grid.cells if c.policy.bounded)
    # every cell of the grid is distinct, and `full` has one cell per setting
    assert len({c.id for c in grid.cells}) == len(grid.cells)
    assert sorted(c.cache.compression for c in grid.cells if c.probe is None and not c.policy.bounded) == [
        "continuous",
        "prefill",
    ]


def test_query_aware_compresses_the_question_with_the_context(tiny_model_dir: Path) -> None:
    config = tiny_run(
        tiny_model_dir,
        policies=["streaming"],
        cache_sizes=[],
        ratios=[0.5],
        compression=["prefill"],
        tasks=["passkey:depths=0.5"],
        lengths=[256],
        query_aware=True,
    )
    (cell,) = [c for c in plan(config).cells if c.policy.bounded]
    assert cell.context_tokens == 256
    assert cell.cache.limit == 128
    assert cell.fields["query_aware"] is True


def test_a_prefill_run_records_the_setting_and_scores_after_the_context(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    config = tiny_run(
        tiny_model_dir,
        policies=["streaming", "snapkv:window=4"],
        cache_sizes=[],
        ratios=[0.5],
        compression=["prefill"],
        lengths=[96],
        repeats=1,
        threads=1,
    )
    run(config, out, progress=False)
    rows = pl.read_parquet(out / "cells" / "*.parquet")
    assert set(rows["status"]) == {"ok"}
    assert set(rows["compression"]) == {"prefill"}
    assert set(rows["context_tokens"]) == {48}
    assert set(rows["tokens_scored"]) == {96 - 1 - 48}  # predictions made on the compressed cache
    bounded = rows.filter(pl.col("policy") != "full")
    assert set(bounded["cache_size"]) == {24} and set(bounded["ratio"]) == {0.5}
    assert (bounded["kv_bytes_compressed"] < bounded["peak_kv_bytes"]).all()
    assert (bounded["compress_s"] > 0).all() and (bounded["compress_share"] < 1).all()
    full = rows.filter(pl.col("policy") == "full")
    assert full["compress_s"].is_null().all() and full["kv_bytes_compressed"].is_null().all()
    timings = pl.read_parquet(out / "timings" / "*.parquet")
    assert set(timings["compression"]) == {"prefill"}
    meta = json.loads((out / "run.json").read_text())
    assert meta["config"]["compression"] == ["prefill"] and meta["config"]["ratios"] == [0.5]


def test_a_prefill_cells_peak_kv_is_what_the_docs_say(tiny_model_dir: Path, tmp_path: Path) -> None:
    """In the prefill setting `peak_kv_bytes` is the quality pass's end: the compressed context plus the passage's
    second half, scored on it and never compressed, in every layer; more than the whole context's before the
    compression, which the README once called it."""
    from kvcompare.protocol import PROTOCOL_MD
    from kvcompare.report.wording import COMPRESSION_DEFINITIONS

    config = tiny_run(tiny_model_dir, policies=["streaming"], cache_sizes=[], ratios=[0.5], compression=["prefill"])
    rows = pl.read_parquet(run(dataclasses.replace(config, lengths=[96], repeats=1), tmp_path / "run", progress=False)
                           / "cells" / "*.parquet")  # fmt: skip
    model = json.loads((tiny_model_dir / "config.json").read_text())
    head_dim = model["hidden_size"] // model["num_attention_heads"]
    token_bytes = 2 * model["num_key_value_heads"] * head_dim * 4 * model["num_hidden_layers"]  # float32, all layers
    for row in rows.iter_rows(named=True):
        after_context = token_bytes * (row["seq_len"] - 1 - row["context_tokens"])  # the tokens scored
        held = row["kv_bytes_compressed"] if row["policy"] != "full" else token_bytes * row["context_tokens"]
        assert row["peak_kv_bytes"] == held + after_context > token_bytes * row["context_tokens"], row
    said = " ".join(PROTOCOL_MD.split())
    assert "the quality pass's end: the compressed context plus the passage's second half" in said
    assert "whole context's, before it is compressed" not in said
    assert "whole context's, before it" not in COMPRESSION_DEFINITIONS["kv_bytes_compressed"]


def test_a_resumed_run_may_add_the_prefill_setting(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    base = {"policies": ["streaming"], "cache_sizes": [24], "lengths": [64], "repeats": 0, "threads": 1}
    run(tiny_run(tiny_model_dir, **base), out, progress=False)
    before = set(pl.read_parquet(out / "cells" / "*.parquet")["cell_id"])
    run(tiny_run(tiny_model_dir, **base, compression=["continuous", "prefill"]), out, resume=True, progress=False)
    rows = pl.read_parquet(out / "cells" / "*.parquet")
    assert before < set(rows["cell_id"])
    assert sorted(rows["compression"].to_list()) == ["continuous"] * 2 + ["prefill"] * 2
    with pytest.raises(ConfigError, match="compression"):
        run(tiny_run(tiny_model_dir, **base, compression=["prefill"]), out, resume=True, progress=False)


def test_a_resumed_continuous_run_may_add_the_query_aware_prefill_setting(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    base = {"policies": ["streaming"], "cache_sizes": [24], "lengths": [64], "repeats": 0, "threads": 1}
    run(tiny_run(tiny_model_dir, **base), out, progress=False)
    before = set(pl.read_parquet(out / "cells" / "*.parquet")["cell_id"])
    more = tiny_run(tiny_model_dir, **base, compression=["continuous", "prefill"], query_aware=True)
    run(more, out, resume=True, progress=False)  # no finished cell depends on query_aware
    rows = pl.read_parquet(out / "cells" / "*.parquet")
    assert before < set(rows["cell_id"]) and rows.height == 4
    assert set(rows.filter(pl.col("compression") == "prefill")["query_aware"]) == {True}
    meta = json.loads((out / "run.json").read_text())
    assert meta["resumes"][-1]["added"] == {"compression": ["prefill"]} and meta["config"]["query_aware"] is True
    with pytest.raises(ConfigError, match="query_aware: True then, False now"):  # now prefill cells depend on it
        run(tiny_run(tiny_model_dir, **base, compression=["continuous", "prefill"]), out, resume=True, progress=False)


@pytest.mark.parametrize(
    ("first", "then", "addable", "why"),
    [
        (
            {"cache_sizes": [24]},
            {"cache_sizes": [], "ratios": [0.5]},
            "policies, cache limits, position modes,",
            "a run budgeted by --cache cannot gain --ratio budgets",
        ),
        (
            {"cache_sizes": [], "ratios": [0.5]},
            {"cache_sizes": [24], "ratios": []},
            "policies, ratios, position modes,",
            "a run budgeted by --ratio cannot gain --cache budgets",
        ),
    ],
)
def test_resume_lists_only_the_budgets_a_run_can_gain(
    tiny_model_dir: Path,
    tmp_path: Path,
    first: dict[str, object],
    then: dict[str, object],
    addable: str,
    why: str,
) -> None:
    """--cache and --ratio exclude each other: a run budgeted by one can never gain the other."""
    out = tmp_path / "run"
    base = {"policies": ["streaming"], "lengths": [64], "repeats": 0, "threads": 1}
    run(tiny_run(tiny_model_dir, **base, **first), out, progress=False)
    with pytest.raises(ConfigError) as refused:
        run(tiny_run(tiny_model_dir, **base, **then), out, resume=True, progress=False)
    assert f"it may only add {addable}" in str(refused.value)
    assert f"{why} (they exclude each other)" in str(refused.value)


SUPPORTED = [family for family in FAMILIES if not family.refused]


@pytest.mark.parametrize("family", SUPPORTED, ids=[family.name for family in SUPPORTED])
def test_every_supported_family_compresses_once(family: Family) -> None:
    """Sliding windows, soft-caps, learned sinks, partial, interleaved or absent RoPE: a budget above the context
    gives `full`'s scores exactly, in both position modes, and a budget below it holds each layer to the budget
    and changes what comes after the context, not before."""
    model = family.build()
    executor = Executor(model)
    torch.manual_seed(1)
    tokens = torch.randint(0, model.config.vocab_size, (40,))
    context = 24
    full = executor.score(tokens, get_registry().build("full"), CacheConfig(None, 8, "true", (0,)))
    for positions in ("true", "shift") if executor.rotary[1] is not None else ("true",):
        policy = get_registry().build("snapkv:window=4:kernel=3")
        above = CacheConfig(64, 8, positions, (0,), compression="prefill")
        assert np.array_equal(executor.score(tokens, policy, above, context).nll, full.nll)
        below = CacheConfig(12, 8, positions, (0,), compression="prefill")
        cut = executor.score(tokens, policy, below, context)
        assert np.array_equal(cut.nll[: context - 1], full.nll[: context - 1])
        assert not np.array_equal(cut.nll[context:], full.nll[context:])
        cache = executor.new_cache(policy, below, capacity=context)
        with executor.attached():
            executor.prefill(cache, tokens[:context].view(1, -1), 8)
        assert cache.compress()
        assert set(cache.lengths().values()) == {12, context}  # compressed layers, and skip layer 0
