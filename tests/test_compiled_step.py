"""Compiled decode steps (--compile, kvcompare.engine.compiled): the same logits as eager steps for every built-in
policy in both position modes, with and without eviction, in both compression settings; a fallback with a reason
instead of a crash; compiling never inside a timed part (`KVCOMPARE_TEST_COMPILE=1 python -m pytest` runs the
rest of the suite with compiled steps too, see conftest.py).

The default run compiles with torch.compile's ``eager`` backend: dynamo traces the same whole-graph step (the same
buffers, masks and guards, the same failures) without generating code, in about a second. The ``compile``
marker runs the grid again with inductor, as a real run compiles (minutes: `pytest -m compile`).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import polars as pl
import pytest
import torch
from families import BY_NAME
from runs import tiny_run

from kvcompare.config import CacheConfig, prefill_window
from kvcompare.engine import compiled
from kvcompare.engine.executor import CompileInTimedStepError, Executor
from kvcompare.hookspecs import hookimpl
from kvcompare.plugins import get_registry
from kvcompare.policy import ScoredPolicy
from kvcompare.testing import TINY_VOCAB, builtin_policies, tiny_llama

PROMPT, STEPS, STRIDE = 40, 12, 8
#: Every built-in policy, with parameters that fit a 24-token limit (snapkv's window below what an eviction keeps).
POLICIES = [*builtin_policies(full=True), "l2:mode=random"]
EVICTING, ROOMY = 24, 128  # a limit that evicts at every decode step, and one that never evicts


@pytest.fixture(autouse=True)
def fresh_compiler() -> Iterator[None]:
    """Each test compiles from nothing (no graph of another test's model counts against the recompile limit), on
    one thread, as the rest of the suite runs."""
    torch._dynamo.reset()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch._dynamo.reset()
    torch.set_num_threads(threads)


def tokens(length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, TINY_VOCAB, (length,), generator=torch.Generator().manual_seed(seed))


def decode_logits(
    executor: Executor, spec: str, config: CacheConfig, fed: torch.Tensor, prompt: int = PROMPT
) -> tuple[torch.Tensor, Any]:
    """The logits of each decode step ``[steps, vocab]`` after prefilling ``fed[:prompt]`` (and compressing it
    once in the prefill setting), with the rest of ``fed`` fed one token at a time (teacher-forced, so that two
    executors see the same tokens whatever their rounding); and the cache."""
    cache = executor.new_cache(get_registry().build(spec), config, capacity=len(fed))
    steps = []
    with executor.attached():
        executor.prefill(cache, fed[:prompt].view(1, -1), config.stride)
        executor.compress(cache)
        for token in fed[prompt:]:
            logits, _ = executor.forward(cache, token.view(1, 1), last_only=True)
            steps.append(logits[0, -1].float().clone())
    return torch.stack(steps), cache


def cache_config(limit: int | None, positions: str, compression: str = "continuous") -> CacheConfig:
    reserve = prefill_window("uniform") if compression == "prefill" else STRIDE  # as RunConfig.cache_config
    return CacheConfig(limit, STRIDE, positions, (0,), 1, "uniform", reserve, compression)


def executors(model: torch.nn.Module, backend: str | Any = "eager") -> tuple[Executor, Executor]:
    """An eager executor and one with compiled decode steps, on the same model (eager even in the suite's compiled
    mode, see conftest.py)."""
    eager, compiled_steps = Executor(model), Executor(model)
    eager.compiled = None
    compiled_steps.compile_decode_steps(backend)
    return eager, compiled_steps


def assert_same_steps(model: torch.nn.Module, spec: str, config: CacheConfig, backend: str = "eager") -> Any:
    eager, compiled_steps = executors(model, backend)
    fed = tokens(PROMPT + STEPS)
    expected, eager_cache = decode_logits(eager, spec, config, fed)
    got, cache = decode_logits(compiled_steps, spec, config, fed)
    status = compiled_steps.compile_status
    assert status.active and status.reason is None, status
    assert status.steps == STEPS  # every decode step ran compiled: none fell back to eager
    assert cache.fixed_shape and not eager_cache.fixed_shape
    assert cache.evictions == eager_cache.evictions
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    return cache


@pytest.mark.parametrize("spec", POLICIES)
@pytest.mark.parametrize("positions", ["true", "shift"])
@pytest.mark.parametrize("limit", [EVICTING, ROOMY])
def test_compiled_steps_give_the_eager_logits(spec: str, positions: str, limit: int) -> None:
    cache = assert_same_steps(tiny_llama(), spec, cache_config(None if spec == "full" else limit, positions))
    if spec != "full":  # the limit that evicts did evict, at every decode step; the other never did
        assert cache.evictions >= STEPS if limit == EVICTING else cache.evictions == 0


@pytest.mark.parametrize("spec", ["streaming", "snapkv:window=4", "h2o", "keydiff"])
@pytest.mark.parametrize("positions", ["true", "shift"])
def test_compiled_steps_give_the_eager_logits_after_a_prefill_compression(spec: str, positions: str) -> None:
    cache = assert_same_steps(tiny_llama(), spec, cache_config(EVICTING, positions, "prefill"))
    assert cache.kv_bytes_compressed is not None  # the decode steps ran on the once-compressed cache


@pytest.mark.parametrize("family", ["gemma2", "gpt-oss", "mistral-window"])
def test_compiled_steps_keep_windows_soft_caps_and_sinks(family: str) -> None:
    """Sliding windows (a local layer's mask), soft-capping and learned sinks live in the compiled attention."""
    assert_same_steps(BY_NAME[family].build(), "streaming", cache_config(EVICTING, "shift"))
    assert_same_steps(BY_NAME[family].build(), "full", cache_config(None, "true"))


def test_bfloat16_compiled_steps_agree_within_bfloat16_rounding() -> None:
    model = tiny_llama().to(torch.bfloat16)
    eager, compiled_steps = executors(model)
    fed = tokens(PROMPT + STEPS)
    config = cache_config(EVICTING, "shift")
    expected, _ = decode_logits(eager, "streaming", config, fed)
    got, _ = decode_logits(compiled_steps, "streaming", config, fed)
    assert compiled_steps.compile_status.steps == STEPS
    scale = expected.abs().max()
    # bfloat16 keeps 8 significant bits: a few roundings of 2**-8 of the logits' scale, no more
    assert (got - expected).abs().max() <= 4 * 2**-8 * scale


@dataclasses.dataclass
class Oldest(ScoredPolicy):
    """A plugin's policy: evicts the oldest tokens (scores are token indices)."""

    name: ClassVar[str] = "oldest"

    def score(self, keys: torch.Tensor, positions: torch.Tensor, signals: object = None) -> torch.Tensor:
        return positions.float()


class OldestPlugin:
    @hookimpl
    def register_policies(self, register: Any) -> None:
        register(Oldest)


def test_a_plugin_policy_runs_unchanged_beside_the_compiled_step(register_plugin: Any) -> None:
    register_plugin(OldestPlugin(), "oldest-plugin")
    assert_same_steps(tiny_llama(), "oldest", cache_config(EVICTING, "shift"))


def failing_backend(graph: Any, inputs: Any) -> Any:
    raise RuntimeError("this backend cannot compile anything")


def test_a_step_that_cannot_compile_runs_eagerly_with_the_reason(capsys: pytest.CaptureFixture[str]) -> None:
    model = tiny_llama()
    eager, failing = executors(model, failing_backend)
    fed = tokens(PROMPT + STEPS)
    config = cache_config(EVICTING, "shift")
    expected, _ = decode_logits(eager, "streaming", config, fed)
    got, _ = decode_logits(failing, "streaming", config, fed)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)  # every step ran, eagerly
    status = failing.compile_status
    assert not status.active and status.steps == 0
    assert "this backend cannot compile anything" in (status.reason or "")
    assert "--compile: decode steps run eagerly from now on" in capsys.readouterr().err
    trial = failing.generate(fed, get_registry().build("streaming"), config, gen=3, warmup=1)
    assert not trial.compiled and trial.compile_s == 0.0


def test_a_cache_shape_compiles_between_prefill_and_decode_never_in_a_timed_part(monkeypatch: Any) -> None:
    eager, compiled_steps = executors(tiny_llama())
    prompt, policy, config = tokens(PROMPT), get_registry().build("streaming"), cache_config(EVICTING, "shift")
    trial = compiled_steps.generate(prompt, policy, config, gen=4, warmup=0)  # no warm-up step is needed
    assert trial.compiled and trial.compile_s > 0
    assert trial.generated == eager.generate(prompt, policy, config, gen=4, warmup=0).generated
    again = compiled_steps.generate(prompt, policy, config, gen=4, warmup=0)  # the same shape: nothing compiles
    assert again.compiled and again.compile_s == 0.0
    # Without the compilation between prefill and decode, a new shape would compile in a counted step: refused.
    monkeypatch.setattr(compiled.CompiledDecode, "prepare", lambda self, cache: None)
    with pytest.raises(CompileInTimedStepError, match="--warmup"):
        compiled_steps.generate(prompt, policy, cache_config(EVICTING + 8, "shift"), gen=4, warmup=0)


def test_a_compiled_run_records_it_in_rows_and_run_json(tiny_model_dir: Path, tmp_path: Path, monkeypatch: Any) -> None:
    from kvcompare.analysis import load_run
    from kvcompare.report.notices import compiled_steps
    from kvcompare.run.runner import run

    monkeypatch.setattr(compiled, "DEFAULT_BACKEND", "eager")
    folder = run(tiny_run(tiny_model_dir, compile=True, policies=["streaming", "h2o"]), tmp_path / "r")
    data = load_run(folder)
    assert data.cells["compile"].to_list() == [True] * 3
    assert data.cells["compiled"].to_list() == [True] * 3
    assert data.cells["compile_fallback"].null_count() == 3
    summary = json.loads((folder / "run.json").read_text())["speed"]["compile"]
    assert summary["cells_compiled"] == 3 and summary["cells_eager"] == 0 and summary["compile_s"] > 0
    assert "decode steps compiled" in compiled_steps(data.cells)


@pytest.mark.parametrize("compression", ["continuous", "prefill"])
def test_the_warm_up_compiles_fulls_shape_and_the_totals_count_it(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: Any, compression: str
) -> None:
    """The untimed warm-up pass runs the first cell's own prompt (in the prefill setting, the context alone), so
    `full`'s cache shape compiles there, not in `full`'s cell; run.json's total and the report count the warm-up's
    compiling beside the cells'."""
    from kvcompare.analysis import load_run
    from kvcompare.report.notices import compiled_steps
    from kvcompare.run.runner import run

    monkeypatch.setattr(compiled, "DEFAULT_BACKEND", "eager")
    limits = {"cache_sizes": [], "ratios": [0.5]} if compression == "prefill" else {}
    config = tiny_run(tiny_model_dir, compile=True, compression=[compression], lengths=[64], repeats=1, **limits)
    folder = run(config, tmp_path / "r", progress=False)
    data = load_run(folder)
    full = data.cells.filter(pl.col("policy") == "full")
    assert full["compiled"].to_list() == [True] and full["compile_s"].to_list() == [0.0]
    summary = json.loads((folder / "run.json").read_text())["speed"]["compile"]
    cells = float(data.cells["compile_s"].sum())
    assert summary["warm_up_compile_s"] > 0 and summary["cells_compile_s"] == pytest.approx(cells)
    assert summary["compile_s"] == pytest.approx(cells + summary["warm_up_compile_s"])
    said = compiled_steps(data.cells, data.meta)
    assert f"{summary['warm_up_compile_s']:.1f} s in the untimed warm-up pass" in said


def test_a_run_whose_steps_cannot_compile_says_why_in_rows_and_report(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: Any
) -> None:
    from kvcompare.analysis import load_run
    from kvcompare.report.notices import compile_notices
    from kvcompare.run.runner import run

    monkeypatch.setattr(compiled, "DEFAULT_BACKEND", failing_backend)
    folder = run(tiny_run(tiny_model_dir, compile=True), tmp_path / "r")
    cells = load_run(folder).cells
    assert cells["status"].to_list() == ["ok", "ok"]  # measured eagerly, nothing lost
    assert cells["compiled"].to_list() == [False, False]
    assert all("this backend cannot compile anything" in reason for reason in cells["compile_fallback"])
    (notice,) = compile_notices(cells)
    assert "2 of 2 timed cells ran eagerly" in notice and "this backend cannot compile anything" in notice
    summary = json.loads((folder / "run.json").read_text())["speed"]["compile"]
    assert summary["cells_eager"] == 2 and summary["fallbacks"]


@pytest.mark.compile
@pytest.mark.parametrize("spec", ["full", "streaming", "h2o", "snapkv:window=4"])
def test_inductor_compiled_steps_give_the_eager_logits(spec: str) -> None:
    assert_same_steps(tiny_llama(), spec, cache_config(None if spec == "full" else EVICTING, "shift"), "inductor")


@pytest.mark.compile
def test_inductor_compiled_steps_of_the_embedded_model_give_its_eager_logits() -> None:
    """The embedded SmolLM2 (30 layers) compiled as a run compiles it: `full` and an evicting `streaming`, float32.

    The compiled step adds in another order (its own reductions for the weights' matrix products, a written-out
    softmax), so logits of order 10 agree to a few 1e-5 relative, not bit for bit."""
    from kvcompare.models import load_model

    torch.set_num_threads(2)
    model = load_model("smollm2-135m").model
    eager, compiled_steps = executors(model, "inductor")
    fed = torch.randint(0, model.config.vocab_size, (PROMPT * 4 + STEPS,), generator=torch.Generator().manual_seed(3))
    for spec, config in (("full", cache_config(None, "shift")), ("streaming", cache_config(96, "shift"))):
        expected, _ = decode_logits(eager, spec, config, fed, prompt=PROMPT * 4)
        got, _ = decode_logits(compiled_steps, spec, config, fed, prompt=PROMPT * 4)
        scale = expected.abs().max()
        print(spec, "max |diff|", (got - expected).abs().max().item(), "logit scale", scale.item())
        assert compiled_steps.compile_status.steps > 0 and compiled_steps.compile_status.active
        assert (got - expected).abs().max() <= 4e-6 * scale  # measured: 1.3e-6 of the scale
        assert torch.equal(got.argmax(-1), expected.argmax(-1))
