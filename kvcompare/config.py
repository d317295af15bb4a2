"""What a run is asked to do, with every default in one place; light to import (no torch), so the command
line can build its help from it before anything heavy loads."""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Literal

from kvcompare.errors import KVCompareError

DEFAULT_MODEL = "smollm2-135m"
DEFAULT_DATASET = "gutenberg"
#: Latency trials per cell: the fewest whose bootstrap interval is more than the range of two values, while the
#: default `kvcompare run` stays within about 6 minutes on a 2-core CPU.
DEFAULT_REPEATS = 3
#: Whether a passage or prompt starts with the tokenizer's BOS token: as the tokenizer starts a document (auto),
#: always, or never.
BOS_MODES = ("auto", "always", "never")
#: The passkey prompt's filler: the classic repeated sentence, or passages of the run's --dataset.
HAYSTACKS = ("repeat", "text")
#: Where the passkey's needle sits, as a share of the prompt's filler (0: start, 1: end).
DEFAULT_DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)

PositionMode = Literal["true", "shift"]
POSITION_MODES: tuple[PositionMode, ...] = typing.get_args(PositionMode)
#: When a cache is cut to its budget: before every chunk and decode step (``continuous``, StreamingLLM's setting),
#: or once, after the context is prefilled whole (``prefill``: SnapKV's, PyramidKV's and kvpress's setting).
Compression = Literal["continuous", "prefill"]
COMPRESSIONS: tuple[Compression, ...] = typing.get_args(Compression)
#: ppl in the prefill setting: the share of each passage that is the context, prefilled and compressed once; the
#: rest is scored teacher-forced on the compressed cache (and the latency pass prefills the context alone).
PPL_CONTEXT_SHARE = 0.5


class ConfigError(KVCompareError, ValueError):
    """A run configuration that cannot work, found before any measurement starts."""


def oversubscription(threads: int | None, cpus: int | None) -> str | None:
    """What is wrong with timing ``threads`` torch threads on a machine of ``cpus`` logical CPUs, or None."""
    if not threads or not cpus or threads <= cpus:
        return None
    return (
        f"{threads} torch threads on {cpus} CPUs: threads beyond the CPUs wait for each other, so speed figures are "
        "slower and noisier than this machine allows; use --threads at most the CPU count (default: the cores)"
    )


def check_compression(setting: str) -> Compression:
    """The one check of a compression setting, shared by the command line and the cache."""
    if setting not in COMPRESSIONS:
        raise ConfigError(f"--compression takes continuous and/or prefill, not {setting!r}")
    return typing.cast(Compression, setting)


def ratio_limit(context: int, ratio: float) -> int:
    """The budget of a compression ``ratio`` (the share of the context removed, as kvpress and the literature mean
    it) for a ``context`` of that many tokens: ``int(context * (1 - ratio))``, as kvpress's ScorerPress keeps."""
    return int(context * (1 - ratio))


#: How a cache limit is shared among compressed layers (kvcompare.engine.budgets applies it).
KINDS = ("uniform", "pyramid")
DEFAULT_BETA = 20.0  # PyramidKV's
#: The observation window every layer keeps under a pyramid in the prefill setting: kvcompare's snapkv default
#: (PyramidKV's code defaults to 64: give ``pyramid:window=64`` with ``snapkv:window=64`` to match it).
DEFAULT_WINDOW = 32
SPEC_HELP = "use uniform, pyramid, pyramid:beta=B (B >= 1) or, for the prefill setting, pyramid:beta=B:window=W"


def parse_layer_budget(spec: str) -> tuple[str, float]:
    """``uniform``, ``pyramid``, ``pyramid:beta=B`` (or with ``:window=W``) as ``(kind, beta)``, or a ConfigError
    saying what is allowed."""
    kind, beta, _ = _parse(spec)
    return kind, beta


def prefill_window(spec: str) -> int:
    """The observation window a pyramid keeps in every layer in the prefill setting (``pyramid:window=W``;
    default :data:`DEFAULT_WINDOW`). Raises ConfigError for a bad ``spec``."""
    return _parse(spec)[2]


def _parse(spec: str) -> tuple[str, float, int]:
    kind, *parts = spec.split(":")
    if kind not in KINDS or (parts and kind != "pyramid"):
        raise ConfigError(f"--layer-budget {spec!r}: {SPEC_HELP}")
    values = {"beta": DEFAULT_BETA, "window": float(DEFAULT_WINDOW)}
    for part in parts:
        key, _, value = part.partition("=")
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if key not in values or not number >= 1 or (key == "window" and not number.is_integer()):
            raise ConfigError(f"--layer-budget {spec!r}: {SPEC_HELP}")
        values[key] = number
    return kind, values["beta"], int(values["window"])


def check_position_mode(mode: str) -> PositionMode:
    """The one check of a position mode, shared by the command line and the cache."""
    if mode not in POSITION_MODES:
        raise ConfigError(f"--positions takes true and/or shift, not {mode!r}")
    return typing.cast(PositionMode, mode)


