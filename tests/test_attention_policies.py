"""Policies that read attention (h2o, tova, snapkv) and keys (keydiff), against naive references.

Each reference runs the model one token at a time over a plain time-ordered cache that deletes what it
evicts, computes attention by hand in its own attention function, and applies the policy's paper rule with
loops. The fast path (slots, signals collected inside kvcompare's attention) must keep exactly the same
tokens in every layer and head after every step.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import polars as pl
import pytest
import torch
import torch.nn.functional as F
from runs import tiny_run
from test_slots import SelectRecent
from transformers import AttentionInterface

from kvcompare.config import CacheConfig, ConfigError
from kvcompare.engine.budgets import layer_budgets, parse_layer_budget
from kvcompare.engine.executor import Executor
from kvcompare.engine.recorder import SignalRecorder
from kvcompare.plugins import get_registry
from kvcompare.run.runner import run
from kvcompare.testing import TINY_VOCAB, builtin_policies, tiny_llama

LIMIT = 10
SKIP = (0,)

Score = Callable[["Reference", int, int, list[int]], list[float]]


class ReferenceCache:
    """Per layer, keys and values in time order (``[1, kv_heads, n, dim]``) and each head's token indices."""

    def __init__(self) -> None:
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.tokens: dict[int, list[list[int]]] = {}
        self.seen = 0

    def update(
        self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if layer_idx not in self.keys:
            self.keys[layer_idx], self.values[layer_idx] = key, value
            self.tokens[layer_idx] = [[self.seen] for _ in range(key.shape[1])]
        else:
            self.keys[layer_idx] = torch.cat([self.keys[layer_idx], key], dim=2)
            self.values[layer_idx] = torch.cat([self.values[layer_idx], value], dim=2)
            for held in self.tokens[layer_idx]:
                held.append(self.seen)
        return self.keys[layer_idx], self.values[layer_idx]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen


class Reference:
    """Token-by-token decoding with hand-made attention and eviction, recording what each policy reads."""

    def __init__(self, model: torch.nn.Module, score: Score) -> None:
        self.model = model
        self.score = score
        self.cache = ReferenceCache()
        self.accumulated: dict[tuple[int, int, int], float] = {}  # (layer, kv head, token) -> attention so far
        self.last: dict[tuple[int, int, int], float] = {}  # (layer, kv head, token) -> last query's attention
        self.queries: dict[int, list[tuple[int, torch.Tensor]]] = {}  # layer -> [(token, [heads, dim])]
        self.scaling = 0.0

    def attention(
        self,
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        *args: object,
        scaling: float | None = None,
        **kwargs: object,
    ) -> tuple[torch.Tensor, None]:  # noqa: E501
        layer = module.layer_idx  # type: ignore[attr-defined]
        heads, kv_heads = query.shape[1], key.shape[1]
        group = heads // kv_heads
        self.scaling = scaling or 1 / math.sqrt(query.shape[-1])
        out = torch.empty_like(query)
        token = self.cache.seen
        for h in range(heads):
            kv = h // group
            weights = torch.softmax((key[0, kv] @ query[0, h, 0]) * self.scaling, dim=0)
            out[0, h, 0] = weights @ value[0, kv]
            for i, t in enumerate(self.cache.tokens[layer][kv]):
                if h % group == 0:
                    self.last[(layer, kv, t)] = 0.0
                self.accumulated[(layer, kv, t)] = self.accumulated.get((layer, kv, t), 0.0) + float(weights[i])
                self.last[(layer, kv, t)] += float(weights[i])
        self.queries.setdefault(layer, []).append((token, query[0, :, 0].clone()))
        return out.transpose(1, 2), None

    @torch.inference_mode()
    def step(self, token: int) -> None:
        config = self.model.config
        previous = config._attn_implementation
        AttentionInterface.register("kvcompare-reference", self.attention)
        config._attn_implementation = "kvcompare-reference"
        try:
            self.model(
                input_ids=torch.tensor([[token]]), position_ids=torch.tensor([[self.cache.seen]]), cache=self.cache
            )
        finally:
            config._attn_implementation = previous
        self.cache.seen += 1

    def evict_all(self) -> None:
        """Before a token that would overflow the limit: each compressed layer and head drops its lowest score."""
        for layer in sorted(self.cache.keys):
            if layer in SKIP:
                continue
            kv_heads = self.cache.keys[layer].shape[1]
            victims = []
            for kv in range(kv_heads):
                held = self.cache.tokens[layer][kv]
                scores = self.score(self, layer, kv, held)
                # Scores compare as float32, equal ones oldest first: the executor's documented rule.
                rounded = [float(torch.tensor(s, dtype=torch.float32)) for s in scores]
                victims.append(min(zip(rounded, held, strict=True))[1])
            for store in (self.cache.keys, self.cache.values):
                rows = []
                for kv in range(kv_heads):
                    keep = [i for i, t in enumerate(self.cache.tokens[layer][kv]) if t != victims[kv]]
                    rows.append(store[layer][:, kv, keep])
                store[layer] = torch.stack(rows, dim=1)
            for kv in range(kv_heads):
                self.cache.tokens[layer][kv].remove(victims[kv])

    def held(self, layer: int) -> list[set[int]]:
        return [set(h) for h in self.cache.tokens[layer]]


# -- each policy's rule, written plainly from its paper ----------------------------------------------------
def h2o_score(ratio: float) -> Score:
    def score(ref: Reference, layer: int, kv: int, held: list[int]) -> list[float]:
        protected = int(LIMIT * ratio) - 1  # the window counts the incoming token
        newest = ref.cache.seen - protected
        return [math.inf if t >= newest else ref.accumulated[(layer, kv, t)] for t in held]

    return score


def tova_score(per_head: bool) -> Score:
    def score(ref: Reference, layer: int, kv: int, held: list[int]) -> list[float]:
        if per_head:
            return [ref.last[(layer, kv, t)] for t in held]
        kv_heads = len(ref.cache.tokens[layer])
        return [sum(ref.last[(layer, h, t)] for h in range(kv_heads)) / kv_heads for t in held]

    return score


def snapkv_score(window: int, kernel: int) -> Score:
    def score(ref: Reference, layer: int, kv: int, held: list[int]) -> list[float]:
        keys = ref.cache.keys[layer][0, kv]  # [held, dim], time order
        heads = ref.queries[layer][-1][1].shape[0]
        group = heads // len(ref.cache.tokens[layer])
        votes = [0.0] * len(held)
        for token, query in ref.queries[layer][-window:]:
            for h in range(kv * group, (kv + 1) * group):
                seen = [i for i, t in enumerate(held) if t <= token]
                weights = torch.softmax(keys[seen] @ query[h] * ref.scaling, dim=0)
                for i, w in zip(seen, weights.tolist(), strict=True):
                    votes[i] += w
        first_window = ref.cache.seen - window
        votes = [0.0 if t >= first_window else v for v, t in zip(votes, held, strict=True)]
        half = kernel // 2
        padded = [0.0] * half + votes + [0.0] * half
        pooled = [sum(padded[i : i + kernel]) / kernel for i in range(len(votes))]
        return [math.inf if t >= first_window else p for p, t in zip(pooled, held, strict=True)]

    return score


def keydiff_score(ref: Reference, layer: int, kv: int, held: list[int]) -> list[float]:
    keys = ref.cache.keys[layer][0, kv].float()
    directions = [k / k.norm() for k in keys]
    anchor = sum(directions) / len(directions)
    return [-float(F.cosine_similarity(d, anchor, dim=0)) for d in directions]


REFERENCES: dict[str, Score] = {
    "h2o": h2o_score(0.5),
    "h2o:recent_ratio=0.2": h2o_score(0.2),
    "tova": tova_score(False),
    "tova:per_head=true": tova_score(True),
    "snapkv:window=4:kernel=3": snapkv_score(4, 3),
    "snapkv:window=3:kernel=1": snapkv_score(3, 1),
    "keydiff": keydiff_score,
}


@pytest.mark.parametrize("spec", sorted(REFERENCES))
def test_fast_path_keeps_the_tokens_of_a_naive_reference(spec: str) -> None:
    torch.manual_seed(0)
    model = tiny_llama().double()  # float64: scores differ from the reference's only far below float32's ulp
    tokens = torch.randint(0, TINY_VOCAB, (40,), generator=torch.Generator().manual_seed(3)).tolist()
    reference = Reference(model, REFERENCES[spec])
    executor = Executor(model)
    cache = executor.new_cache(get_registry().build(spec), CacheConfig(LIMIT, 1, "true", SKIP), len(tokens), True)
    with executor.attached():
        for step, token in enumerate(tokens):
            if step >= LIMIT:
                reference.evict_all()
            reference.step(token)
            executor.forward(cache, torch.tensor([[token]]))
            for layer in range(1, model.config.num_hidden_layers):
                fast = [set(row[row >= 0].tolist()) for row in cache.slot_tokens[layer - 1, 0]]
                assert fast == reference.held(layer), f"step {step}, layer {layer}"
    assert cache.evictions == len(tokens) - LIMIT


@pytest.mark.parametrize("spec", builtin_policies(signals=True))
def test_an_eviction_reads_only_chunks_already_attended(spec: str) -> None:
    """Two texts equal up to token 20: the scores of every eviction before token 20 agree, whatever follows."""
    model = tiny_llama()
    first = torch.randint(0, TINY_VOCAB, (40,), generator=torch.Generator().manual_seed(4))
    second = first.clone()
    second[20:] = (second[20:] + 7) % TINY_VOCAB
    executor = Executor(model)
    scores: list[dict[int, torch.Tensor]] = []
    for text in (first, second):
        cache = executor.new_cache(get_registry().build(spec), CacheConfig(12, 5, "true", ()), 40)
        policy, made = cache.policy, {}

        def score(*args: object, policy=policy, made=made, cache=cache) -> torch.Tensor:  # type: ignore[no-untyped-def]
            made[cache.seen] = type(policy).score(policy, *args)  # keyed by the first token of the coming chunk
            return made[cache.seen]

        policy.score = score  # type: ignore[method-assign]
        with executor.attached():
            for start in range(0, 40, 5):
                executor.forward(cache, text[start : start + 5].view(1, -1))
        scores.append(made)
    assert sorted(scores[0]) == [10, 15, 20, 25, 30, 35]
    assert all(torch.equal(scores[0][s], scores[1][s]) for s in (10, 15, 20))  # made before token 20 was attended
    assert not any(torch.equal(scores[0][s], scores[1][s]) for s in (25, 30, 35))  # the change is seen after


@pytest.mark.parametrize("spec", builtin_policies(signals=False))
def test_a_keys_only_policy_collects_no_signal(spec: str, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("signals collected for a policy that reads none")

    monkeypatch.setattr(SignalRecorder, "observe", refuse)
    executor = Executor(tiny_llama())
    tokens = torch.randint(0, TINY_VOCAB, (30,), generator=torch.Generator().manual_seed(5))
    result = executor.score(tokens, get_registry().build(spec), CacheConfig(10, 3, "shift", ()))
    assert result.max_cached <= 10


def test_signal_time_is_counted_only_for_policies_that_read_signals() -> None:
    executor = Executor(tiny_llama())
    prompt = torch.randint(0, TINY_VOCAB, (20,), generator=torch.Generator().manual_seed(6))
    config = CacheConfig(12, 4, "true", ())
    h2o = executor.generate(prompt, get_registry().build("h2o"), config, gen=4, warmup=1)
    l2 = executor.generate(prompt, get_registry().build("l2"), config, gen=4, warmup=1)
    assert len(h2o.signal_s) == 4 and all(s > 0 for s in h2o.signal_s)
    assert l2.signal_s == [0.0] * 4


def test_a_policy_that_reads_signals_must_score_at_eviction_time() -> None:
    from kvcompare import Needs, ScoredPolicy
    from kvcompare.policy import PolicyError

    class Confused(ScoredPolicy):
        name = "confused"

        def needs(self) -> Needs:
            return Needs(attention=True)

        def scores_at_write(self) -> bool:
            return True

    executor = Executor(tiny_llama())
    with pytest.raises(PolicyError, match="scores_at_write"):
        executor.new_cache(Confused(), CacheConfig(8, 2, "true", ()), 16)


# -- per-layer budgets -------------------------------------------------------------------------------------
def test_pyramid_budgets_fall_with_depth_and_sum_to_the_uniform_total() -> None:
    for limit, layers, reserve, beta in [(512, 28, 64, 20.0), (256, 30, 64, 2.0), (100, 7, 5, 5.0), (64, 2, 8, 1.0)]:
        budgets = layer_budgets(f"pyramid:beta={beta}", limit, layers, reserve)
        assert sum(budgets) == limit * layers
        assert budgets == sorted(budgets, reverse=True) and min(budgets) >= reserve
        if beta > 1:
            assert budgets[0] > limit > budgets[-1]
    assert layer_budgets("uniform", 512, 28, 64) == [512] * 28
    assert layer_budgets("pyramid:beta=1", 100, 4, 10) == [100] * 4  # beta 1: no slope


@pytest.mark.parametrize("spec", ["pyramid:beta=0.5", "pyramids", "pyramid:gamma=2", "uniform:beta=2"])
def test_bad_layer_budgets_say_what_is_allowed(spec: str) -> None:
    with pytest.raises(ConfigError, match=r"use uniform, pyramid, pyramid:beta=B \(B >= 1\)"):
        parse_layer_budget(spec)


@pytest.mark.parametrize("spec", ["streaming", "l2", "h2o", "snapkv:window=4", "keydiff"])
@pytest.mark.parametrize("positions", ["true", "shift"])
def test_pyramid_holds_each_layer_to_its_budget_and_the_same_bytes_as_uniform(spec: str, positions: str) -> None:
    executor = Executor(tiny_llama())
    tokens = torch.randint(0, TINY_VOCAB, (60,), generator=torch.Generator().manual_seed(7))
    config = CacheConfig(16, 3, positions, (0,), layer_budget="pyramid:beta=4")
    cache = executor.new_cache(get_registry().build(spec), config, tokens.numel(), True)
    budgets = cache.budgets
    assert len(budgets) == 3 and budgets[0] > budgets[-1] and sum(budgets) == 16 * 3
    peak = 0
    with executor.attached():
        for start in range(0, tokens.numel(), 3):
            executor.forward(cache, tokens[start : start + 3].view(1, -1))
            lengths = cache.lengths()
            assert all(lengths[layer + 1] <= budget for layer, budget in enumerate(budgets))
            held = (cache.slot_tokens >= 0).sum(dim=-1)[:, 0, 0].tolist()
            assert held == [lengths[layer + 1] for layer in range(3)]
            peak = max(peak, cache.live_bytes())
    uniform = executor.new_cache(get_registry().build(spec), CacheConfig(16, 3, positions, (0,)), tokens.numel())
    with executor.attached():
        for start in range(0, tokens.numel(), 3):
            executor.forward(uniform, tokens[start : start + 3].view(1, -1))
    assert cache.peak_kv_bytes == uniform.peak_kv_bytes == peak  # both full at the end: the same bytes held


def test_pyramid_with_every_budget_above_the_length_gives_full_logits() -> None:
    executor = Executor(tiny_llama())
    tokens = torch.randint(0, TINY_VOCAB, (30,), generator=torch.Generator().manual_seed(8))
    full = executor.score(tokens, get_registry().build("full"), CacheConfig(None, 5))
    config = CacheConfig(200, 5, "shift", (0,), layer_budget="pyramid:beta=2")
    for spec in ["h2o", "tova", "streaming", "l2"]:
        got = executor.score(tokens, get_registry().build(spec), config)
        assert abs(got.nll - full.nll).max() < 1e-5


def test_a_run_records_the_layer_budgets_and_the_signal_time(tiny_model_dir: Path, tmp_path: Path) -> None:
    config = tiny_run(tiny_model_dir, policies=["h2o", "streaming"], cache_sizes=[24], layer_budget="pyramid:beta=2")
    run(config, tmp_path / "run", progress=False)
    rows = {r["policy"]: r for r in pl.read_parquet(tmp_path / "run" / "cells" / "*.parquet").to_dicts()}
    assert {r["status"] for r in rows.values()} == {"ok"}
    assert {r["layer_budget"] for r in rows.values()} == {"pyramid:beta=2"}
    budgets = json.loads(rows["h2o"]["layer_budgets"])
    assert rows["full"]["layer_budgets"] is None and sum(budgets) == 24 * len(budgets) and budgets[0] > budgets[-1]
    assert rows["h2o"]["signal_s"] > 0 and rows["streaming"]["signal_s"] == 0 and rows["h2o"]["signal_share"] > 0


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"layer_budget": "pyramid:beta=0"}, r"use uniform, pyramid, pyramid:beta=B \(B >= 1\)"),
        ({"layer_budget": "pyramid:beta=1000", "cache_sizes": [12]}, "leaves the top layer no token to keep"),
    ],
)
def test_a_bad_layer_budget_is_refused_before_measuring(
    tiny_model_dir: Path, tmp_path: Path, changes: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        run(tiny_run(tiny_model_dir, **changes), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("positions", ["true", "shift"])
def test_a_select_policy_works_under_uneven_budgets(positions: str) -> None:
    """select() is called layer by layer when layers hold different counts; it must match its scored twin."""
    executor = Executor(tiny_llama())
    tokens = torch.randint(0, TINY_VOCAB, (60,), generator=torch.Generator().manual_seed(9))
    config = CacheConfig(16, 3, positions, (0,), layer_budget="pyramid:beta=4")
    scored = executor.score(tokens, get_registry().build("recent"), config)
    selected = executor.score(tokens, SelectRecent(), config)
    assert scored.max_cached > 16 and abs(scored.nll - selected.nll).max() < 1e-5
