"""Batched quality passes: each row equals its cell's pass alone, under any policy, limit, mode and budget."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import polars as pl
import pytest
import torch
from runs import tiny_run

from kvcompare.config import CacheConfig
from kvcompare.engine.batched import BatchedKVCache
from kvcompare.engine.cache_protocol import LayerGroup, Room
from kvcompare.engine.executor import Executor, QualityResult
from kvcompare.engine.storage import CacheLayout, CacheStorage
from kvcompare.plugins import get_registry
from kvcompare.policy import ScoredPolicy
from kvcompare.run.quality_batch import quality_batches, row_bytes
from kvcompare.run.runner import run
from kvcompare.testing import builtin_policies, tiny_llama, tiny_neox

#: Every built-in policy (and some variants), with limits and position modes mixed inside one batch.
CELLS = [
    (spec, (12, 16, 14, 20)[i % 4], ("shift", "true")[i % 2])
    for i, spec in enumerate([*builtin_policies(), "l2:mode=random", "tova:per_head=true"])
]


def cells_of(specs: list[tuple[str, int | None, str]], stride: int, skip: tuple[int, ...], **cache: object):
    registry = get_registry()
    return [(registry.build(spec), CacheConfig(limit, stride, mode, skip, **cache)) for spec, limit, mode in specs]  # type: ignore[arg-type]


def one_by_one(executor: Executor, tokens: torch.Tensor, cells: list) -> list[QualityResult]:
    return [executor.score(tokens, policy, config) for policy, config in cells]


def ok(results: list) -> list[QualityResult]:
    for result in results:
        if isinstance(result, Exception):
            raise result
    return results


@pytest.mark.parametrize("skip", [(1,), ()])
@pytest.mark.parametrize("stride,evict_block", [(5, 1), (3, 4), (1, 1)])
def test_every_row_equals_its_cell_alone(
    tiny_model: torch.nn.Module, tokens: torch.Tensor, skip: tuple[int, ...], stride: int, evict_block: int
) -> None:
    executor = Executor(tiny_model.double())  # float64: any difference would be a bug, not rounding
    cells = cells_of(CELLS, stride, skip, evict_block=evict_block)
    batched = ok(executor.score_batch(tokens, cells))
    for (policy, config), alone, row in zip(cells, one_by_one(executor, tokens, cells), batched, strict=True):
        where = f"{policy.label()} at {config.limit}, {config.positions}"
        assert row.batch == len(cells) and alone.batch == 1
        torch.testing.assert_close(
            torch.from_numpy(row.nll), torch.from_numpy(alone.nll), rtol=1e-9, atol=1e-9, msg=where
        )
        assert (row.correct == alone.correct).all(), where
        assert row.max_cached == alone.max_cached <= config.limit, where
        assert row.peak_kv_bytes == alone.peak_kv_bytes, where


def test_rows_in_float32_give_the_same_perplexity(tokens: torch.Tensor) -> None:
    executor = Executor(tiny_llama())
    cells = cells_of(CELLS, 4, (0,))
    for alone, row in zip(one_by_one(executor, tokens, cells), ok(executor.score_batch(tokens, cells)), strict=True):
        assert math.exp(row.nll.mean()) == pytest.approx(math.exp(alone.nll.mean()), rel=1e-4)
        assert (row.correct == alone.correct).mean() > 0.97


def test_rows_under_layer_budgets_equal_their_cells_alone(tokens: torch.Tensor) -> None:
    executor = Executor(tiny_llama(num_hidden_layers=6).double())
    specs = [("streaming", 24, "shift"), ("h2o", 24, "true"), ("l2", 16, "shift")]
    cells = cells_of(specs, 3, (0,), layer_budget="pyramid:beta=4")
    cells += cells_of([("recent", 20, "true")], 3, (0,))  # a uniform row beside pyramid rows
    for alone, row in zip(one_by_one(executor, tokens, cells), ok(executor.score_batch(tokens, cells)), strict=True):
        torch.testing.assert_close(torch.from_numpy(row.nll), torch.from_numpy(alone.nll), rtol=1e-9, atol=1e-9)


def sharp(make: Callable[..., torch.nn.Module], dtype: torch.dtype) -> Executor:
    """A tiny model in ``dtype`` with larger weights: sharper attention, so a wrongly rotated key shows in scores."""
    return Executor(make(initializer_range=0.15).to(dtype))


LOW_PRECISION = [torch.bfloat16, torch.float16]


@pytest.mark.parametrize("make", [tiny_llama, tiny_neox], ids=["llama", "neox"])
@pytest.mark.parametrize("positions", ["shift", "true"])
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_rows_in_low_precision_equal_their_cells_alone(
    tokens: torch.Tensor, make: Callable[..., torch.nn.Module], positions: str, dtype: torch.dtype
) -> None:
    # A row that shares the first row's computation until it evicts must also be given the keys as written,
    # from which shift mode rebuilds moved keys in bfloat16/float16 (it once rebuilt them from zeros).
    executor = sharp(make, dtype)
    cells = cells_of([(spec, limit, positions) for spec, limit, _ in CELLS], 4, (0,))
    for (policy, config), alone, row in zip(
        cells, one_by_one(executor, tokens, cells), ok(executor.score_batch(tokens, cells)), strict=True
    ):
        where = f"{policy.label()} at {config.limit}, {positions}, {dtype}"
        assert float(abs(row.nll - alone.nll).max()) < 1e-2, where  # rounding of batched kernels: ~1e-3 at most
        assert math.exp(row.nll.mean()) == pytest.approx(math.exp(alone.nll.mean()), rel=1e-4), where
        assert (row.correct == alone.correct).mean() > 0.97, where


@pytest.mark.parametrize("dtype", [torch.float32, *LOW_PRECISION], ids=str)
def test_every_buffer_a_row_owns_ends_as_its_cell_alone(tokens: torch.Tensor, dtype: torch.dtype) -> None:
    # Rows that join the batch late (the fork) must hold, buffer by buffer, what their cell alone holds.
    executor = sharp(tiny_llama, dtype)
    cells = cells_of([("streaming", 12, "shift"), ("recent", 16, "shift"), ("l2:mode=random", 24, "shift")], 4, (1,))
    batch = executor.new_batch(cells, capacity=tokens.numel())
    alone = [executor.new_cache(*cell, capacity=tokens.numel()) for cell in cells]
    with executor.attached():
        for start in range(0, tokens.numel(), 4):
            for cache in (batch, *alone):
                executor.forward(cache, tokens[start : start + 4].view(1, -1))
    assert batch.rows == len(cells)
    for cell, cache in enumerate(alone):
        row = in_token_order(batch.storage.row(batch.row_of[cell]), cache.slot_tokens.shape[-1])
        mine = in_token_order(cache.storage)
        for field in dataclasses.fields(CacheStorage):
            ours, theirs = getattr(row, field.name), getattr(mine, field.name)
            assert (ours is None) == (theirs is None), field.name
            if ours is not None:
                what = f"{field.name} of {cells[cell][0].label()}"
                torch.testing.assert_close(ours, theirs, msg=lambda m, what=what: f"{what}: {m}")


def in_token_order(storage: CacheStorage, slots: int | None = None) -> CacheStorage:
    """``storage`` with the first ``slots`` slots of each compressed layer and head sorted by token index: slots
    of tokens written in one chunk may be taken in any order (ties among victims), which attention never sees."""
    order = storage.slot_tokens[..., :slots].argsort(dim=-1)

    def sort(name: str, buffer: torch.Tensor | None) -> torch.Tensor | None:
        if buffer is None or name == "full_kv":
            return buffer
        if buffer.dim() == order.dim():  # per slot: [layers, batch, kv_heads, slots]
            return buffer[..., :slots].gather(-1, order)
        index = order.unsqueeze(-1).expand(*order.shape, buffer.shape[-1])  # per slot and channel
        return buffer[..., :slots, :].gather(-2, index.expand(*buffer.shape[:-2], *index.shape[-2:]))

    return CacheStorage(**{f.name: sort(f.name, getattr(storage, f.name)) for f in dataclasses.fields(CacheStorage)})


class RowWatcher:
    """Records, per chunk, how many rows the model ran, and what each row's queries could see."""

    def __init__(self, cache: BatchedKVCache) -> None:
        self.fed: list[int] = []
        self.visible: dict[int, int] = {}  # batch row -> most slots one query of it attended
        make_room, mask_of = cache.make_room, cache.attention_mask

        def watched_make_room(chunk: int) -> Room:
            room = make_room(chunk)
            self.fed.append(cache.rows)
            return room

        def watched_mask(layer_idx: int, q_len: int, kv_len: int, window: float | None = None):  # type: ignore[no-untyped-def]
            mask, is_causal = mask_of(layer_idx, q_len, kv_len, window)
            if cache.layer_slot(layer_idx).group is LayerGroup.COMPRESSED:
                spans = cache.spans(layer_idx) or [(0, cache.rows, kv_len)]
                for first, end, slots in spans:
                    for row in range(first, end):
                        if mask is None or mask.dim() == 2:  # time order: the chunk sees every earlier key
                            seen = slots
                        else:
                            seen = int(mask[row, ..., :slots].sum(dim=-1).max())
                        self.visible[row] = max(self.visible.get(row, 0), seen)
            return mask, is_causal

        cache.make_room = watched_make_room  # type: ignore[method-assign]
        cache.attention_mask = watched_mask  # type: ignore[method-assign]


