"""The figures and the changes against `full` every table and chart speaks of, with their titles and units,
and what a run measured (so that a report speaks only of that)."""

from __future__ import annotations

from dataclasses import dataclass

# --- Metrics and changes: titles and display units, so tables and charts agree ------------------------------


class Bounded:
    """A figure's column and, beside it, the ends of its 95% interval: `<column>_low` and `<column>_high`
    (the names tables and charts read, so that every speed figure is drawn with its interval alike)."""

    column: str

    @property
    def low(self) -> str:
        """The column of the interval's lower bound."""
        return f"{self.column}_low"

    @property
    def high(self) -> str:
        """The column of the interval's upper bound."""
        return f"{self.column}_high"


@dataclass(frozen=True)
class Metric(Bounded):
    """A result column and how a reader sees it; a speed metric's `low`/`high` are, per configuration, the
    lowest and highest ends of its cells' intervals over trials (aggregate())."""

    column: str
    title: str
    unit: str  # unit after `scale` is applied; "" for unitless
    decimals: int
    scale: float = 1.0  # stored value * scale = displayed value
    interval: str | None = None  # speed: prefix of the row's interval over trials (`tpot` -> tpot_ci_low)

    @property
    def label(self) -> str:
        """The metric's title with its unit, for table headers and chart axes."""
        return f"{self.title} ({self.unit})" if self.unit else self.title

    @property
    def speed(self) -> bool:
        """Whether this is a speed metric (it has an interval, from the latency trials)."""
        return self.interval is not None


METRICS: tuple[Metric, ...] = (
    Metric("ttft_s", "TTFT", "s", 4, interval="ttft"),
    Metric("ttft_oneshot_s", "TTFT one pass", "s", 4, interval="ttft_oneshot"),
    Metric("tpot_s", "TPOT", "s", 5, interval="tpot"),
    Metric("throughput_tok_s", "Throughput", "tokens/s", 1, interval="throughput"),
    Metric("ppl", "PPL", "", 3),
    Metric("accuracy", "Accuracy", "", 4),
    Metric("peak_kv_bytes", "Peak KV", "MiB", 2, scale=1 / 2**20),
    Metric("evict_share", "Eviction share", "%", 1, scale=100.0),
    Metric("signal_share", "Signal share", "%", 1, scale=100.0),
)
METRIC_BY_COLUMN: dict[str, Metric] = {m.column: m for m in METRICS}
#: What one decode step must read, per cell (the same for every sample of a configuration and length).
PHYSICS_COLUMNS: tuple[str, ...] = ("kv_read_bytes", "weight_bytes", "tpot_floor_s")
#: What the prefill setting records beside the figures (null in the continuous setting), averaged per configuration
#: as `<column>_mean`: the context compressed, the bytes kept, and the compression's time inside the TTFT.
PREFILL_COLUMNS: tuple[str, ...] = ("context_tokens", "kv_bytes_compressed", "compress_s", "compress_share")


@dataclass(frozen=True)
class Change(Bounded):
    """A relative change against `full`, 100 × (policy − full) / full in %, averaged over pairs.

    Speed changes pair trials (same passage, position mode, session and round) and carry a bootstrap
    interval over the pairs; quality changes pair cells per sample and are deterministic, with no interval.
    """

    column: str  # the mean change; `low`, `high`, `n` name its interval and pair count
    title: str
    value: str  # the policy's figure: a trial figure (speed) or a row column (quality)
    base: str  # the `full` figure it is compared with
    speed: bool

    @property
    def n(self) -> str:
        """The column holding how many pairs the change's interval is computed from."""
        return f"{self.column}_n"

    @property
    def noise(self) -> str:
        """The run's noise floor for this change, as recommend() adds it beside each configuration."""
        return f"{self.column}_noise"

    @property
    def like_for_like(self) -> bool:
        """Compared with the same figure of `full` (TTFT with TTFT, not with the one-pass TTFT)."""
        return self.value == self.base


TTFT_CHANGE = Change("ttft_s_change_pct", "TTFT", "ttft_s", "ttft_s", speed=True)
TTFT_ONESHOT_CHANGE = Change("ttft_oneshot_change_pct", "TTFT vs one-pass full", "ttft_s", "ttft_oneshot_s", True)
TPOT_CHANGE = Change("tpot_s_change_pct", "TPOT", "tpot_s", "tpot_s", speed=True)
THROUGHPUT_CHANGE = Change(
    "throughput_tok_s_change_pct", "Throughput", "throughput_tok_s", "throughput_tok_s", speed=True
)
PPL_CHANGE = Change("ppl_change_pct", "PPL", "ppl", "ppl", speed=False)
ACCURACY_CHANGE = Change("accuracy_change_pct", "Accuracy", "accuracy", "accuracy", speed=False)
CHANGES: tuple[Change, ...] = (
    TTFT_CHANGE,
    TTFT_ONESHOT_CHANGE,
    TPOT_CHANGE,
    THROUGHPUT_CHANGE,
    PPL_CHANGE,
    ACCURACY_CHANGE,
)
SPEED_CHANGES: tuple[Change, ...] = tuple(c for c in CHANGES if c.speed)
#: What the A/A control measures: `full` against itself, figure for figure.
NOISE_CHANGES: tuple[Change, ...] = tuple(c for c in SPEED_CHANGES if c.like_for_like)
CHANGE_BY_COLUMN: dict[str, Change] = {c.column: c for c in CHANGES}


@dataclass(frozen=True)
class Measured:
    """What a run measured, so that every line and section of its report speaks only of that."""

    perplexity: bool  # some perplexity cell succeeded
    speed: bool  # some successful perplexity cell has speed figures (latency trials)
    retrieval: bool  # some passkey probe was answered
    no_speed: str = ""  # why no speed figure is reported; "" when speed was measured
    settings: tuple[str, ...] = ("continuous",)  # the compression settings of the cells and probes, continuous first
    ratios: tuple[float, ...] = ()  # the compression ratios (--ratio), smallest first; () where --cache gave limits
    query_aware: bool | None = None  # prefill: the question was compressed with the context; None: not recorded

    @property
    def prefill(self) -> bool:
        """Whether the run measured the prefill setting (each layer compressed once, after the context)."""
        return "prefill" in self.settings

    def speaks_of(self, change: Change | Metric) -> bool:
        """Whether a table or chart should show ``change`` (speed figures only where speed was measured)."""
        return self.speed or not is_speed(change)


def is_speed(figure: Change | Metric) -> bool:
    """Speed figures, and the shares of decode time spent evicting or collecting signals."""
    return figure.speed or figure.column in ("evict_share", "signal_share")


#: What a run that measured perplexity and speed (and no retrieval) is described as: the tables' default.
EVERYTHING = Measured(True, True, False)
