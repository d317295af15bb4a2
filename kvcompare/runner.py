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

from kvcompare import corpus as corpora
from kvcompare import models
from kvcompare.config import ConfigError, RunConfig
from kvcompare.corpus import Passage, load_corpus, sample_passages
from kvcompare.environment import environment
from kvcompare.executor import CacheConfig, Executor
from kvcompare.measure import LatencySettings, measure_cell
from kvcompare.models import LoadedModel, load_model
from kvcompare.plugins import get_host
from kvcompare.policy import KVPolicy, PolicyError
from kvcompare.results import RunFolder, cell_id
from kvcompare.schema import CURVE_CELL_COLUMNS

DEFAULT_RUNS_DIR = Path("reports/runs")


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
    if not config.policies:
        raise ConfigError(
            "no policies given: name at least one (see `kvcompare policies`), or `full` to measure only the baseline"
        )
    if any(i < 0 for i in config.skip_layers) or len(set(config.skip_layers)) != len(config.skip_layers):
        raise ConfigError(f"--skip-layers {config.skip_layers}: give distinct layer indices from 0 up, or none")
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


def new_run_id(config: RunConfig) -> str:
    """A UTC timestamp and a short hash of the configuration; also the default folder name."""
    return f"{datetime.datetime.now(datetime.UTC):%Y%m%d-%H%M%S}-{cell_id(dataclasses.asdict(config))[:6]}"


#: Grid fields a resumed run may extend (new cells) but never shrink; every other field must stay the same,
#: since it changes what a finished cell means.
GROWABLE = ("policies", "cache_sizes", "positions")


def resume_additions(previous: dict[str, Any], config: RunConfig) -> dict[str, Any]:
    """What ``config`` adds to the run recorded in ``previous``; refuse any change to what finished cells mean."""
    new = dataclasses.asdict(config)
    changed = []
    for key, old in previous.items():
        if key in GROWABLE or key in ("lengths", "samples") or key not in new:
            continue
        if new[key] != old:
            changed.append(f"{key}: {old!r} then, {new[key]!r} now")
    for key in GROWABLE:
        missing = [v for v in previous.get(key, []) if v not in new[key]]
        if missing:
            changed.append(f"{key}: {missing!r} would be dropped")
    old_samples = dict(zip(previous.get("lengths", []), previous.get("samples", []), strict=False))
    new_samples = dict(zip(config.lengths, config.samples, strict=True))
    for length, count in old_samples.items():
        if new_samples.get(length, 0) < count:
            changed.append(f"length {length}: {count} samples then, {new_samples.get(length, 0)} now")
    if changed:
        raise ConfigError(
            "--resume would mix cells measured under different settings; it may only add policies, cache limits, "
            "position modes, lengths or samples. Differences: "
            + "; ".join(changed)
            + ". Rerun with the original settings, or use another --out"
        )
    added: dict[str, Any] = {}
    for key in GROWABLE:
        extra = [v for v in new[key] if v not in previous.get(key, [])]
        if extra:
            added[key] = extra
    more = {n: c for n, c in new_samples.items() if c > old_samples.get(n, 0)}
    if more:
        added["samples_by_length"] = more
    return added


def check_layers(config: RunConfig, policies: list[tuple[KVPolicy, str]], loaded: LoadedModel) -> None:
    """Checks that need the model's shape: skip layers exist and leave some layer to compress."""
    layers = loaded.info["num_layers"]
    if any(not 0 <= i < layers for i in config.skip_layers):
        raise ConfigError(f"--skip-layers {config.skip_layers}: {config.model} has layers 0..{layers - 1}")
    if any(p.bounded for p, _ in policies) and set(range(layers)) <= set(config.skip_layers):
        raise ConfigError(
            f"--skip-layers covers all {layers} layers of {config.model}: nothing would be compressed, so every "
            "policy would equal full; skip fewer layers (e.g. --skip-layers 0,1)"
        )


def beyond_context_lengths(config: RunConfig, max_positions: int | None) -> list[int]:
    """Lengths whose latency pass reaches past the model's trained positions."""
    if not max_positions:
        return []
    return [n for n in config.lengths if config.latency_positions(n) > max_positions]


