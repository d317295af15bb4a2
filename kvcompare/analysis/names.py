"""Names of configurations, the same in every table and chart."""

from __future__ import annotations

from typing import Any

import polars as pl

from kvcompare.analysis.pairing import BASELINE_POLICY

# --- Names of configurations, the same in every table and chart ---------------------------------------------

#: The compression setting a name leaves unsaid (StreamingLLM's, the default); the other one is always named.
DEFAULT_COMPRESSION = "continuous"


def several_position_modes(cells: pl.DataFrame) -> bool:
    """Whether the run measured more than one position mode, and so more than one `full` per passage."""
    return cells["positions"].drop_nulls().n_unique() > 1


def ratio_words(ratio: float) -> str:
    """A compression ratio as a name says it: 'ratio 0.5' (the share of the context removed)."""
    return f"ratio {ratio:g}"


def removed_words(ratio: float) -> str:
    """A compression ratio as a table cell says it: '0.5 (50% removed)'."""
    return f"{ratio:g} ({100 * ratio:g}% removed)"


def _setting(row: dict[str, Any]) -> str | None:
    """The compression setting a name says: 'prefill', never the default (continuous)."""
    setting = row.get("compression")
    return None if setting in (None, DEFAULT_COMPRESSION) else str(setting)


def config_name(row: dict[str, Any], several_modes: bool = False) -> str:
    """'streaming @ 64', plus ', prefill' in the prefill setting, ', ratio 0.5' where a compression ratio gave the
    limit (instead of '@ limit': the probes of one ratio have limits a few tokens apart), and ', positions=shift'
    when positions are not the true ones: 'snapkv, prefill, ratio 0.5'.

    The `full` baseline evicts nothing, so the position mode changes nothing it computes: it is 'full'. A run
    with several position modes (several_modes) measures it once per mode, as the baseline that mode's
    policies are paired with, and only then is the mode named: 'full (for positions=shift)'. The compression
    setting does change what `full` measures (the prefill setting scores only the second half of a passage), so
    the prefill one is always named: 'full (prefill)', 'full (prefill, for positions=shift)'.
    """
    setting, ratio = _setting(row), row.get("ratio")
    if row["policy"] == BASELINE_POLICY:
        named = several_modes and row["positions"] is not None
        said = [*([setting] if setting else []), *([f"for positions={row['positions']}"] if named else [])]
        return f"{row['policy_label']} ({', '.join(said)})" if said else row["policy_label"]
    limited = row["cache_size"] is not None and ratio is None
    name = f"{row['policy_label']} @ {row['cache_size']}" if limited else row["policy_label"]
    name += f", {setting}" if setting else ""
    name += f", {ratio_words(ratio)}" if ratio is not None else ""
    return name if row["positions"] in (None, "true") else f"{name}, positions={row['positions']}"


def policy_name(row: dict[str, Any], several_modes: bool = False) -> str:
    """config_name without the cache limit or ratio, for tables and charts that show the budget on its own."""
    return config_name({**row, "cache_size": None, "ratio": None}, several_modes)
