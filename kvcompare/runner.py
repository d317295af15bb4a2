"""`kvcompare run`: plan the grid of cells, check it before any work, measure each cell and write it at once."""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from kvcompare.corpus import Passage, load_corpus, sample_passages
from kvcompare.environment import environment
from kvcompare.executor import CacheConfig, Executor
from kvcompare.models import LoadedModel, load_model
from kvcompare.plugins import get_host
from kvcompare.policy import KVPolicy, PolicyError
from kvcompare.protocol import LatencySettings, measure_cell
from kvcompare.results import RunFolder, cell_id


class ConfigError(ValueError):
    """A run configuration that cannot work, found before any measurement starts."""


@dataclasses.dataclass
class RunConfig:
    """Everything a run is asked to do; recorded whole in run.json."""

    policies: list[str]
    cache_sizes: list[int]
    lengths: list[int]
    samples: list[int]  # per length
    model: str = "smollm2-135m"
    dataset: str = "gutenberg"
    device: str = "cpu"
    dtype: str = "float32"
    stride: int = 64
    positions: list[str] = dataclasses.field(default_factory=lambda: ["shift"])
    skip_layers: list[int] = dataclasses.field(default_factory=lambda: [0, 1])
    evict_block: int = 1
    gen: int = 32
    warmup: int = 4
    seed: int = 0
    bucket: int = 128
    baseline: bool = True
    all_books: bool = False
    text_column: str = "text"


@dataclasses.dataclass(frozen=True)
class Cell:
    passage: Passage
    policy: KVPolicy
    plugin: str
    cache: CacheConfig

    def describe(self, config: RunConfig) -> dict[str, Any]:
        """The fields that identify this cell in the results."""
        return {
            "model": config.model,
            "dataset": config.dataset,
            "source": self.passage.source,
            "token_offset": self.passage.token_offset,
            "sample_id": self.passage.sample_id,
            "policy": self.policy.name,
            "policy_label": self.policy.label(),
            "policy_params": self.policy.params_json(),
            "plugin": self.plugin,
            "cache_size": self.cache.limit,
            "seq_len": len(self.passage.tokens),
            "stride": self.cache.stride,
            "evict_block": self.cache.evict_block,
            "positions": self.cache.positions,
            "skip_layers": json.dumps(list(self.cache.skip_layers)),
            "device": config.device,
            "dtype": config.dtype,
            "gen_tokens": config.gen,
            "warmup": config.warmup,
        }


def build_policies(config: RunConfig) -> list[tuple[KVPolicy, str]]:
    """The policies asked for (plus the `full` baseline unless turned off), each with its plugin."""
    host = get_host()
    registry = host.registry()
    specs = list(config.policies)
    if config.baseline and "full" not in specs:
        specs.insert(0, "full")
    policies, labels = [], set()
    for spec in specs:
        try:
            policy = registry.build(spec)
        except PolicyError as err:
            failed = "; ".join(f"{f.name}: {f.error}" for f in host.failures)
            raise ConfigError(f"{err}" + (f" (plugins that failed to load: {failed})" if failed else "")) from None
        if policy.label() not in labels:
            labels.add(policy.label())
            policies.append((policy, registry.plugin_of(policy)))
    return policies


