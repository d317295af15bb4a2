"""Planning a run: the policies, the checks that need no model, the passages and the grid of cells.

A plan needs the tokenizer and the corpus but never the model's weights, so a bad configuration is refused
in seconds and the grid can be inspected (and tested) without measuring anything.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from typing import Any

from kvcompare import corpus as corpora
from kvcompare import models
from kvcompare.config import (
    BOS_MODES,
    HAYSTACKS,
    PPL_CONTEXT_SHARE,
    CacheConfig,
    ConfigError,
    LatencySettings,
    RunConfig,
    check_compression,
    check_position_mode,
    prefill_window,
    ratio_limit,
)
from kvcompare.core import FullCache
from kvcompare.corpus import Passage
from kvcompare.engine.budgets import parse_layer_budget, smallest_budget
from kvcompare.engine.cache import check_skip_layers
from kvcompare.failure import policy_line
from kvcompare.plugins import get_host
from kvcompare.policy import KVPolicy, PolicyError
from kvcompare.run.results import cell_id
from kvcompare.task import Probe, Task, TaskError, TaskInputs
from kvcompare.words import english_words

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class CellContext:
    """What every cell of a run shares: the model, the data, the device and how latency is measured."""

    model: str
    dataset: str
    device: str
    dtype: str
    latency: LatencySettings
    bucket: int
    query_aware: bool = False  # the prefill setting: the question is compressed with the context

    @classmethod
    def of(cls, config: RunConfig) -> CellContext:
        """The context every cell of ``config``'s grid shares."""
        return cls(
            config.model,
            config.dataset,
            config.device,
            config.dtype,
            config.latency(),
            config.bucket,
            config.query_aware,
        )


@dataclasses.dataclass(frozen=True)
class Cell:
    """One measurement: a policy at a cache limit on one passage, with everything that identifies it.

    A ``ppl`` cell measures quality and speed on a passage of the corpus; a probe cell (``task`` and ``probe``
    set: passkey, RULER's tasks) runs its prompt under the policy and scores what the model makes of it.
    """

    passage: Passage
    policy: KVPolicy
    cache: CacheConfig
    context: CellContext
    probe: Probe | None = None
    probe_task: Task | None = None  # the task that built ``probe``

    @property
    def task(self) -> str:
        """``ppl`` for a perplexity cell, else the probe's task's name."""
        return "ppl" if self.probe_task is None else self.probe_task.name

    @property
    def context_tokens(self) -> int | None:
        """The prefill setting: the tokens prefilled, then compressed once (None in the continuous setting); see
        :func:`prefill_context`."""
        if self.cache.compression != "prefill":
            return None
        return prefill_context(len(self.passage.tokens), self.probe, self.context.query_aware)

    @property
    def prompt(self) -> tuple[int, ...]:
        """What the latency pass prefills: the passage, or in the prefill setting its context alone."""
        tokens = tuple(self.passage.tokens)
        return tokens if self.context_tokens is None else tokens[: self.context_tokens]

    @functools.cached_property
    def fields(self) -> dict[str, Any]:
        """The columns that identify this cell in its result row (and so its id)."""
        return {
            "model": self.context.model,
            "dataset": self.context.dataset,
            "task": self.task,
            "task_params": "{}" if self.probe_task is None else self.probe_task.params_json(),
            "probe_params": None if self.probe is None else json.dumps(dict(self.probe.params), sort_keys=True),
            "source": self.passage.source,
            "token_offset": self.passage.token_offset,
            "sample_id": self.passage.sample_id,
            "policy": self.policy.name,
            "policy_label": self.policy.label(),
            "policy_params": self.policy.params_json(),
            "plugin": self.policy.plugin,
            "cache_size": self.cache.limit,
            "seq_len": len(self.passage.tokens),
            "bos": self.passage.bos,
            "stride": self.cache.stride,
            "evict_block": self.cache.evict_block,
            "positions": self.cache.positions,
            "compression": self.cache.compression,
            "ratio": self.cache.ratio,
            "query_aware": self.context.query_aware if self.cache.compression == "prefill" else None,
            "context_tokens": self.context_tokens,
            "skip_layers": json.dumps(list(self.cache.skip_layers)),
            "layer_budget": self.cache.layer_budget,
            "device": self.context.device,
            "dtype": self.context.dtype,
            "gen_tokens": self.context.latency.gen,
            "warmup": self.context.latency.warmup,
            "repeats": self.context.latency.repeats,
            "prefill_chunk": self.context.latency.prefill_chunk,
            "compile": self.context.latency.compile,
        }

    @functools.cached_property
    def id(self) -> str:
        """A stable hash of :attr:`fields`: a resumed run recognises finished cells by it."""
        return cell_id(self.fields)

    def describe(self) -> str:
        """A short name for progress and error lines."""
        probe = ""
        if self.probe is not None and self.probe_task is not None:
            probe = " " + " ".join([self.probe_task.label(), *(f"{k}={v}" for k, v in self.probe.params)])
        budget = f"cache={self.cache.limit}" + (f" ratio={self.cache.ratio:g}" if self.cache.ratio is not None else "")
        setting = " prefill" if self.cache.compression == "prefill" else ""
        return f"{self.policy.label()} {budget}{setting} len={len(self.passage.tokens)}{probe}"


