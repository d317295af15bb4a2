"""The noise floor: how far `full` drifts from itself on this machine in this run (the A/A control)."""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

from kvcompare.analysis.metrics import NOISE_CHANGES, Change
from kvcompare.analysis.pairing import change_estimates, estimate, trial_pairs
from kvcompare.stats import Estimate

# --- The noise floor: how far `full` drifts from itself on this machine in this run -------------------------


@dataclass(frozen=True)
class NoiseFloor:
    """The A/A control's change against `full` (paired like a policy's trials), over all its pairs.

    A metric's floor is max(|low|, |high|) of that change's 95% interval: a speed difference smaller than it
    is not distinguishable from `full` against itself. `reason` says why there is none, "" when measured.
    """

    changes: dict[str, Estimate]  # Change.column -> the A/A change over all lengths
    by_length: pl.DataFrame  # change_estimates() of the A/A pairs per seq_len
    reason: str = ""

    def floor(self, change: Change) -> float | None:
        """The largest absolute bound of the A/A interval for ``change`` (in %), or None if not measured."""
        found = self.changes.get(change.column)
        if found is None or found.low is None or found.high is None:
            return None
        return max(abs(found.low), abs(found.high))

    @property
    def pairs(self) -> int:
        """How many A/A pairs the floor rests on (the most of any change)."""
        return max((e.n for e in self.changes.values()), default=0)

    @property
    def measured(self) -> bool:
        """Whether any speed change has a floor (a quality-only run has none)."""
        return any(self.floor(change) is not None for change in NOISE_CHANGES)


def noise_floor(cells: pl.DataFrame, timings: pl.DataFrame | None, no_speed: str = "") -> NoiseFloor:
    """The run's noise floor from its A/A control trials, or why it could not be measured (``no_speed``: why
    the run measured no speed at all, Measured.no_speed)."""
    nothing = change_estimates(pl.DataFrame(schema={"seq_len": pl.Int64}), ["seq_len"], NOISE_CHANGES)
    if no_speed:
        return NoiseFloor({}, nothing, f"no speed was measured: {no_speed}")
    if timings is None or timings.is_empty():
        return NoiseFloor({}, nothing, "the run has no raw timings (`timings/`; it predates repeated latency trials)")
    if timings.filter(pl.col("role") == "aa_control").is_empty():
        return NoiseFloor({}, nothing, "the run recorded no A/A control trials")
    aa = trial_pairs(cells, timings).aa
    if aa.is_empty():
        return NoiseFloor(
            {},
            nothing,
            "no A/A control trial has a successful `full` trial of the same passage, session and round to pair with",
        )
    overall = change_estimates(aa, [], NOISE_CHANGES).row(0, named=True)
    found = NoiseFloor(
        {c.column: estimate(overall, c) for c in NOISE_CHANGES}, change_estimates(aa, ["seq_len"], NOISE_CHANGES)
    )
    if found.measured:
        return found
    return NoiseFloor(
        found.changes,
        found.by_length,
        f"there is only {found.pairs} A/A pair (one round of one passage), and an interval needs at least two",
    )
