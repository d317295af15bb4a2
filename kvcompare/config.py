"""What a run is asked to do, with every default in one place; light to import (no torch), so the command
line can build its help from it before anything heavy loads."""

from __future__ import annotations

import dataclasses


class ConfigError(ValueError):
    """A run configuration that cannot work, found before any measurement starts."""


@dataclasses.dataclass
class RunConfig:
    """Everything a run is asked to do; recorded whole in run.json."""

    policies: list[str] = dataclasses.field(default_factory=lambda: ["streaming", "l2", "recent"])
    cache_sizes: list[int] = dataclasses.field(default_factory=lambda: [256, 512])
    lengths: list[int] = dataclasses.field(default_factory=lambda: [1024, 2048])  # two: the report shows length
    samples: list[int] = dataclasses.field(default_factory=lambda: [1])  # per length; one count is used for all
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

    def __post_init__(self) -> None:
        if len(self.samples) == 1 and len(self.lengths) > 1:
            self.samples = self.samples * len(self.lengths)

    def latency_positions(self, length: int) -> int:
        """Positions the latency pass reaches on a passage of ``length`` tokens (prompt, warm-up, generated)."""
        return length + self.warmup + self.gen
