"""Measuring a run's passages on Ray (``--ray``): one actor per device keeps the model loaded across passages.

The unit of work is one passage: all of its cells (`full`, the A/A control, every policy and limit) run on
one actor, in the same interleaved order as a serial run, so paired changes stay paired on one device. The
driver gives each idle actor the next passage and writes what comes back at once, the same way a serial run
does (``cells/<cell_id>.parquet``, atomically), so ``--resume`` treats serial and Ray cells alike. An actor
that dies is restarted and its passage retried ``RETRIES`` times; after that its cells are recorded as
failed (``--resume`` measures them again). Ctrl-C keeps every finished passage.
"""

from __future__ import annotations

import collections
import logging
import os
import re
from collections.abc import Callable, Iterator
from typing import Any

import torch

from kvcompare.config import ConfigError, RunConfig
from kvcompare.environment import environment, load_average, physical_cores
from kvcompare.errors import KVCompareError
from kvcompare.logs import configure, configured_level
from kvcompare.run.passages import (
    Group,
    PassageResults,
    count_passes,
    load_checked,
    measure_group,
    now_iso,
    row_context,
    warn_beyond_context,
)
from kvcompare.run.plan import Cell, Plan

log = logging.getLogger(__name__)

#: How often an actor that dies is restarted, and its passage tried again, before its cells count as failed.
RETRIES = 2
#: Terminal colour codes, which Ray puts in the text of an actor's errors.
ANSI_CODES = re.compile(r"\x1b\[[0-9;]*m")
INSTALL_HINT = "--ray needs Ray: pip install 'kvcompare[ray]'"


class PassageWorker:
    """A Ray actor: loads the model once on its device, then measures whole passages as they are given."""

    def __init__(self, config: RunConfig, run_id: str, threads: int | None, log_level: int | None = None) -> None:
        if log_level is not None:  # the driver's --quiet / -v: a worker is another process
            configure(log_level)
        self.threads = threads or physical_cores()
        torch.set_num_threads(self.threads)
        self.config = config
        self.warmed = False
        # A user's error (a model that cannot be loaded) is kept for describe() to raise: Ray would neither
        # hand the driver the error of a constructor nor stop restarting it.
        self.refused: KVCompareError | None = None
        try:
            self.loaded, self.executor = load_checked(config)
        except KVCompareError as err:
            self.refused = err
            return
        self.context = row_context(run_id, config, self.loaded, self.executor, self.threads)

    def describe(self) -> dict[str, Any]:
        """What run.json records of this worker; raises the error that kept it from loading the model."""
        if self.refused is not None:
            raise self.refused
        return {
            "host": self.context.host,
            "device_name": self.context.device_name,
            "threads": self.threads,
            "memory_bandwidth_bytes_s": self.context.bandwidth,
            "model_info": self.loaded.info,
            "environment": environment(self.executor.device),
        }

    def measure(self, cells: list[Cell], todo: list[Cell], done: set[str], session: int) -> PassageResults:
        """Measure one passage's ``todo`` cells (of the passage's ``cells``) on this actor's device."""
        warm = not self.warmed and bool(self.config.repeats)  # before the first timed cells
        self.warmed |= warm
        return measure_group(
            self.executor,
            cells,
            todo,
            done,
            self.context,
            session,
            self.config.quality_batch,
            lambda *_: None,
            warm=warm,
        )


def start_ray(address: str) -> bool:
    """Connect to the cluster at ``address`` (``auto``: the running one) or start one here (``local``);
    returns whether this call started it (and so must stop it)."""
    try:
        import ray
    except ImportError:
        raise ConfigError(INSTALL_HINT) from None
    if ray.is_initialized():
        return False
    if address == "local":
        ray.init(include_dashboard=False, logging_level=logging.WARNING)
        return True
    try:
        ray.init(address=address, logging_level=logging.WARNING)
    except ConnectionError as err:
        raise ConfigError(
            f"--ray {address}: no Ray cluster found ({err}); start one with `ray start --head` (and "
            "`ray start --address=HEAD:6379` on each other node), or use --ray local to start one on this machine"
        ) from None
    return False


def worker_count(config: RunConfig) -> int:
    """``--workers``, else one actor per GPU of the cluster (cuda), else one."""
    import ray

    if config.workers:
        return config.workers
    if config.device == "cuda":
        gpus = int(ray.cluster_resources().get("GPU", 0))
        if not gpus:
            raise ConfigError("--device cuda: the Ray cluster has no GPU; add GPU nodes, or use --device cpu")
        return gpus
    return 1


def check_cluster_fits(cluster: dict[str, float], count: int, options: dict[str, int]) -> None:
    """Refuse actors that the cluster's resources (``ray.cluster_resources()``) could never all hold: Ray
    would start those that fit and leave the others pending for ever."""
    for resource, key in (("CPU", "num_cpus"), ("GPU", "num_gpus")):
        need, have = count * options[key], cluster.get(resource, 0)
        if need > have:
            raise ConfigError(
                f"--workers {count} with {options[key]} {resource} each need {need:g} {resource}s, and the Ray "
                f"cluster has {have:g}: ask for fewer --workers"
                + (" or --threads" if resource == "CPU" else "")
                + ", or add nodes to the cluster (one that autoscales: start its nodes first)"
            )


