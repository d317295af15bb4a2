"""Tasks are plugins: built-in tasks come through the same entry-point path as third-party ones; a third-party
task package, installed, is listed, built from its spec and run by `kvcompare run`."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import polars as pl
import pytest
from installed import host_finding, install_example
from runs import tiny_run

from kvcompare import hookimpl, parameter
from kvcompare.cli import main
from kvcompare.config import ConfigError
from kvcompare.plugins import get_host
from kvcompare.run.runner import run
from kvcompare.task import Outcome, Probe, Score, Task, TaskError, TaskInputs

RULER = ["niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe"]


def test_kvcompare_tasks_lists_ppl_passkey_and_rulers_tasks(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tasks"]) == 0
    out = capsys.readouterr().out
    for name in ["ppl", "passkey", *RULER]:
        assert f"\n{name}  (plugin: " in f"\n{out}", name
    assert "depths: float/... = 0.1/0.3/0.5/0.7/0.9" in out and "request: generate" in out


def test_a_task_spec_is_built_like_a_policy_spec() -> None:
    registry = get_host().tasks()
    task = registry.build("passkey:depths=0.2/0.8:haystack=text")
    assert task.label() == "passkey:depths=0.2/0.8:haystack=text" and task.plugin == "passkey"
    with pytest.raises(TaskError, match="Did you mean 'niah_single'"):
        registry.build("niah_singel")
    with pytest.raises(TaskError, match="has no parameter 'dpeths'. Did you mean 'depths'"):
        registry.build("passkey:dpeths=0.5")


@pytest.fixture(scope="module")
def installed_example(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return install_example("kvcompare-example-task", tmp_path_factory.mktemp("site"))


def test_an_installed_third_party_task_is_found_and_run(
    installed_example: Path, monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path, tmp_path: Path
) -> None:
    fresh = host_finding(installed_example, monkeypatch)
    infos = {i.name: i for i in fresh.plugins()}
    assert infos["kv_lookup"].distribution == "kvcompare-example-task"
    monkeypatch.setattr("kvcompare.run.plan.get_host", lambda: fresh)
    config = tiny_run(tiny_model_dir, tasks=["kv_lookup:pairs=4"], lengths=[128], samples=[2], cache_sizes=[64])
    run(config, tmp_path / "run", progress=False)
    rows = pl.read_parquet(tmp_path / "run" / "cells" / "*.parquet")
    assert set(rows["task"]) == {"kv_lookup"} and set(rows["status"]) == {"ok"}
    assert rows.height == 2 * 2  # full and recent, two probes
    assert {json.loads(p)["pairs"] for p in rows["task_params"]} == {4}
    assert rows["correct"].null_count() == 0 and rows["answer_logprob"].is_not_null().all()
    assert (rows["seq_len"] == 128).all()


def test_a_task_that_cannot_build_its_prompt_is_refused_before_measuring(tiny_model_dir: Path, tmp_path: Path) -> None:
    config = tiny_run(tiny_model_dir, tasks=["vt"], lengths=[40], samples=[1])
    with pytest.raises(ConfigError, match="task 'vt'"):
        run(config, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_a_generate_task_runs_end_to_end_and_is_reported(tiny_model_dir: Path, tmp_path: Path) -> None:
    """RULER's single needle on the tiny model: greedy decoding under each policy, the output scored by string
    match, and the report's task section."""
    config = tiny_run(
        tiny_model_dir, tasks=["niah_single:haystack=repeat"], lengths=[400], samples=[2], cache_sizes=[96]
    )
    folder = run(config, tmp_path / "run", progress=False)
    rows = pl.read_parquet(folder / "cells" / "*.parquet")
    assert set(rows["task"]) == {"niah_single"} and set(rows["status"]) == {"ok"} and rows.height == 2 * 2
    assert rows["generated"].is_not_null().all() and rows["score"].is_between(0, 1).all()
    assert (rows["correct"] == (rows["score"] == 1.0)).all()
    from kvcompare.report import build_report

    markdown = build_report(folder).markdown.read_text()
    assert "## Tasks" in markdown and "### Task niah_single" in markdown and "### Score across tasks" in markdown
    summary = markdown.split("## Tasks")[0]  # it speaks only of what the run measured
    assert "passkey" not in summary and "measured probe tasks (niah_single) only" in summary