@dataclasses.dataclass(frozen=True)
class Plan:
    """The cells of a run, in the order they are measured, with what run.json records about them."""

    config: RunConfig
    policies: list[KVPolicy]
    tokenizer: Any
    corpus: dict[str, Any]  # the corpus description
    passages: list[Passage]
    cells: list[Cell]
    num_layers: int | None  # the model's layers, from its configuration (None: known only once it loads)

    def metadata(self) -> dict[str, Any]:
        """The plan's part of run.json."""
        return {
            "config": dataclasses.asdict(self.config),
            "corpus": self.corpus,
            "cells_planned": len(self.cells),
            "passages": [
                {"source": p.source, "token_offset": p.token_offset, "seq_len": len(p.tokens), "sample_id": p.sample_id}
                for p in self.passages
            ],
        }


def build_policies(config: RunConfig) -> list[KVPolicy]:
    """The policies asked for (plus the `full` baseline unless turned off), each bound to its plugin."""
    host = get_host()
    registry = host.registry()
    specs = list(config.policies)
    if config.baseline and FullCache.name not in specs:
        specs.insert(0, FullCache.name)
    policies: list[KVPolicy] = []
    for spec in specs:
        try:
            policy = registry.build(spec)
        except PolicyError as err:
            failed = "; ".join(f"{f.name}: {f.error}" for f in host.failures)
            raise ConfigError(f"{err}" + (f" (plugins that failed to load: {failed})" if failed else "")) from None
        if policy.label() not in {p.label() for p in policies}:
            policies.append(policy)
        else:
            log.info(f"--policies {spec} is {policy.label()}, listed before: measured once")
    return policies


#: Settings that must be positive when given.
POSITIVE_SETTINGS = (
    "stride",
    "evict_block",
    "gen",
    "bucket",
    "prefill_chunk",
    "threads",
    "quality_batch",
    "workers",
)