def run(
    config: RunConfig, out: Path | None = None, *, resume: bool = False, force: bool = False, progress: bool = True
) -> Path:
    """Measure every cell of the grid into ``out`` (default ``reports/runs/<run id>``); return the folder.

    Everything that can be checked cheaply is checked before the model loads, and nothing is written
    until the first cell is about to be measured.
    """
    policies = build_policies(config)
    check_config(config, policies)
    models.check_model_spec(config.model)
    models.check_device_and_dtype(config.device, config.dtype)
    corpora.check_dataset(config.dataset, text_column=config.text_column)
    run_id = new_run_id(config)
    folder = RunFolder(out if out is not None else DEFAULT_RUNS_DIR / run_id)
    folder.check(resume=resume, force=force)
    previous = folder.read_run_json() if resume else {}
    additions = resume_additions(previous["config"], config) if previous.get("config") else {}
    done = folder.finished() if resume else set()

    tokenizer = models.load_tokenizer(config.model)  # seconds: passages are drawn before the weights load
    corpus = load_corpus(config.dataset, text_column=config.text_column, include_all=config.all_books)
    encode = functools.cache(functools.partial(models.encode, tokenizer))  # each document tokenized once
    passages = [
        p
        for length, samples in zip(config.lengths, config.samples, strict=True)
        for p in sample_passages(corpus, encode, length, samples, config.seed)
    ]
    loaded = load_model(config.model, config.device, config.dtype, tokenizer=tokenizer)
    check_layers(config, policies, loaded)
    max_positions = loaded.info.get("max_position_embeddings")
    beyond = beyond_context_lengths(config, max_positions)
    if beyond:
        print(
            f"kvcompare: warning: lengths {beyond} (plus {config.warmup + config.gen} decoded tokens) go beyond "
            f"{config.model}'s {max_positions} trained positions; the full cache is then outside what the model "
            "was trained for. Measured anyway and marked beyond_context in every row.",
            file=sys.stderr,
        )
    cells = plan_cells(config, policies, passages)
    resumes = list(previous.get("resumes", []))
    if previous:
        resumes.append({"at": _timestamp(), "added": additions})
    run_id = previous.get("run_id") or run_id
    meta: dict[str, Any] = {
        "run_id": run_id,
        "command": " ".join(["kvcompare", *sys.argv[1:]])
        if Path(sys.argv[0]).name == "kvcompare"
        else " ".join(sys.argv),
        "config": dataclasses.asdict(config),
        "model_info": loaded.info,
        "corpus": corpus.describe(),
        "environment": environment(torch.device(config.device)),
        "started_at": previous.get("started_at") or _timestamp(),
        "resumes": resumes,
        "finished_at": None,
        "cells_planned": len(cells),
        "beyond_context_lengths": beyond,
        "passages": [
            {"source": p.source, "token_offset": p.token_offset, "seq_len": len(p.tokens), "sample_id": p.sample_id}
            for p in passages
        ],
    }
    context = {"max_positions": max_positions}
    todo = [c for c in cells if cell_id(c.describe(config)) not in done]
    if len(todo) < len(cells):
        print(f"resuming: {len(cells) - len(todo)} of {len(cells)} cells already finished", file=sys.stderr)
    executor = Executor(loaded.model)
    latency = LatencySettings(config.gen, config.warmup)
    if todo:
        _warm_up(executor, todo[0], latency)
    folder.open(meta)
    _measure_all(todo, config, executor, latency, folder, run_id, context, progress)
    meta["finished_at"] = _timestamp()
    folder.write_run_json(meta)
    return folder.path


def _measure_all(
    todo: list[Cell],
    config: RunConfig,
    executor: Executor,
    latency: LatencySettings,
    folder: RunFolder,
    run_id: str,
    context: dict[str, Any],
    progress: bool,
) -> None:
    failures = 0
    max_positions = context["max_positions"]
    bar = tqdm(todo, desc="cells", unit="cell", disable=not progress, file=sys.stderr)
    try:
        for cell in bar:
            bar.set_postfix_str(f"{cell.policy.label()} cache={cell.cache.limit} len={len(cell.passage.tokens)}")
            described = cell.describe(config)
            row: dict[str, Any] = {
                "run_id": run_id,
                "cell_id": cell_id(described),
                **described,
                "max_positions": max_positions,
                "beyond_context": bool(max_positions)
                and config.latency_positions(len(cell.passage.tokens)) > max_positions,
            }
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
                point.update({k: row[k] for k in CURVE_CELL_COLUMNS})
            folder.write_cell(row, curve)
    except KeyboardInterrupt:
        bar.close()
        print(f"\ninterrupted: finished cells are kept in {folder.path}; add --resume to continue", file=sys.stderr)
        raise
    if failures:
        print(f"{failures} cell(s) failed; their errors are in the results (status = 'failed')", file=sys.stderr)


#: The warm-up prefills at most this many tokens: enough to touch the shapes and memory a cell uses.
WARM_UP_TOKENS = 4096


def _warm_up(executor: Executor, cell: Cell, latency: LatencySettings) -> None:
    """One untimed latency pass of the full cache on the first cell's passage (up to WARM_UP_TOKENS).

    It runs what the first timed cell runs (the same chunk shapes, a cache of the same size, the same number
    of decode steps), so that cell does not pay for first-call allocation and first-touch page faults.
    """
    tokens = torch.tensor(cell.passage.tokens[:WARM_UP_TOKENS], dtype=torch.long)
    full = dataclasses.replace(cell.cache, limit=None)
    executor.generate(tokens, cell.policy, cell.plugin, full, gen=latency.gen, warmup=latency.warmup)
