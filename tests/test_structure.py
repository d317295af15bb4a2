"""The house rules of issue 8: a plan without weights, one error base, a public face, a model left as found."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from runs import tiny_run

import kvcompare
from kvcompare.config import CacheConfig, RunConfig
from kvcompare.engine.executor import Executor
from kvcompare.errors import KVCompareError
from kvcompare.run.plan import plan
from kvcompare.testing import tiny_llama


def small_config(model_dir: Path, **changes: object) -> RunConfig:
    values: dict[str, object] = {
        "policies": ["streaming", "recent"],
        "cache_sizes": [16, 32],
        "lengths": [48, 64],
        "samples": [2, 1],
        "positions": ["true", "shift"],
    }
    return tiny_run(model_dir, **{**values, **changes})


def test_a_plan_needs_no_weights_and_cells_carry_their_identity(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import transformers

    def no_weights(*args: object, **kwargs: object) -> None:
        raise AssertionError("planning loaded the model's weights")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_weights)
    grid = plan(small_config(tiny_model_dir))
    # 3 passages x 2 position modes x (full + 2 policies x 2 limits)
    assert len(grid.passages) == 3 and len(grid.cells) == 3 * 2 * 5
    first = grid.cells[0]
    assert first.fields["model"] == str(tiny_model_dir) and first.fields["plugin"] == "full"
    assert first.fields["gen_tokens"] == grid.config.gen and first.cache.limit is None
    assert len({cell.id for cell in grid.cells}) == len(grid.cells)
    assert [c.id for c in plan(small_config(tiny_model_dir)).cells] == [c.id for c in grid.cells]
    # interleaved within a passage: every policy of a passage before the next passage
    passages = [cell.passage.token_offset for cell in grid.cells]
    assert passages == sorted(passages, key=passages.index)
    meta = grid.metadata()
    assert meta["cells_planned"] == 30 and len(meta["passages"]) == 3 and meta["config"]["stride"] == 8


def test_the_executor_leaves_the_model_as_it_found_it() -> None:
    model = tiny_llama()
    model.config._attn_implementation = "sdpa"
    executor = Executor(model)
    assert model.config._attn_implementation == "sdpa"
    from kvcompare.plugins import get_registry

    executor.score(torch.arange(20) % 90, get_registry().build("recent"), CacheConfig(8, 4, "shift", ()))
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(RuntimeError), executor.attached():
        assert model.config._attn_implementation == "kvcompare"
        raise RuntimeError("a failure inside still restores")
    assert model.config._attn_implementation == "sdpa"


def test_plugin_authors_import_from_the_package() -> None:
    from kvcompare import KVPolicy, PolicyError, hookimpl, parameter
    from kvcompare.hookspecs import hookimpl as real_hookimpl
    from kvcompare.policy import KVPolicy as RealPolicy

    assert KVPolicy is RealPolicy and hookimpl is real_hookimpl and callable(parameter)
    assert issubclass(PolicyError, KVCompareError)
    with pytest.raises(AttributeError, match="no attribute"):
        kvcompare.NotAName  # noqa: B018


def test_every_user_error_shares_one_base() -> None:
    from kvcompare.config import ConfigError
    from kvcompare.corpus import CorpusError
    from kvcompare.engine.rope import UnsupportedModelError
    from kvcompare.fetch import FetchError
    from kvcompare.models import ModelError
    from kvcompare.policy import PolicyError
    from kvcompare.report import ReportError
    from kvcompare.run.results import ResultsError

    for error in (ConfigError, CorpusError, FetchError, ModelError, PolicyError, ReportError, ResultsError):
        assert issubclass(error, KVCompareError), error
    assert issubclass(UnsupportedModelError, KVCompareError)


def test_policies_show_their_parameter_help(capsys: pytest.CaptureFixture[str]) -> None:
    from kvcompare.cli import main

    assert main(["policies"]) == 0
    out = capsys.readouterr().out
    assert "start_size: int = 4  attention-sink tokens" in out and "seed of mode=random" in out


def test_a_label_builds_no_instance() -> None:
    from kvcompare.policy import KVPolicy

    built: list[int] = []

    @dataclasses.dataclass
    class Counting(KVPolicy):
        name = "counting"
        size: int = 3

        def __post_init__(self) -> None:
            built.append(self.size)

    policy = Counting(size=5)
    assert [policy.label() for _ in range(3)] == ["counting:size=5"] * 3 and built == [5]


def test_cache_config_checks_positions_in_one_place() -> None:
    from kvcompare.config import ConfigError

    with pytest.raises(ConfigError, match="true and/or shift"):
        CacheConfig(8, 4, "absolute")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="true and/or shift"):
        RunConfig().cache_config(8, "absolute")


def test_backends_never_import_the_runner() -> None:
    """The runner drives the backends (serial, Ray) and alone owns the results folder; the backends and the
    passage code they share import neither it nor each other, so no import circle passes through them."""
    import ast

    package = Path(kvcompare.__file__).parent

    def imports(module: str) -> set[str]:
        tree = ast.parse((package / "run" / f"{module}.py").read_text())
        found = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        found |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        return {name for name in found if name.startswith("kvcompare")}

    for module in ("backends", "distributed", "passages", "schedule", "resume"):
        assert "kvcompare.run.runner" not in imports(module), module
    for module in ("passages", "backends"):
        assert "kvcompare.run.distributed" not in imports(module), module
    assert "kvcompare.run.backends" not in imports("distributed") | imports("passages")