def check_config(config: RunConfig, policies: list[KVPolicy]) -> None:
    """Refuse what cannot work, from the configuration alone."""
    if not config.policies:
        raise ConfigError(
            "no policies given: name at least one (see `kvcompare policies`), or `full` to measure only the baseline"
        )
    if any(i < 0 for i in config.skip_layers) or len(set(config.skip_layers)) != len(config.skip_layers):
        raise ConfigError(f"--skip-layers {config.skip_layers}: give distinct layer indices from 0 up, or none")
    for name in POSITIVE_SETTINGS:
        if getattr(config, name) is None:
            continue
        if getattr(config, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be a positive number, not {getattr(config, name)}")
    if config.warmup < 0:
        raise ConfigError("--warmup must be 0 or more")
    if config.repeats < 0:
        raise ConfigError(f"--repeats must be 0 (a quality-only run: no speed measured) or more, not {config.repeats}")
    if config.workers is not None and config.ray is None:
        raise ConfigError("--workers sets the Ray actors: add --ray local (this machine) or --ray auto (a cluster)")
    if config.ratios and config.cache_sizes:
        raise ConfigError("--cache and --ratio both set the budget: give one (--ratio 0.5 keeps half of each context)")
    if config.ratios and not all(0 <= r < 1 for r in config.ratios):
        raise ConfigError(f"--ratio takes shares of the context removed, from 0 to below 1, not {config.ratios}")
    for setting in config.compression or ["(none)"]:
        check_compression(setting)
    if config.query_aware and "prefill" not in config.compression:
        raise ConfigError("--query-aware applies to the prefill setting: add --compression prefill")
    for label, values in (
        *([] if config.ratios else [("--cache", config.cache_sizes)]),
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
        check_position_mode(mode)
    if not config.depths or not all(0 <= d <= 1 for d in config.depths):
        raise ConfigError(f"--depths takes numbers from 0 (start) to 1 (end), not {config.depths}")
    if not config.tasks:
        raise ConfigError("--task is empty: name at least one task (see `kvcompare tasks`), e.g. ppl")
    build_tasks(config)
    if config.bos not in BOS_MODES:
        raise ConfigError(f"--bos takes {', '.join(BOS_MODES)}, not {config.bos!r}")
    if config.haystack not in HAYSTACKS:
        raise ConfigError(f"--haystack takes {' or '.join(HAYSTACKS)}, not {config.haystack!r}")
    parse_layer_budget(config.layer_budget)
    for limit in config.cache_sizes:
        for setting in config.compression:
            check_limit(config, policies, limit, setting)


def check_limit(config: RunConfig, policies: list[KVPolicy], limit: int, setting: str = "continuous") -> None:
    """Refuse a cache ``limit`` that cannot work for these policies in this compression setting: in the continuous
    setting it must leave room for a chunk beside kept tokens; in both, every layer's budget must keep what each
    policy needs (its ``check_limit``). Raises ConfigError saying what to change."""
    bounded = [p for p in policies if p.bounded]
    if not bounded:
        return
    if limit < 1:
        raise ConfigError(f"a cache budget of {limit} tokens keeps nothing: raise --cache, or lower --ratio")
    if setting == "prefill":  # compressed once: no chunk is fed beside kept tokens
        window = prefill_window(config.layer_budget)
        if parse_layer_budget(config.layer_budget)[0] == "pyramid" and limit <= window:
            raise ConfigError(
                f"--layer-budget {config.layer_budget} keeps a window of {window} tokens in every layer, which a "
                f"budget of {limit} tokens cannot share out: raise the budget, or lower the window (pyramid:window=W)"
            )
        smallest = smallest_budget(config.layer_budget, limit, window)
        for policy in bounded:
            try:
                policy.check_limit(smallest)
            except PolicyError as err:
                raise ConfigError(
                    f"--compression prefill at a budget of {limit} tokens (its smallest layer keeps {smallest}): "
                    f"{err}: raise the budget (--cache, or a lower --ratio)"
                ) from None
        return
    chunk = config.largest_chunk()
    flag = "--stride" if chunk == config.stride else "--prefill-chunk"
    if chunk >= limit:
        raise ConfigError(f"{flag} {chunk} must be below the cache limit {limit}: a chunk must fit beside kept tokens")
    min_keep = limit - chunk - config.evict_block + 1
    if min_keep < 1:
        raise ConfigError(f"--evict-block {config.evict_block} is too large for limit {limit} and {flag} {chunk}")
    reserve = chunk + config.evict_block - 1
    smallest = smallest_budget(config.layer_budget, limit, reserve)
    min_keep = smallest - reserve  # in the most squeezed layer
    if min_keep < 1:
        raise ConfigError(
            f"--layer-budget {config.layer_budget} leaves the top layer no token to keep at --cache {limit}; "
            "lower beta or raise --cache"
        )
    why = f"{flag} {chunk}, --evict-block {config.evict_block}"
    if smallest < limit:
        why = f"the smallest layer budget of --layer-budget {config.layer_budget}, {smallest} slots, {why}"
    for policy in bounded:
        try:
            policy.check_limit(min_keep)
        except PolicyError as err:
            fixes = f"raise --cache, or lower {flag}"
            if smallest < limit:
                fixes += ", or use --layer-budget uniform or a lower beta"
            raise ConfigError(
                f"--cache {limit}: {err} (an eviction keeps {min_keep} tokens, from {why}): {fixes}"
            ) from None


def merge_repeated_values(config: RunConfig) -> RunConfig:
    """``config`` with each value repeated in --cache, --ratio, --compression, --lengths, --positions, --depths or
    --policies kept once
    (each merge said on stderr), so that no cell is planned, measured or written twice.

    A length repeated with different sample counts is refused: which count was meant cannot be guessed.
    """
    changes: dict[str, Any] = {}
    for name, flag in (
        ("cache_sizes", "--cache"),
        ("ratios", "--ratio"),
        ("compression", "--compression"),
        ("positions", "--positions"),
        ("depths", "--depths"),
    ):
        changes[name] = _once(getattr(config, name), flag)
    changes["policies"] = _once([spec.strip() for spec in config.policies], "--policies")
    counts: dict[int, int] = {}
    for length, samples in zip(config.lengths, config.samples, strict=False):
        if counts.setdefault(length, samples) != samples:
            raise ConfigError(
                f"--lengths gives {length} twice, with {counts[length]} and {samples} samples: give it once"
            )
    if len(counts) < len(config.lengths) and len(config.samples) == len(config.lengths):
        _once(config.lengths, "--lengths")
        changes.update(lengths=list(counts), samples=list(counts.values()))
    return dataclasses.replace(config, **changes)


def _once(values: list[Any], flag: str) -> list[Any]:
    """``values`` without repeats, in order; a notice on stderr if there were any."""
    kept = list(dict.fromkeys(values))
    if len(kept) < len(values):
        repeated = sorted({str(v) for v in values if values.count(v) > 1})
        log.info(f"{flag} repeats {', '.join(repeated)}: each is measured once")
    return kept


def check_layers(config: RunConfig, policies: list[KVPolicy], layers: int) -> None:
    """Checks that need the model's layer count: skip layers exist and leave some layer to compress."""
    check_skip_layers(config.skip_layers, layers)
    if any(p.bounded for p in policies) and set(range(layers)) <= set(config.skip_layers):
        fewer = sorted(config.skip_layers)[:-1]  # all but the top layer: that one is compressed
        raise ConfigError(
            f"--skip-layers covers all {layers} layers of {config.model}: nothing would be compressed, so every "
            f"policy would equal full; skip fewer layers (--skip-layers {','.join(map(str, fewer)) or 'none'})"
        )


def prepare(config: RunConfig) -> list[KVPolicy]:
    """Build the policies and run every check that needs neither tokenizer nor weights (milliseconds)."""
    policies = build_policies(config)
    check_config(config, policies)
    models.check_model_spec(config.model)
    models.check_device_and_dtype(config.device, config.dtype)
    corpora.check_dataset(config.dataset, text_column=config.text_column)
    return policies


def plan(config: RunConfig, policies: list[KVPolicy] | None = None) -> Plan:
    """The passages and cells of ``config``; loads the tokenizer and reads the corpus, never the weights.

    Within each passage the cells are interleaved (every position mode, policy and limit), so that drift
    in machine speed touches all of them alike.
    """
    policies = prepare(config) if policies is None else policies
    tokenizer = models.load_tokenizer(config.model)
    num_layers = models.layer_count(config.model)
    if num_layers is not None:
        check_layers(config, policies, num_layers)
    corpus = corpora.load_corpus(config.dataset, text_column=config.text_column, include_all=config.all_books)
    encode = functools.cache(functools.partial(models.encode, tokenizer))  # each document tokenized once
    bos = models.document_start(tokenizer, config.bos)
    tasks = build_tasks(config)
    passages = [
        passage
        for length, samples in zip(config.lengths, config.samples, strict=True)
        for passage in corpora.sample_passages(corpus, encode, length, samples, config.seed, bos)
        if any(task.request == "rolling" for task in tasks)
    ]
    context = CellContext.of(config)
    grid = CellGrid(config, policies, context)
    cells = [cell for passage in passages for cell in grid.cells(passage)]
    inputs = {  # one per length, shared by every task: its book-text haystacks are drawn once
        length: task_inputs(config, encode, tokenizer, corpus, bos, samples)
        for length, samples in zip(config.lengths, config.samples, strict=True)
    }
    for task in tasks:
        if task.request == "rolling":
            continue
        cells += [
            cell
            for probe, sample in task_probes(config, task, inputs)
            for cell in grid.cells(probe_passage(task, probe, sample, bos is not None), probe, task)
        ]
    return Plan(config, policies, tokenizer, corpus.describe(), passages, cells, num_layers)


def prefill_context(length: int, probe: Probe | None, query_aware: bool) -> int:
    """The tokens the prefill setting prefills and then compresses once, of a prompt of ``length`` tokens: a
    probe's context (with its question when ``query_aware``), or for ``ppl`` the passage's first
    :data:`~kvcompare.config.PPL_CONTEXT_SHARE` (its rest is scored on the compressed cache)."""
    if probe is None:
        return int(length * PPL_CONTEXT_SHARE)
    return len(probe.context) + (len(probe.question) if query_aware else 0)


class CellGrid:
    """The cells of one passage or probe: every position mode, compression setting, policy and budget, in that
    order (so machine drift touches all alike). A ``--ratio`` budget becomes a limit from the cell's own context,
    checked against each policy (ConfigError) the first time it occurs."""

    def __init__(self, config: RunConfig, policies: list[KVPolicy], context: CellContext) -> None:
        self.config, self.policies, self.context = config, policies, context
        self._checked: set[tuple[int, str]] = set()

    def cells(self, passage: Passage, probe: Probe | None = None, task: Task | None = None) -> list[Cell]:
        """The cells of ``passage`` (a probe's prompt as a passage, with ``probe`` and its ``task``)."""
        config, cells = self.config, []
        length = len(passage.tokens)
        for mode in config.positions:
            for setting in config.compression:
                base = prefill_context(length, probe, config.query_aware) if setting == "prefill" else length
                budgets: list[tuple[int | None, float | None]] = [(limit, None) for limit in config.cache_sizes]
                budgets += [(ratio_limit(base, ratio), ratio) for ratio in config.ratios]
                for limit, _ in budgets:
                    assert limit is not None
                    if (limit, setting) not in self._checked:
                        check_limit(config, self.policies, limit, setting)
                        self._checked.add((limit, setting))
                for policy in self.policies:
                    for limit, ratio in budgets if policy.bounded else [(None, None)]:
                        cache = config.cache_config(limit, mode, setting, ratio)
                        cells.append(Cell(passage, policy, cache, self.context, probe, task))
        return cells


def build_tasks(config: RunConfig) -> list[Task]:
    """The tasks of ``--task``, each built from its spec by the task registry (``passkey`` takes ``--depths`` and
    ``--haystack`` unless its spec sets them). Raises ConfigError for an unknown task or a bad parameter."""
    registry = get_host().tasks()
    tasks: list[Task] = []
    for spec in config.tasks:
        name, *assignments = spec.split(":")
        given = {a.partition("=")[0] for a in assignments}
        if name == "passkey":
            if "depths" not in given:
                spec += ":depths=" + "/".join(f"{d:g}" for d in dict.fromkeys(config.depths))
            if "haystack" not in given:
                spec += f":haystack={config.haystack}"
        try:
            task = registry.build(spec)
        except TaskError as err:
            raise ConfigError(str(err)) from None
        if task.label() not in {t.label() for t in tasks}:
            tasks.append(task)
    return tasks


def task_inputs(
    config: RunConfig, encode: Any, tokenizer: Any, corpus: Any, bos: int | None, samples: int
) -> TaskInputs:
    """What a task may build its probes from, for a length with ``samples`` samples: sample s's book-text
    haystack is the s-th passage drawn from the dataset (with another seed than the ppl passages)."""
    texts: dict[int, list[Passage]] = {}

    def filler(sample: int, tokens: int) -> tuple[list[int], str]:
        if tokens not in texts:
            texts[tokens] = corpora.sample_passages(corpus, encode, tokens, samples, config.seed + 1)
        text = texts[tokens][sample % len(texts[tokens])]
        return list(text.tokens), f"{text.source}@{text.token_offset}"

    return TaskInputs(
        encode=encode,
        bos=bos,
        seed=config.seed,
        filler=filler,
        word_list=english_words,
        decode=lambda ids: tokenizer.decode(list(ids), skip_special_tokens=True),
    )


def task_probes(config: RunConfig, task: Task, inputs: dict[int, TaskInputs]) -> list[tuple[Probe, int]]:
    """Every probe of ``task`` in the run with its sample index: ``--samples`` probes per length (per depth for
    passkey), built from ``inputs[length]``. Raises ConfigError, naming the task and its plugin, when the task
    cannot build a prompt of a length (or lacks what it needs, e.g. a word list), when its probes() raises, or
    when it breaks the contract: no probe for a length, or a prompt (context + question) not of that length."""
    probes = []
    for length, samples in zip(config.lengths, config.samples, strict=True):
        try:
            built = task.probes(inputs[length], length, samples)
        except TaskError as err:
            raise ConfigError(f"{task.who()}: {err}") from None
        except Exception as err:  # a bug in the plugin: name it and where, as a policy's is named
            where = policy_line(err, type(task))
            raise ConfigError(
                f"{task.who()}: probes() raised {type(err).__name__}: {err}" + (f" (at {where})" if where else "")
            ) from err
        if not built:
            raise ConfigError(
                f"{task.who()} built no probes for length {length}: nothing of it could be measured; "
                "fix its probes(), or leave it out of --task"
            )
        for index, probe in enumerate(built):
            if not isinstance(probe, Probe):
                raise ConfigError(f"{task.who()} built {type(probe).__name__} objects, not Probes: fix its probes()")
            if len(probe.tokens) != length:
                raise ConfigError(
                    f"{task.who()} built a prompt of {len(probe.tokens)} tokens for length {length}: a task's "
                    "prompts (context + question) are exactly the length asked; fix its probes()"
                )
            probes.append((probe, int(probe.param("sample", index % samples))))
    return probes


def probe_passage(task: Task, probe: Probe, sample: int, bos: bool) -> Passage:
    """A probe's prompt as a passage, so that it is grouped, described and keyed like one."""
    params = json.dumps(dict(probe.params), sort_keys=True)
    return Passage(task.name, f"{task.label()}:{probe.source}:{params}", 0, sample, probe.tokens, bos)