def test_rows_share_one_row_until_they_first_evict_and_never_see_past_their_limit(tokens: torch.Tensor) -> None:
    executor = Executor(tiny_llama())
    cells = cells_of(
        [("l2", 24, "shift"), ("streaming", 12, "true"), ("h2o", 24, "true"), ("recent", 12, "shift")], 4, (1,)
    )
    batch = executor.new_batch(cells, capacity=tokens.numel())
    watcher = RowWatcher(batch)
    assert [c.limit for c in batch.caches] == [12, 12, 24, 24]  # rows in the order they first evict
    with executor.attached():
        for start in range(0, tokens.numel(), 4):
            executor.forward(batch, tokens[start : start + 4].view(1, -1))
    # 12 tokens fit every row: one row runs; then the two rows at 12 run on their own beside one row for the
    # two at 24; from 24 tokens on, every row runs.
    assert watcher.fed == [1, 1, 1, 3, 3, 3, 4, 4, 4, 4, 4, 4]
    for row, cache in enumerate(batch.caches):
        assert watcher.visible[row] <= cache.limit
        assert cache.evictions > 0 and max(cache.lengths().values()) == tokens.numel()  # skip layer 1 keeps all


def test_full_cells_in_both_position_modes_run_as_one_row(tokens: torch.Tensor) -> None:
    executor = Executor(tiny_llama())
    cells = cells_of([("full", None, "true"), ("full", None, "shift")], 5, (0, 1))
    batch = executor.new_batch(cells, capacity=tokens.numel())
    watcher = RowWatcher(batch)
    with executor.attached():
        for start in range(0, tokens.numel() - 1, 5):
            executor.forward(batch, tokens[start : start + 5].view(1, -1))
    assert set(watcher.fed) == {1}
    alone = executor.score(tokens, *cells[0])
    for row in ok(executor.score_batch(tokens, cells)):
        assert (row.nll == alone.nll).all()