class RayBackend:
    """Passages measured by Ray actors, one per device, each keeping the model loaded (see the module docstring).

    Built, it has started (or joined) the cluster, refused actors the cluster cannot hold, and heard from every
    actor that its model loaded and passed the fidelity probe; :meth:`close` stops what it started.
    """

    def __init__(self, grid: Plan, run_id: str) -> None:
        self.config = config = grid.config
        self.started_here = start_ray(config.ray or "auto")  # first: it says how to install Ray if it is missing
        import ray

        self.ray = ray
        self.actors: list[Any] = []
        try:
            count = worker_count(config)
            # Local CPU actors share this machine's cores; elsewhere each actor takes its own machine's.
            local_cpu = config.ray == "local" and config.device == "cpu"
            threads = config.threads or (max(1, physical_cores() // count) if local_cpu else None)
            options = {"num_gpus": 1 if config.device == "cuda" else 0, "num_cpus": threads or 1}
            check_cluster_fits(ray.cluster_resources(), count, options)
            worker = ray.remote(PassageWorker).options(max_restarts=RETRIES, max_task_retries=RETRIES, **options)
            self.actors = [worker.remote(config, run_id, threads, configured_level()) for _ in range(count)]
            self.described = _first_answer(ray, [actor.describe.remote() for actor in self.actors])
        except BaseException:
            self.close()
            raise
        self.run_id = run_id

    def describe(self) -> dict[str, Any]:
        """The model, the first worker's environment and every worker's host and device, for run.json."""
        config, first = self.config, self.described[0]
        return {
            "model_info": first["model_info"],
            "environment": first["environment"],
            "beyond_context_lengths": warn_beyond_context(config, first["model_info"].get("max_position_embeddings")),
            "speed": {
                "threads": first["threads"],
                "cpu_count": os.cpu_count() if config.ray == "local" else None,  # the load averages are this machine's
                "memory_bandwidth_bytes_s": first["memory_bandwidth_bytes_s"],
                "load_average_start": load_average(),
                "ray": {"address": config.ray, "workers": [_worker_entry(d) for d in self.described]},
            },
        }

    def measure(
        self, groups: list[Group], done: set[str], session: int, tick: Callable[[str, int], None]
    ) -> Iterator[PassageResults]:
        """Keep every actor busy with one passage at a time; yield each passage's results as it comes back (a
        passage whose actor died RETRIES + 1 times, or failed outside any cell, as failed rows)."""
        ray = self.ray
        queue = collections.deque(groups)
        running: dict[Any, tuple[Any, Group]] = {}

        def give(actor: Any) -> None:
            if queue:
                group = queue.popleft()
                running[actor.measure.remote(*group, done, session)] = (actor, group)

        for actor in self.actors:
            give(actor)
        while running:
            (ref,), _ = ray.wait(list(running), num_returns=1)
            actor, (cells, todo) = running.pop(ref)
            try:
                results = ray.get(ref)
                give(actor)
            except ray.exceptions.RayActorError as err:  # it died RETRIES + 1 times on this passage: it is gone
                results = died(todo, self.run_id, err)
            except ray.exceptions.RayTaskError as err:  # an error outside any one cell: this passage fails
                results = died(todo, self.run_id, err)
                give(actor)
            yield results
            tick(todo[0].describe(), count_passes([(cells, todo)], self.config))
        if queue:
            log.error(f"every Ray worker died; {len(queue)} passage(s) not measured: add --resume to measure them")

    def close(self) -> None:
        """Stop the actors, and Ray itself if this run started it."""
        for actor in self.actors:
            self.ray.kill(actor)
        self.actors = []
        if self.started_here:
            self.ray.shutdown()
            self.started_here = False


def _worker_entry(described: dict[str, Any]) -> dict[str, Any]:
    return {k: described[k] for k in ("host", "device_name", "threads", "memory_bandwidth_bytes_s")}


#: Seconds between the notices of a run still waiting for its actors to start.
WAIT_NOTICE_S = 30.0


def _first_answer(ray: Any, refs: list[Any]) -> list[Any]:
    """``ray.get`` of the actors' first answers, with an actor's own error (a bad model, a bad configuration)
    raised as itself: a user's error (KVCompareError) as its one-line message, anything else with the actor's
    traceback. While actors wait for resources that others hold, says so every WAIT_NOTICE_S seconds."""
    while True:
        ready, waiting = ray.wait(refs, num_returns=len(refs), timeout=WAIT_NOTICE_S)
        if not waiting:
            break
        log.info(
            f"waiting for {len(waiting)} of {len(refs)} Ray actors to start; the cluster has "
            f"{ray.available_resources()} free of {ray.cluster_resources()} (Ctrl-C stops)"
        )
    try:
        return list(ray.get(refs))
    except ray.exceptions.RayTaskError as err:
        if isinstance(err.cause, KVCompareError):  # a user's error: its own message, not the actor's traceback
            raise err.cause from None
        raise err.as_instanceof_cause() from None
    except ray.exceptions.ActorDiedError as err:
        cause = getattr(err, "base_exception", None) or getattr(err, "cause", None)
        if isinstance(cause, BaseException):
            raise cause from None
        raise


def died(todo: list[Cell], run_id: str, err: BaseException) -> PassageResults:
    """The rows of a passage whose worker failed: every cell failed with the worker's error, none timed."""
    text = ANSI_CODES.sub("", str(err))  # Ray colours the actor's name
    error = f"Ray worker failed on this passage: {type(err).__name__}: {text.splitlines()[0] if text else ''}"
    log.error(error)
    now = now_iso()
    rows: list[tuple[dict[str, Any], list[dict[str, Any]]]] = [
        (
            {
                "run_id": run_id,
                "cell_id": cell.id,
                **cell.fields,
                "status": "failed",
                "error": error,
                "traceback": text,
                "finished_at": now,
            },
            [],
        )
        for cell in todo
    ]
    return PassageResults(None, [], rows)
