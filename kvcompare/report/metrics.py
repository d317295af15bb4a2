"""The measured quantities the report shows, with titles and display units, so tables and charts agree."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    """A result column and how a reader sees it."""

    column: str
    title: str
    unit: str  # unit after `scale` is applied; "" for unitless
    decimals: int
    scale: float = 1.0  # stored value * scale = displayed value
    relative: bool = False  # compared against the `full` baseline

    @property
    def label(self) -> str:
        return f"{self.title} ({self.unit})" if self.unit else self.title

    @property
    def change_column(self) -> str:
        return f"{self.column}_change_pct"


METRICS: tuple[Metric, ...] = (
    Metric("ttft_s", "TTFT", "s", 4, relative=True),
    Metric("tpot_s", "TPOT", "s", 5, relative=True),
    Metric("throughput_tok_s", "Throughput", "tokens/s", 1, relative=True),
    Metric("ppl", "PPL", "", 3, relative=True),
    Metric("accuracy", "Accuracy", "", 4, relative=True),
    Metric("peak_kv_bytes", "Peak KV", "MiB", 2, scale=1 / 2**20),
    Metric("evict_share", "Eviction share", "%", 1, scale=100.0),
)
RELATIVE_METRICS: tuple[Metric, ...] = tuple(m for m in METRICS if m.relative)
METRIC_BY_COLUMN: dict[str, Metric] = {m.column: m for m in METRICS}
