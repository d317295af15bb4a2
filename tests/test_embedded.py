"""Slow tests on the embedded SmolLM2 model (fetched once with pip into the cache)."""

from __future__ import annotations

import pytest
import torch

from kvcompare.config import CacheConfig
from kvcompare.engine.executor import Executor
from kvcompare.plugins import get_registry

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm():  # type: ignore[no-untyped-def]
    from kvcompare.models import load_model

    return load_model("smollm2-135m")


def test_embedded_model_is_the_expected_architecture(smollm) -> None:  # type: ignore[no-untyped-def]
    info = smollm.info
    assert (info["architecture"], info["num_layers"], info["num_heads"], info["kv_heads"]) == (
        "LlamaForCausalLM",
        30,
        9,
        3,
    )
    assert info["max_position_embeddings"] == 8192
    from kvcompare.models import layer_count

    assert layer_count("smollm2-135m") == info["num_layers"]  # from the GGUF metadata, before the weights load


def test_embedded_model_executor_matches_plain_forward_and_respects_the_limit(smollm) -> None:  # type: ignore[no-untyped-def]
    text = (
        "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
        "must be in want of a wife. " * 12
    )
    tokens = torch.tensor(smollm.encode(text)[:256])
    executor = Executor(smollm.model)
    registry = get_registry()
    full = executor.score(tokens, registry.build("full"), CacheConfig(None, 32))
    limited = executor.score(tokens, registry.build("streaming"), CacheConfig(256, 32))
    assert abs(full.nll.mean() - limited.nll.mean()) < 1e-5  # a limit at the length changes nothing
    smollm.model.config._attn_implementation = "sdpa"
    with torch.no_grad():
        logp = torch.log_softmax(smollm.model(tokens.view(1, -1)).logits[0, :-1].float(), -1)
    expected = -logp.gather(1, tokens[1:].view(-1, 1)).mean()
    assert abs(full.nll.mean() - float(expected)) < 1e-4
    small = executor.score(tokens, registry.build("streaming"), CacheConfig(64, 16))
    assert small.max_cached <= 64
    assert full.nll.mean() < 3.0  # the real weights predict repeated text well; random weights would be ~10.8


def test_embedded_model_retrieves_the_passkey_with_a_full_cache_and_loses_it_under_recent(smollm) -> None:  # type: ignore[no-untyped-def]
    from kvcompare_plugins.passkey import build_prompt
    from runs import retrieve

    executor = Executor(smollm.model)
    registry = get_registry()
    probe = build_prompt(smollm.encode, 512, 0.3, "68305")
    full = retrieve(executor, probe, registry.build("full"), CacheConfig(None, 64), 64)
    assert full.correct and full.logprob > -3  # the key, with high probability
    recent = retrieve(executor, probe, registry.build("recent"), CacheConfig(128, 64), 64)
    assert not recent.correct  # the needle left a 128-token window long before the question


def test_kvcompare_reproduces_the_embedded_model(smollm) -> None:  # type: ignore[no-untyped-def]
    from kvcompare.engine.fidelity import check_fidelity

    executor = Executor(smollm.model)
    fidelity = check_fidelity(executor)
    assert fidelity.logit_error < 1e-4 and fidelity.key_error < 1e-4, fidelity
    assert all(kind.startswith("full attention, RoPE (64 channels, halves") for kind in fidelity.layer_kinds)
    assert len(fidelity.layer_kinds) == 30
