"""Every model a user brings is measured exactly as the model computes it, or refused before any cell (issue 21).

A matrix over tiny config-built models of many families (tests/families.py): (a) `full` and a bounded policy
that never evicts give the model's own logits; (b) keys moved by shift mode equal the keys the model writes at
the new positions, in every layer; (c) evicting runs in both position modes finish finite within their limit.
Refused families are refused for the feature that cannot be reproduced, before the weights load where the
configuration shows it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from families import BY_NAME, REFUSED, SUPPORTED, WINDOW, Family
from runs import tiny_run

from kvcompare.config import CacheConfig
from kvcompare.engine.executor import Executor
from kvcompare.engine.fidelity import check_fidelity
from kvcompare.engine.rope import UnsupportedModelError
from kvcompare.models import refuse_by_config
from kvcompare.plugins import get_registry

TOKENS = 4 * WINDOW  # longer than every sliding window, so windows are exercised


@pytest.fixture(scope="module", params=SUPPORTED, ids=lambda family: family.name)
def checked(request: pytest.FixtureRequest) -> tuple[Family, Executor]:
    family: Family = request.param
    executor = Executor(family.build())
    check_fidelity(executor)  # adopts the rotary layout the model's own keys show
    return family, executor


def tokens_for(executor: Executor) -> torch.Tensor:
    return torch.randint(0, executor.vocab, (TOKENS,), generator=torch.Generator().manual_seed(3))


def chunked_logits(executor: Executor, spec: str, config: CacheConfig, ids: torch.Tensor) -> torch.Tensor:
    cache = executor.new_cache(get_registry().build(spec), config, capacity=ids.numel())
    with executor.attached():
        chunks = [ids[s : s + config.stride].view(1, -1) for s in range(0, ids.numel(), config.stride)]
        return torch.cat([executor.forward(cache, chunk)[0] for chunk in chunks], dim=1)


@pytest.mark.parametrize("positions", ["true", "shift"])
def test_full_and_a_policy_that_never_evicts_give_the_models_own_logits(
    checked: tuple[Family, Executor], positions: str
) -> None:
    family, executor = checked
    ids = tokens_for(executor)
    with torch.inference_mode():
        own = executor.model(input_ids=ids.view(1, -1), use_cache=False).logits
    for spec, limit in (("full", None), ("recent", TOKENS + 8)):
        ours = chunked_logits(executor, spec, CacheConfig(limit, 4, positions, (0,)), ids)  # type: ignore[arg-type]
        torch.testing.assert_close(
            ours, own, atol=2e-5, rtol=1e-4, msg=lambda m, spec=spec: f"{family.name} {spec}: {m}"
        )


def test_moved_keys_equal_the_keys_the_model_writes_at_the_new_positions(checked: tuple[Family, Executor]) -> None:
    family, executor = checked
    assert check_fidelity(executor).key_error < 1e-5, family.name


@pytest.mark.parametrize("positions", ["true", "shift"])
def test_evicting_runs_finish_finite_within_their_limit(checked: tuple[Family, Executor], positions: str) -> None:
    family, executor = checked
    ids = tokens_for(executor)
    for spec in ("streaming", "l2", "h2o"):
        result = executor.score(ids, get_registry().build(spec), CacheConfig(12, 4, positions, (0,)))  # type: ignore[arg-type]
        assert bool(torch.isfinite(torch.from_numpy(result.nll)).all()), (family.name, spec)
        assert result.max_cached <= 12, (family.name, spec)


@pytest.mark.parametrize("family", REFUSED, ids=lambda family: family.name)
def test_what_cannot_be_reproduced_is_refused_naming_the_feature(family: Family) -> None:
    if family.before_load:  # the configuration alone shows it: nothing needs to load
        with pytest.raises(UnsupportedModelError, match=family.refused):
            refuse_by_config(family.configuration(), family.name)
        return
    with pytest.raises(UnsupportedModelError, match=family.refused):
        check_fidelity(Executor(family.build()))


def saved(family: Family, tokenizer_dir: Path, folder: Path) -> Path:
    """``family`` as a local model folder with the tiny tokenizer, its vocabulary sized to the tokenizer's."""
    import dataclasses
    import json

    vocab = json.loads((tokenizer_dir / "config.json").read_text())["vocab_size"]
    key = "vocab_size"
    dataclasses.replace(family, changes={**family.changes, key: vocab}).build().save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, folder / name)
    return folder


@pytest.mark.parametrize("name", ["llama-dynamic", "gemma3n-shared-kv"])
def test_a_run_refuses_what_the_configuration_shows_before_the_weights_load(
    name: str, tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import kvcompare.run.passages
    from kvcompare.run.runner import run

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("the weights were loaded")

    monkeypatch.setattr(kvcompare.run.passages, "load_model", never)
    model = saved(BY_NAME[name], tiny_model_dir, tmp_path / "model")
    with pytest.raises(UnsupportedModelError, match=BY_NAME[name].refused):
        run(tiny_run(model), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_layers_that_reuse_another_layers_cache_are_refused_by_the_probe_too() -> None:
    """Where the configuration was not checked (a model built in code, a GGUF file), the probe refuses KV-shared
    layers before any cell: evicting from the producing layer's cache alone gives the sharing layers a cache of
    another size (every policy cell failed with a shape error), and the layers' kinds were 'no RoPE'."""
    with pytest.raises(UnsupportedModelError, match=BY_NAME["gemma3n-shared-kv"].refused):
        check_fidelity(Executor(BY_NAME["gemma3n-shared-kv"].build()))


def test_a_run_refuses_a_model_it_cannot_reproduce_before_any_cell(tiny_model_dir: Path, tmp_path: Path) -> None:
    from kvcompare.run.runner import run

    model = saved(BY_NAME["gpt-j"], tiny_model_dir, tmp_path / "model")
    with pytest.raises(UnsupportedModelError, match="no rotary embedding module"):
        run(tiny_run(model), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_rows_record_each_layers_kind(tmp_path: Path, tiny_model_dir: Path) -> None:
    import json

    import polars as pl

    from kvcompare.run.runner import run

    model = saved(BY_NAME["gemma2"], tiny_model_dir, tmp_path / "model")
    out = run(tiny_run(model, repeats=1), tmp_path / "run", progress=False)
    kinds = json.loads(pl.read_parquet(out / "cells" / "*.parquet")["layer_kinds"][0])
    assert len(kinds) == 4 and kinds[0].startswith(f"sliding window {WINDOW}, soft-cap 1, RoPE")
    assert kinds[1].startswith("full attention, soft-cap 1, RoPE")
    meta = json.loads((out / "run.json").read_text())
    assert (
        meta["model_info"]["fidelity"]["logit_error"] < 1e-5 and meta["model_info"]["fidelity"]["layer_kinds"] == kinds
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", ["llama", "gemma2", "gpt-oss", "cohere", "smollm3", "qwen2-window"])
def test_supported_families_pass_the_probe_in_low_precision(name: str, dtype: torch.dtype) -> None:
    """Rounding in bfloat16/float16 (kvcompare's eager path computes in float32) stays inside the dtype's
    tolerance, so no supported family is refused for its dtype; what the probe records says how close."""
    from kvcompare.engine.fidelity import TOLERANCE

    fidelity = check_fidelity(Executor(BY_NAME[name].build().to(dtype)))
    assert fidelity.logit_error <= TOLERANCE[dtype] and fidelity.key_error <= TOLERANCE[dtype], fidelity