@dataclasses.dataclass
class BreaksAtSecondEviction(ScoredPolicy):
    """Scores like recent, then raises: a third-party policy with a bug."""

    name: ClassVar[str] = "breaks"

    def __post_init__(self) -> None:
        self.calls = 0

    def score(self, keys: torch.Tensor, positions: torch.Tensor, signals: object = None) -> torch.Tensor:
        self.calls += 1
        if self.calls == 2:
            raise RuntimeError("bug in the policy")
        return positions.float()


def test_a_crashing_policy_fails_only_its_own_row(tokens: torch.Tensor) -> None:
    executor = Executor(tiny_llama())
    cells = cells_of([("streaming", 12, "shift"), ("h2o", 16, "true")], 4, (0,))
    cells.insert(1, (BreaksAtSecondEviction(), CacheConfig(12, 4, "shift", (0,))))
    results = executor.score_batch(tokens, cells)
    assert isinstance(results[1], RuntimeError) and "bug in the policy" in str(results[1])
    for index in (0, 2):
        alone = executor.score(tokens, *cells[index])
        assert isinstance(results[index], QualityResult)
        assert results[index].nll == pytest.approx(alone.nll, rel=1e-5)  # type: ignore[union-attr]
    with pytest.raises(RuntimeError, match="bug in the policy"):  # alone, its error is raised as before
        executor.score(tokens, *cells[1])