def check_config(config: RunConfig, policies: list[tuple[KVPolicy, str]]) -> None:
    """Refuse what cannot work before anything is loaded or measured."""
    for name in ("stride", "evict_block", "gen", "bucket"):
        if getattr(config, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be a positive number, not {getattr(config, name)}")
    if config.warmup < 0:
        raise ConfigError("--warmup must be 0 or more")
    for label, values in (
        ("--cache", config.cache_sizes),
        ("--lengths", config.lengths),
        ("--samples", config.samples),
    ):
        if not values or min(values) < 1:
            raise ConfigError(f"{label} needs positive numbers, got {values}")
    if len(config.samples) != len(config.lengths):
        raise ConfigError(
            f"--samples gives {len(config.samples)} counts for {len(config.lengths)} lengths: "
            "give one, or one per length"
        )
    for mode in config.positions:
        if mode not in ("true", "shift"):
            raise ConfigError(f"--positions takes true and/or shift, not {mode!r}")
    if any(p.bounded for p, _ in policies):
        for limit in config.cache_sizes:
            if config.stride >= limit:
                raise ConfigError(
                    f"--stride {config.stride} must be below the cache limit {limit}: "
                    "a chunk must fit beside kept tokens"
                )
            min_keep = limit - config.stride - config.evict_block + 1
            if min_keep < 1:
                raise ConfigError(
                    f"--evict-block {config.evict_block} is too large for limit {limit} and stride {config.stride}"
                )
            for policy, _ in policies:
                if policy.bounded:
                    try:
                        policy.check_limit(min_keep)
                    except PolicyError as err:
                        raise ConfigError(f"--cache {limit}: {err}") from None
    if min(config.lengths) < 2:
        raise ConfigError("--lengths must be at least 2 tokens")


def plan_cells(config: RunConfig, policies: list[tuple[KVPolicy, str]], passages: list[Passage]) -> list[Cell]:
    """Policies interleaved within each passage, so that drift in machine speed touches all of them alike."""
    cells = []
    for passage in passages:
        for mode in config.positions:
            for policy, plugin in policies:
                limits: list[int | None] = list(config.cache_sizes) if policy.bounded else [None]
                for limit in limits:
                    cache = CacheConfig(limit, config.stride, mode, tuple(config.skip_layers), config.evict_block)
                    cells.append(Cell(passage, policy, plugin, cache))
    return cells


def _timestamp() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def run(config: RunConfig, out: Path, *, resume: bool = False, force: bool = False, progress: bool = True) -> Path:
    """Measure every cell of the grid into ``out``; return the results folder."""
    policies = build_policies(config)
    check_config(config, policies)
    folder = RunFolder(out, resume=resume, force=force)
    loaded = load_model(config.model, config.device, config.dtype)
    layers = loaded.info["num_layers"]
    if any(not 0 <= i < layers for i in config.skip_layers):
        raise ConfigError(f"--skip-layers {config.skip_layers}: {config.model} has layers 0..{layers - 1}")
    corpus = load_corpus(config.dataset, text_column=config.text_column, include_all=config.all_books)
    encode = functools.cache(loaded.encode)  # each document is tokenized once, whatever the number of lengths
    passages = [
        p
        for length, samples in zip(config.lengths, config.samples, strict=True)
        for p in sample_passages(corpus, encode, length, samples, config.seed)
    ]
    cells = plan_cells(config, policies, passages)
    previous = folder.read_run_json()
    run_id = (
        previous.get("run_id") or f"{datetime.datetime.now():%Y%m%d-%H%M%S}-{cell_id(dataclasses.asdict(config))[:6]}"
    )
    meta = {
        "run_id": run_id,
        "command": " ".join(["kvcompare", *sys.argv[1:]])
        if Path(sys.argv[0]).name == "kvcompare"
        else " ".join(sys.argv),
        "config": dataclasses.asdict(config),
        "model_info": loaded.info,
        "corpus": corpus.describe(),
        "environment": environment(torch.device(config.device)),
        "started_at": previous.get("started_at") or _timestamp(),
        "resumed_at": _timestamp() if resume and previous else None,
        "finished_at": None,
        "cells_planned": len(cells),
        "passages": [
            {"source": p.source, "token_offset": p.token_offset, "seq_len": len(p.tokens), "sample_id": p.sample_id}
            for p in passages
        ],
    }
    folder.write_run_json(meta)
    _measure_all(cells, config, loaded, folder, run_id, progress)
    meta["finished_at"] = _timestamp()
    folder.write_run_json(meta)
    return out


def _measure_all(
    cells: list[Cell], config: RunConfig, loaded: LoadedModel, folder: RunFolder, run_id: str, progress: bool
) -> None:
    done = folder.finished()
    todo = [c for c in cells if cell_id(c.describe(config)) not in done]
    if len(todo) < len(cells):
        print(f"resuming: {len(cells) - len(todo)} of {len(cells)} cells already finished", file=sys.stderr)
    executor = Executor(loaded.model)
    latency = LatencySettings(config.gen, config.warmup)
    if todo:
        _warm_up(executor, todo[0], latency)
    failures = 0
    bar = tqdm(todo, desc="cells", unit="cell", disable=not progress, file=sys.stderr)
    try:
        for cell in bar:
            bar.set_postfix_str(f"{cell.policy.label()} cache={cell.cache.limit} len={len(cell.passage.tokens)}")
            described = cell.describe(config)
            row: dict[str, Any] = {"run_id": run_id, "cell_id": cell_id(described), **described}
            started = time.perf_counter()
            tokens = torch.tensor(cell.passage.tokens, dtype=torch.long)
            try:
                fields, curve = measure_cell(
                    executor, tokens, cell.policy, cell.plugin, cell.cache, latency, config.bucket
                )
                row.update(fields, status="ok")
            except (KeyboardInterrupt, MemoryError):
                raise
            except Exception as err:  # one failing policy must not lose the other cells
                failures += 1
                row.update(status="failed", error=f"{type(err).__name__}: {err}")
                curve = []
                print(f"\ncell failed: {cell.policy.label()} (plugin {cell.plugin}): {row['error']}", file=sys.stderr)
                traceback.print_exc(limit=3)
            row.update(wall_s=time.perf_counter() - started, finished_at=_timestamp())
            for point in curve:
                point.update(
                    {
                        k: row[k]
                        for k in (
                            "run_id",
                            "cell_id",
                            "policy",
                            "policy_label",
                            "cache_size",
                            "seq_len",
                            "positions",
                            "sample_id",
                        )
                    }
                )
            folder.write_cell(row, curve)
    except KeyboardInterrupt:
        bar.close()
        print(f"\ninterrupted: finished cells are kept in {folder.path}; add --resume to continue", file=sys.stderr)
        raise
    if failures:
        print(f"{failures} cell(s) failed; their errors are in the results (status = 'failed')", file=sys.stderr)


def _warm_up(executor: Executor, cell: Cell, latency: LatencySettings) -> None:
    """One untimed pass before the first measurement, so that no cell pays for first-call allocation."""
    length = min(len(cell.passage.tokens), 2 * cell.cache.stride + 1)
    tokens = torch.tensor(cell.passage.tokens[:length], dtype=torch.long)
    policy, plugin = cell.policy, cell.plugin
    executor.generate(tokens, policy, plugin, dataclasses.replace(cell.cache, limit=None), gen=2, warmup=latency.warmup)
