"""Names of configurations, the same in every table and chart."""

from __future__ import annotations

from typing import Any

import polars as pl

from kvcompare.analysis.pairing import BASELINE_POLICY

# --- Names of configurations, the same in every table and chart ---------------------------------------------


def several_position_modes(cells: pl.DataFrame) -> bool:
    """Whether the run measured more than one position mode, and so more than one `full` per passage."""
    return cells["positions"].drop_nulls().n_unique() > 1


def config_name(row: dict[str, Any], several_modes: bool = False) -> str:
    """'streaming @ 64', plus ', positions=shift' when positions are not the true ones.

    The `full` baseline evicts nothing, so the position mode changes nothing it computes: it is 'full'. A run
    with several position modes (several_modes) measures it once per mode, as the baseline that mode's
    policies are paired with, and only then is the mode named: 'full (for positions=shift)'.
    """
    if row["policy"] == BASELINE_POLICY:
        named = several_modes and row["positions"] is not None
        return f"{row['policy_label']} (for positions={row['positions']})" if named else row["policy_label"]
    name = row["policy_label"] if row["cache_size"] is None else f"{row['policy_label']} @ {row['cache_size']}"
    return name if row["positions"] in (None, "true") else f"{name}, positions={row['positions']}"


def policy_name(row: dict[str, Any], several_modes: bool = False) -> str:
    """config_name without the cache limit, for tables that show the limit in a column of its own."""
    return config_name({**row, "cache_size": None}, several_modes)