def test_batches_group_cells_that_bound_the_same_layers_within_the_memory_budget() -> None:
    layout = CacheLayout(
        num_layers=4, kv_heads=2, head_dim=16, dtype=torch.float32, device=torch.device("cpu"), heads=4
    )
    cells = cells_of(
        [
            ("full", None, "true"),
            ("streaming", 16, "shift"),
            ("l2", 32, "shift"),
            ("full", None, "shift"),
            ("h2o", 16, "true"),
        ],
        4,
        (0,),
    )
    kwargs = {"length": 256, "vocab": 100}
    assert quality_batches(cells, layout, budget=10**12, **kwargs) == [[0, 3], [1, 2, 4]]
    assert quality_batches(cells, layout, budget=10**12, most=2, **kwargs) == [[0, 3], [1, 2], [4]]
    assert quality_batches(cells, layout, budget=1, **kwargs) == [[0], [3], [1], [2], [4]]
    # the budget holds rows at the widest row's slots: two rows at 32 slots fit where three do not
    two = sum(row_bytes(layout, *cells[i], 256, 32, 100) for i in (1, 2))
    assert quality_batches(cells, layout, budget=two, **kwargs)[-2:] == [[1, 2], [4]]
    h2o, streaming = (row_bytes(layout, *cells[i], 256, 16, 100) for i in (4, 1))
    assert h2o > streaming  # it reads attention: the signal buffers count


def test_a_batch_that_fails_as_a_whole_is_run_again_cell_by_cell(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real = Executor.score_batch

    def no_batches(self: Executor, tokens: torch.Tensor, cells: list):  # type: ignore[no-untyped-def]
        if len(cells) > 1:
            raise MemoryError("the batch does not fit")
        return real(self, tokens, cells)

    monkeypatch.setattr(Executor, "score_batch", no_batches)
    out = run(tiny_run(tiny_model_dir, policies=["streaming", "l2"], repeats=1), tmp_path / "run", progress=False)
    rows = pl.read_parquet(out / "cells" / "*.parquet")
    assert rows["status"].to_list() == ["ok"] * 3 and rows["quality_batch"].to_list() == [1, 1, 1]
    assert "one by one" in capsys.readouterr().err


def test_a_run_records_its_batches_and_gives_the_unbatched_figures(tiny_model_dir: Path, tmp_path: Path) -> None:
    spec = {
        "policies": ["streaming", "l2", "h2o"],
        "cache_sizes": [16, 24],
        "positions": ["true", "shift"],
        "repeats": 1,
    }
    batched = pl.read_parquet(
        run(tiny_run(tiny_model_dir, **spec), tmp_path / "b", progress=False) / "cells" / "*.parquet"
    )
    single = pl.read_parquet(
        run(tiny_run(tiny_model_dir, quality_batch=1, **spec), tmp_path / "s", progress=False) / "cells" / "*.parquet"
    )
    joined = batched.join(single, on="cell_id", suffix="_single")
    assert joined.height == batched.height == 14  # 3 policies x 2 limits x 2 modes, and full in each mode
    bounded = joined.filter(pl.col("cache_size").is_not_null())
    assert bounded["quality_batch"].unique().to_list() == [12] and single["quality_batch"].unique().to_list() == [1]
    assert bounded["quality_s"].n_unique() == 1  # each row is charged the batch's wall time / its rows
    for row in joined.iter_rows(named=True):
        assert row["ppl"] == pytest.approx(row["ppl_single"], rel=1e-5)
        assert row["accuracy"] == pytest.approx(row["accuracy_single"], abs=1 / row["tokens_scored"])
        assert row["peak_mem_bytes"] is not None  # from the cell's own latency trials


def test_quality_batch_is_checked_and_may_change_on_resume(tiny_model_dir: Path, tmp_path: Path) -> None:
    from kvcompare.config import ConfigError

    with pytest.raises(ConfigError, match="--quality-batch must be a positive number"):
        run(tiny_run(tiny_model_dir, quality_batch=0), tmp_path / "bad", progress=False)
    out = run(tiny_run(tiny_model_dir, quality_batch=1, repeats=1), tmp_path / "run", progress=False)
    more = tiny_run(tiny_model_dir, quality_batch=4, repeats=1, policies=["recent", "streaming"])
    run(more, out, resume=True, progress=False)  # how cells are run is no part of what they measure
    assert pl.read_parquet(out / "cells" / "*.parquet").height == 3
