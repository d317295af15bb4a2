"""`kvcompare run`: check and plan the grid (kvcompare.plan), load the model, measure each cell, write it at once."""

from __future__ import annotations

import dataclasses
import datetime
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from kvcompare.cache import check_skip_layers
from kvcompare.config import ConfigError, RunConfig
from kvcompare.environment import environment
from kvcompare.executor import Executor
from kvcompare.measure import measure_cell
from kvcompare.models import LoadedModel, load_model
from kvcompare.plan import Cell, Plan, plan, prepare
from kvcompare.policy import KVPolicy
from kvcompare.results import RunFolder, cell_id
from kvcompare.schema import CURVE_CELL_COLUMNS

DEFAULT_RUNS_DIR = Path("reports/runs")


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


def check_layers(config: RunConfig, policies: list[KVPolicy], loaded: LoadedModel) -> None:
    """Checks that need the model's shape: skip layers exist and leave some layer to compress."""
    layers = loaded.info["num_layers"]
    check_skip_layers(config.skip_layers, layers)
    if any(p.bounded for p in policies) and set(range(layers)) <= set(config.skip_layers):
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

    Everything that can be checked without the weights is checked first, and nothing is written until the
    first cell is about to be measured.
    """
    policies = prepare(config)
    run_id = new_run_id(config)
    folder = RunFolder(out if out is not None else DEFAULT_RUNS_DIR / run_id)
    folder.check(resume=resume, force=force)
    previous = folder.read_run_json() if resume else {}
    additions = resume_additions(previous["config"], config) if previous.get("config") else {}
    done = folder.finished() if resume else set()
    grid = plan(config, policies)  # the tokenizer and the corpus: passages are drawn before the weights load

    loaded = load_model(config.model, config.device, config.dtype, tokenizer=grid.tokenizer)
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
    resumes = list(previous.get("resumes", []))
    if previous:
        resumes.append({"at": _timestamp(), "added": additions})
    run_id = previous.get("run_id") or run_id
    meta: dict[str, Any] = {
        "run_id": run_id,
        "command": " ".join(["kvcompare", *sys.argv[1:]])
        if Path(sys.argv[0]).name == "kvcompare"
        else " ".join(sys.argv),
        **grid.metadata(),
        "model_info": loaded.info,
        "environment": environment(torch.device(config.device)),
        "started_at": previous.get("started_at") or _timestamp(),
        "resumes": resumes,
        "finished_at": None,
        "beyond_context_lengths": beyond,
    }
    todo = [cell for cell in grid.cells if cell.id not in done]
    if len(todo) < len(grid.cells):
        print(f"resuming: {len(grid.cells) - len(todo)} of {len(grid.cells)} cells already finished", file=sys.stderr)
    executor = Executor(loaded.model)
    if todo:
        _warm_up(executor, todo[0])
    folder.open(meta)
    _measure_all(todo, grid, executor, folder, run_id, max_positions, progress)
    meta["finished_at"] = _timestamp()
    folder.write_run_json(meta)
    return folder.path


def _measure_all(
    todo: list[Cell],
    grid: Plan,
    executor: Executor,
    folder: RunFolder,
    run_id: str,
    max_positions: int | None,
    progress: bool,
) -> None:
    failures = 0
    bar = tqdm(todo, desc="cells", unit="cell", disable=not progress, file=sys.stderr)
    try:
        for cell in bar:
            bar.set_postfix_str(cell.describe())
            seq_len = len(cell.passage.tokens)
            row: dict[str, Any] = {
                "run_id": run_id,
                "cell_id": cell.id,
                **cell.fields,
                "max_positions": max_positions,
                "beyond_context": max_positions is not None and grid.config.latency_positions(seq_len) > max_positions,
            }
            started = time.perf_counter()
            tokens = torch.tensor(cell.passage.tokens, dtype=torch.long)
            try:
                fields, curve = measure_cell(
                    executor, tokens, cell.policy, cell.cache, cell.context.latency, cell.context.bucket
                )
                row.update(fields, status="ok")
            except (KeyboardInterrupt, MemoryError):
                raise
            except Exception as err:  # one failing policy must not lose the other cells
                failures += 1
                row.update(status="failed", error=f"{type(err).__name__}: {err}")
                curve = []
                print(f"\ncell failed: {cell.policy.who()}: {row['error']}", file=sys.stderr)
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


def _warm_up(executor: Executor, cell: Cell) -> None:
    """One untimed latency pass of the full cache on the first cell's passage (up to WARM_UP_TOKENS).

    It runs what the first timed cell runs (the same chunk shapes, a cache of the same size, the same number
    of decode steps), so that cell does not pay for first-call allocation and first-touch page faults.
    """
    tokens = torch.tensor(cell.passage.tokens[:WARM_UP_TOKENS], dtype=torch.long)
    full = dataclasses.replace(cell.cache, limit=None)
    latency = cell.context.latency
    executor.generate(tokens, cell.policy, full, gen=latency.gen, warmup=latency.warmup)