@dataclasses.dataclass(frozen=True)
class CacheConfig:
    """How one cell's cache is run: everything about it that a result row must record."""

    limit: int | None
    stride: int
    positions: PositionMode = "shift"
    skip_layers: tuple[int, ...] = (0, 1)
    evict_block: int = 1
    layer_budget: str = "uniform"  # how the limit is shared among compressed layers (kvcompare.engine.budgets)
    reserve: int | None = None  # slots every layer keeps for a chunk under a pyramid; None: stride + evict_block - 1
    compression: Compression = "continuous"  # when the cache is cut to its budget (see COMPRESSIONS)
    ratio: float | None = None  # the compression ratio the limit was derived from (None: --cache gave it)

    def __post_init__(self) -> None:
        check_position_mode(self.positions)
        check_compression(self.compression)

    @property
    def once(self) -> bool:
        """Whether the cache is compressed once, after its context (the prefill setting), and never evicts after."""
        return self.compression == "prefill" and self.limit is not None

    def budget_reserve(self) -> int:
        """Slots kept free for the tokens one forward pass adds (default: stride + evict_block - 1)."""
        return self.reserve if self.reserve is not None else self.stride + self.evict_block - 1


@dataclasses.dataclass(frozen=True)
class LatencySettings:
    """How a latency trial runs: prefill in chunks of ``prefill_chunk``, ``warmup`` uncounted decode steps,
    then ``gen`` counted ones; ``repeats`` trials per cell."""

    gen: int = 32
    warmup: int = 4
    repeats: int = 1
    prefill_chunk: int | None = None  # None: the cache's stride
    compile: bool = False  # decode steps run as one compiled step (kvcompare.engine.compiled)


@dataclasses.dataclass
class RunConfig:
    """Everything a run is asked to do; recorded whole in run.json."""

    policies: list[str] = dataclasses.field(default_factory=lambda: ["streaming", "l2", "recent"])
    tasks: list[str] = dataclasses.field(default_factory=lambda: ["ppl"])  # task specs (kvcompare tasks)
    depths: list[float] = dataclasses.field(default_factory=lambda: list(DEFAULT_DEPTHS))  # passkey needle depths
    haystack: str = "repeat"  # passkey filler: repeat (the classic sentence) or text (passages of --dataset)
    bos: str = "auto"  # a passage starts with the tokenizer's BOS: auto (as it starts a document), always, never
    # The default grid is a demonstration sized for a 2-core CPU: with DEFAULT_REPEATS interleaved trials per cell,
    # the A/A control and the one-pass TTFT, `kvcompare run` takes about 5 minutes there. Two lengths, so that
    # the report can show the effect of length; both limits evict at both lengths.
    cache_sizes: list[int] = dataclasses.field(default_factory=lambda: [128, 256])
    lengths: list[int] = dataclasses.field(default_factory=lambda: [512, 1024])
    samples: list[int] = dataclasses.field(default_factory=lambda: [1])  # per length; one count is used for all
    model: str = DEFAULT_MODEL
    dataset: str = DEFAULT_DATASET
    device: str = "cpu"
    dtype: str = "float32"
    stride: int = 64
    positions: list[str] = dataclasses.field(default_factory=lambda: ["shift"])
    compression: list[str] = dataclasses.field(default_factory=lambda: ["continuous"])  # settings (COMPRESSIONS)
    ratios: list[float] = dataclasses.field(default_factory=list)  # budgets as shares removed, instead of cache_sizes
    query_aware: bool = False  # the prefill setting: the question is part of the compressed context
    skip_layers: list[int] = dataclasses.field(default_factory=lambda: [0, 1])
    evict_block: int = 1
    layer_budget: str = "uniform"
    gen: int = 32
    warmup: int = 4
    repeats: int = DEFAULT_REPEATS
    prefill_chunk: int | None = None  # latency-pass prefill chunk; None: the stride
    compile: bool = False  # decode steps compiled (torch.compile), the same step for every policy
    threads: int | None = None  # torch intra-op threads; None: the machine's physical cores
    quality_batch: int | None = None  # cells of a passage per batched quality pass; None: as many as fit in memory
    ray: str | None = None  # measure passages on Ray: a cluster address, "auto" (a running one) or "local"
    workers: int | None = None  # Ray actors; None: one per GPU (cuda), else one
    seed: int = 0
    bucket: int = 128
    baseline: bool = True
    all_books: bool = False
    text_column: str = "text"

    def __post_init__(self) -> None:
        if len(self.samples) == 1 and len(self.lengths) > 1:
            self.samples = self.samples * len(self.lengths)

    def cache_config(
        self, limit: int | None, positions: str, compression: str = "continuous", ratio: float | None = None
    ) -> CacheConfig:
        """The cache of a cell at ``limit`` (None: no limit) in one position mode and compression setting
        (``ratio``: the compression ratio the limit was derived from). Raises ConfigError for a bad mode, setting
        or layer budget."""
        mode, setting = check_position_mode(positions), check_compression(compression)
        if setting == "prefill":  # no chunk is fed beside kept tokens: a pyramid keeps its window in every layer
            reserve = prefill_window(self.layer_budget)
        else:
            reserve = self.largest_chunk() + self.evict_block - 1
        return CacheConfig(
            limit,
            self.stride,
            mode,
            tuple(self.skip_layers),
            self.evict_block,
            self.layer_budget,
            reserve,
            setting,
            ratio,
        )

    def latency(self) -> LatencySettings:
        """The latency pass's settings (decoded tokens, warm-up, repeats, prefill chunk, compiled steps)."""
        return LatencySettings(self.gen, self.warmup, self.repeats, self.prefill_chunk or self.stride, self.compile)

    def largest_chunk(self) -> int:
        """The most tokens one forward pass adds: the cache limit must leave room for them beside kept tokens."""
        return max(self.stride, self.prefill_chunk or self.stride)

    def latency_positions(self, length: int) -> int:
        """Positions the latency pass reaches on a passage of ``length`` tokens (prompt, warm-up, generated)."""
        return length + self.warmup + self.gen
