"""A policy that fails costs only its own cells, and its author sees where: the policy's own frames (file and
line) on stderr, and the whole traceback with the failed cell."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import polars as pl
import pytest
import torch
from runs import tiny_run

from kvcompare import testing
from kvcompare.hookspecs import hookimpl
from kvcompare.policy import ScoredPolicy
from kvcompare.report.build import FAILED_HINT
from kvcompare.run.runner import run
from kvcompare.signals import Needs
from kvcompare.testing import RaisesAtEviction


class Misbehaving:
    @hookimpl
    def register_policies(self, register: Callable[[type], None]) -> None:
        register(RaisesAtEviction)


@pytest.fixture
def raises(register_plugin: Callable[[object, str], None]) -> None:
    register_plugin(Misbehaving(), "misbehaving")


def raise_line() -> str:
    """Where RaisesAtEviction raises, as a traceback names it."""
    lines, first = inspect.getsourcelines(RaisesAtEviction.score)
    offset = next(i for i, line in enumerate(lines) if "raise RuntimeError" in line)
    return f'File "{testing.__file__}", line {first + offset}, in score'


@pytest.mark.parametrize(
    "changes",
    [{}, {"quality_batch": 1}, {"tasks": ["passkey"], "lengths": [200], "depths": [0.5]}],
    ids=["batched", "one-by-one", "passkey"],
)
def test_a_failed_cell_shows_and_keeps_the_policys_own_frames(
    tiny_model_dir: Path, tmp_path: Path, raises: None, capsys: pytest.CaptureFixture[str], changes: dict
) -> None:
    config = tiny_run(tiny_model_dir, policies=["raises", "streaming", "recent"], repeats=1, **changes)
    cells = pl.read_parquet(run(config, tmp_path / "run", progress=False) / "cells" / "*.parquet")
    err = capsys.readouterr().err
    assert "NoneType: None" not in err
    assert "cell failed: policy 'raises' (plugin 'misbehaving'): RuntimeError: bug in the policy" in err
    assert raise_line() in err and 'raise RuntimeError("bug in the policy")' in err  # the file, line and code
    failed = cells.filter(pl.col("status") == "failed")
    assert failed["policy"].to_list() == ["raises"]
    stored = failed.row(0, named=True)["traceback"]
    assert stored.startswith("Traceback (most recent call last):") and raise_line() in stored
    assert stored.rstrip().endswith("RuntimeError: bug in the policy")
    assert cells.filter(pl.col("status") == "ok").height == cells.height - 1


def test_a_run_in_which_every_cell_failed_exits_non_zero_and_says_so(
    tiny_model_dir: Path, tmp_path: Path, raises: None, capsys: pytest.CaptureFixture[str]
) -> None:
    from runs import CORPUS

    from kvcompare.cli import main

    out = tmp_path / "run"
    args = ["run", "--model", str(tiny_model_dir), "--dataset", str(CORPUS), "--policies", "raises", "--cache", "16"]
    args += ["--lengths", "48", "--stride", "8", "--repeats", "1", "--gen", "2", "--warmup", "0", "--skip-layers", "0"]
    assert main([*args, "--no-baseline", "--out", str(out), "--quiet"]) == 1
    captured = capsys.readouterr()
    assert "no successful cell: all 1 cells failed" in captured.out
    assert "predates" not in captured.out and "every one of its 1 perplexity and speed cells failed" in captured.out
    assert "kvcompare: no cell succeeded (1 failed)" in captured.err


def test_a_run_in_which_only_the_baseline_succeeded_exits_non_zero_and_keeps_it(
    tiny_model_dir: Path, tmp_path: Path, raises: None, capsys: pytest.CaptureFixture[str]
) -> None:
    """`full` alone compares nothing: the run fails (status 1) pointing to the compared cells' errors, and keeps
    what it measured (the baseline's rows and the report); a run with one compared cell that succeeded exits 0."""
    from runs import CORPUS

    from kvcompare.cli import main

    out = tmp_path / "run"
    args = ["run", "--model", str(tiny_model_dir), "--dataset", str(CORPUS), "--cache", "16", "--lengths", "48"]
    args += ["--stride", "8", "--repeats", "1", "--gen", "2", "--warmup", "0", "--skip-layers", "0", "--quiet"]
    assert main([*args, "--policies", "raises", "--out", str(out)]) == 1
    out_text, err = capsys.readouterr()
    assert "nothing compared: all 1 cells but `full`'s failed" in out_text
    assert "kvcompare: every compared cell failed (1 failed; only the `full` baseline succeeded): " in err
    assert FAILED_HINT in err
    cells = pl.read_parquet(out / "cells" / "*.parquet")
    assert sorted(zip(cells["policy"], cells["status"], strict=True)) == [("full", "ok"), ("raises", "failed")]
    assert (out / "report" / "report.md").is_file()
    assert main([*args, "--policies", "raises,recent", "--out", str(tmp_path / "one-ok")]) == 0


def test_a_report_without_a_baseline_does_not_claim_one(tiny_model_dir: Path, tmp_path: Path) -> None:
    from kvcompare.analysis import load_run
    from kvcompare.report.sections import compared

    out = run(tiny_run(tiny_model_dir, baseline=False, repeats=1), tmp_path / "run", progress=False)
    assert compared(load_run(out))["policies"] == "recent, with no `full` baseline (--no-baseline)"
    out = run(tiny_run(tiny_model_dir, repeats=1), tmp_path / "with", progress=False)
    assert compared(load_run(out))["policies"] == "recent against `full`"


@dataclasses.dataclass
class NeedsRaises(ScoredPolicy):
    """A third-party policy whose needs() has a bug."""

    name: ClassVar[str] = "needs-raises"

    def needs(self) -> Needs:
        raise ValueError("bug in needs()")

    def score(self, keys: torch.Tensor, positions: torch.Tensor, signals: object = None) -> torch.Tensor:
        return positions.float()


@dataclasses.dataclass
class ChecksOnEveryBuild(ScoredPolicy):
    """A constructor check that passes when the run is planned and fails when a cell's cache builds its own
    instance (``fresh()``), as a check of something that changed in between would."""

    name: ClassVar[str] = "checks-on-build"
    builds: ClassVar[list[int]] = []

    def __post_init__(self) -> None:
        self.builds.append(1)
        if len(self.builds) > 2:  # the registry's own check and the plan's build pass
            raise RuntimeError("resource gone")

    def score(self, keys: torch.Tensor, positions: torch.Tensor, signals: object = None) -> torch.Tensor:
        return positions.float()


@dataclasses.dataclass
class HugeRing(ScoredPolicy):
    """Asks for a ring of queries far larger than any memory: its signal buffer cannot be allocated."""

    name: ClassVar[str] = "huge-ring"

    def needs(self) -> Needs:
        return Needs(queries=10**9)

    def score(self, keys: torch.Tensor, positions: torch.Tensor, signals: object = None) -> torch.Tensor:
        return positions.float()


@dataclasses.dataclass
class BadConstructor(ScoredPolicy):
    name: ClassVar[str] = "bad-constructor"

    def validate(self) -> None:
        raise ValueError("bug in validate()")


class ThirdParty:
    @hookimpl
    def register_policies(self, register: Callable[[type], None]) -> None:
        register(NeedsRaises)
        register(ChecksOnEveryBuild)
        register(BadConstructor)
        register(HugeRing)


@pytest.fixture
def third_party(register_plugin: Callable[[object, str], None]) -> None:
    ChecksOnEveryBuild.builds.clear()
    register_plugin(ThirdParty(), "third-party")


@pytest.mark.parametrize("batch", [None, 1], ids=["batched", "one-by-one"])
@pytest.mark.parametrize(
    "spec,error",
    [
        ("needs-raises", "ValueError: bug in needs()"),
        ("checks-on-build", "RuntimeError: resource gone"),
        ("huge-ring", "AllocationError: the signals the policy reads (a ring of 1000000000 queries"),
    ],
)
def test_a_policy_that_fails_while_its_cache_is_built_costs_only_its_cells(
    tiny_model_dir: Path, tmp_path: Path, third_party: None, spec: str, error: str, batch: int | None
) -> None:
    config = tiny_run(tiny_model_dir, policies=[spec, "recent"], cache_sizes=[16, 24], quality_batch=batch)
    cells = pl.read_parquet(run(config, tmp_path / "run", progress=False) / "cells" / "*.parquet")
    failed = cells.filter(pl.col("status") == "failed")
    assert failed.height == 2 and failed["error"].str.starts_with(error).all(), failed["error"].to_list()
    ok = cells.filter(pl.col("status") == "ok")
    assert sorted(ok["policy"].to_list()) == ["full", "recent", "recent"] and ok["tpot_s"].is_not_null().all()


def test_a_policy_whose_constructor_raises_is_refused_before_the_run_naming_where(
    tiny_model_dir: Path, tmp_path: Path, third_party: None
) -> None:
    from kvcompare.config import ConfigError

    with pytest.raises(ConfigError, match=r"'bad-constructor' \(plugin 'third-party'\) could not be built: "
                       r"ValueError: bug in validate\(\) \(at .*test_failed_cells.py:\d+\)"):  # fmt: skip
        run(tiny_run(tiny_model_dir, policies=["bad-constructor", "recent"]), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