@dataclasses.dataclass(frozen=True)
class Unruly(Task):
    """A task plugin that breaks its contract as ``does`` says (``ok``: keeps it)."""

    name = "unruly"
    request = "answer"
    does: str = parameter("ok", "ok, raise, none, dicts, short, long, or score=<what score() returns>")

    def probes(self, inputs: TaskInputs, length: int, samples: int) -> list[Probe]:
        if self.does == "raise":
            raise RuntimeError("bug in probes")
        if self.does == "none":
            return []
        if self.does == "dicts":
            return [{"context": (5,) * length}] * samples  # type: ignore[list-item]
        size = length + {"short": -5, "long": 5}.get(self.does, 0)
        return [Probe(context=(5,) * (size - 2), question=(6, 7), expected=("x",), answer=(8,))] * samples

    def score(self, probe: Probe, outcome: Outcome) -> Score:
        if self.does == "score=7-checked":
            return Score(True, 7.0)  # Score's own check raises
        if self.does == "score=7":  # a Score that skipped its own check
            unchecked = Score.__new__(Score)
            object.__setattr__(unchecked, "correct", True)
            object.__setattr__(unchecked, "score", 7.0)
            return unchecked
        returned = {
            "score=float": 0.5,
            "score=nan": SimpleNamespace(correct=False, score=math.nan),
            "score=str": SimpleNamespace(correct=True, score="1"),
            "score=correct-str": SimpleNamespace(correct="yes", score=1.0),
        }.get(self.does, Score(True, 1.0))
        return returned  # type: ignore[return-value]


class UnrulyPlugin:
    @hookimpl
    def register_tasks(self, register: Callable[[type], None]) -> None:
        register(Unruly)


@pytest.fixture
def unruly(register_plugin: Callable[[object, str], None]) -> None:
    register_plugin(UnrulyPlugin(), "unruly-plugin")


@pytest.mark.parametrize(
    "does,error",
    [
        ("raise", r"task 'unruly:does=raise' \(plugin 'unruly-plugin'\): probes\(\) raised RuntimeError: bug in "
         r"probes \(at .*test_task_plugins.py:\d+\)"),
        ("none", r"task 'unruly:does=none' \(plugin 'unruly-plugin'\) built no probes for length 64"),
        ("dicts", r"task 'unruly:does=dicts' \(plugin 'unruly-plugin'\) built dict objects, not Probes"),
        ("short", r"task 'unruly:does=short' \(plugin 'unruly-plugin'\) built a prompt of 59 tokens for length 64"),
        ("long", r"task 'unruly:does=long' \(plugin 'unruly-plugin'\) built a prompt of 69 tokens for length 64"),
    ],
    ids=["raises", "no-probes", "not-probes", "short", "long"],
)  # fmt: skip
def test_a_task_whose_probes_break_the_contract_is_refused_before_the_model_loads(
    tiny_model_dir: Path, tmp_path: Path, unruly: None, monkeypatch: pytest.MonkeyPatch, does: str, error: str
) -> None:
    """probes() raising (any exception), building none, or prompts of another length than asked: one error that
    names the task and its plugin, before the weights load (nothing is written)."""

    def no_weights(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model's weights were loaded")

    monkeypatch.setattr("kvcompare.run.passages.load_model", no_weights)
    config = tiny_run(tiny_model_dir, tasks=[f"unruly:does={does}"], lengths=[64], cache_sizes=[32])
    with pytest.raises(ConfigError, match=error) as refused:
        run(config, tmp_path / "run", progress=False)
    assert "\n" not in str(refused.value)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("returned", ["7", "7-checked", "float", "nan", "str", "correct-str"])
def test_a_score_outside_the_contract_fails_its_cell_naming_the_plugin(
    tiny_model_dir: Path, tmp_path: Path, unruly: None, returned: str
) -> None:
    """score() must give a Score whose ``correct`` is a bool and ``score`` a number in [0, 1]: anything else (7.0,
    NaN, a string, a bare float) fails the cell, with an error that names the task's plugin, and is never stored
    as a score; the task that keeps the contract beside it is measured."""
    spec = f"unruly:does=score={returned}"
    config = tiny_run(tiny_model_dir, tasks=[spec, "unruly"], lengths=[64], samples=[2], cache_sizes=[32])
    rows = pl.read_parquet(run(config, tmp_path / "run", progress=False) / "cells" / "*.parquet")
    bad = rows.filter(pl.col("task_params").str.contains("score="))
    assert bad.height == 2 * 2 and set(bad["status"]) == {"failed"} and bad["score"].is_null().all()
    assert bad["error"].str.contains(f"task '{spec}' (plugin 'unruly-plugin'): score() ", literal=True).all()
    good = rows.filter(~pl.col("task_params").str.contains("score="))
    assert set(good["status"]) == {"ok"} and good["score"].to_list() == [1.0] * 4
