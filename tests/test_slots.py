"""Slot reuse: an eviction frees victim slots and moves nothing that stays, with the same results as compaction."""

from __future__ import annotations

import dataclasses
from typing import Literal

import pytest
import torch
from transformers.models.llama.modeling_llama import rotate_half

from kvcompare import KVPolicy, ScoredPolicy
from kvcompare.config import CacheConfig
from kvcompare.engine.attention import chunk_causal_attention
from kvcompare.engine.cache import BoundedKVCache
from kvcompare.engine.eviction import rank_shift
from kvcompare.engine.executor import Executor
from kvcompare.engine.rope import UnsupportedModelError
from kvcompare.plugins import get_registry
from kvcompare.policy import PolicyError
from kvcompare.testing import tiny_llama, tiny_neox


# The built-in policies as they were written for the compacting cache: select() over keys in time order.
@dataclasses.dataclass
class SelectStreaming(KVPolicy):
    name = "select-streaming"
    start_size: int = 4

    def select(self, keys: torch.Tensor, keep: int, positions: torch.Tensor) -> torch.Tensor:
        length, sinks = keys.shape[3], min(self.start_size, keep)
        slots = torch.cat([torch.arange(sinks), torch.arange(length - (keep - sinks), length)])
        return slots.expand(*keys.shape[:3], keep)


@dataclasses.dataclass
class SelectRecent(KVPolicy):
    name = "select-recent"

    def select(self, keys: torch.Tensor, keep: int, positions: torch.Tensor) -> torch.Tensor:
        length = keys.shape[3]
        return torch.arange(length - keep, length).expand(*keys.shape[:3], keep)


@dataclasses.dataclass
class SelectL2(KVPolicy):
    name = "select-l2"
    mode: Literal["keep_low", "keep_high", "random"] = "keep_low"

    def __post_init__(self) -> None:
        self._generator = torch.Generator().manual_seed(0)

    def select(self, keys: torch.Tensor, keep: int, positions: torch.Tensor) -> torch.Tensor:
        if self.mode == "random":
            scores = torch.rand(keys.shape[:4], generator=self._generator)
        else:
            norms = torch.linalg.vector_norm(keys.float(), dim=-1)
            scores = -norms if self.mode == "keep_low" else norms
        # Equal norms (a repeated token's key at layer 0): the older goes first, as the executor breaks ties.
        return scores.sort(dim=-1, stable=True).indices[..., -keep:].sort(dim=-1).values


SAME_AS = {
    "streaming": SelectStreaming(),
    "recent": SelectRecent(),
    "l2": SelectL2(),
    "l2:mode=keep_high": SelectL2("keep_high"),
    "l2:mode=random": SelectL2("random"),
}


def logits_of(executor: Executor, policy: KVPolicy, tokens: torch.Tensor, config: CacheConfig) -> torch.Tensor:
    cache = executor.new_cache(policy, config, capacity=tokens.numel(), check_every_eviction=True)
    with executor.attached():
        chunks = [
            executor.forward(cache, tokens[s : s + config.stride].view(1, -1))[0][0]
            for s in range(0, tokens.numel(), config.stride)
        ]
    assert cache.evictions > 0
    return torch.cat(chunks)


CASES = [
    *[("llama", spec, positions, 1, 1) for spec in SAME_AS for positions in ("true", "shift")],
    *[("llama", spec, positions, 5, 1) for spec in SAME_AS for positions in ("true", "shift")],
    *[("llama", spec, "shift", 1, 4) for spec in ("streaming", "l2")],  # spare slots, filled one step at a time
    *[("neox", spec, "shift", 5, 1) for spec in ("streaming", "l2")],  # partial rotary
]


@pytest.mark.parametrize("model,spec,positions,stride,evict_block", CASES)
def test_scored_policies_give_the_logits_of_their_select_versions(
    tokens: torch.Tensor, model: str, spec: str, positions: str, stride: int, evict_block: int
) -> None:
    """The slots are a permutation of what compaction kept, so the logits agree up to summation order.

    Layer 0 is skipped: there a repeated token has exactly the same key norm, and in shift mode select()
    sees norms of re-rotated keys, whose rounding would break those ties at random.
    """
    executor = Executor(tiny_llama() if model == "llama" else tiny_neox())
    config = CacheConfig(12, stride, positions, (0,), evict_block)
    scored = logits_of(executor, get_registry().build(spec), tokens, config)
    selected = logits_of(executor, SAME_AS[spec], tokens, config)
    torch.testing.assert_close(scored, selected, atol=1e-5, rtol=1e-5)


class SlotWatcher:
    """Snapshots a cache's slots before each chunk, and checks what the chunk's eviction changed."""

    def __init__(self, cache: BoundedKVCache) -> None:
        self.cache = cache
        self.kv = cache.compressed_kv.clone()
        self.token = cache.slot_tokens.clone()
        self.held = cache.compressed_len
        self.evictions = cache.evictions

    def kept(self) -> torch.Tensor:
        """Slots holding the same token as before the chunk: what the eviction kept."""
        return (self.token >= 0) & (self.cache.slot_tokens == self.token)


@pytest.mark.parametrize("spec", ["streaming", "recent", "l2", "l2:mode=random", "select"])
@pytest.mark.parametrize("positions", ["true", "shift"])
@pytest.mark.parametrize("stride,evict_block", [(1, 3), (4, 1)])
def test_an_eviction_moves_no_kept_slot(
    tokens: torch.Tensor, spec: str, positions: str, stride: int, evict_block: int
) -> None:
    executor = Executor(tiny_llama())
    policy = SelectStreaming() if spec == "select" else get_registry().build(spec)
    cache = executor.new_cache(policy, CacheConfig(12, stride, positions, (0,), evict_block), capacity=tokens.numel())
    checked = 0
    with executor.attached():
        for s in range(0, tokens.numel(), stride):
            before = SlotWatcher(cache)
            executor.forward(cache, tokens[s : s + stride].view(1, -1))
            if cache.evictions == before.evictions:
                continue
            checked += 1
            kept = before.kept()
            held_after = cache.compressed_len - stride
            assert bool((kept.sum(-1) == held_after).all())  # every kept token is still in its slot
            values_now, values_then = cache.compressed_kv[1], before.kv[1]
            assert torch.equal(values_now[kept], values_then[kept])
            keys_now, keys_then = cache.compressed_kv[0], before.kv[0]
            moved = (keys_now != keys_then).any(-1) & kept
            if positions == "true":
                assert not bool(moved.any())
            elif spec in ("streaming", "select"):  # shift mode re-rotates only the sinks
                assert bool((cache.slot_tokens[moved] < 4).all()) and bool(moved.any())
    assert checked > 5


@pytest.mark.parametrize("spec", ["streaming:start_size=2", "l2", "l2:mode=random"])
def test_shift_mode_keys_sit_at_their_rank_among_the_held_tokens(tokens: torch.Tensor, spec: str) -> None:
    """Layer 0's keys depend on the token alone, so each held key can be rebuilt independently: the token's
    raw key rotated by transformers' own rotary code at its rank, counted to end just before the next token."""
    model = tiny_llama()
    layer = model.model.layers[0]
    raw = layer.self_attn.k_proj(layer.input_layernorm(model.model.embed_tokens(tokens))).detach()
    raw = raw.view(tokens.numel(), -1, model.config.head_dim).transpose(0, 1).unsqueeze(0)  # [1, heads, T, dim]
    rotary = model.model.rotary_emb
    executor = Executor(model)
    cache = executor.new_cache(get_registry().build(spec), CacheConfig(12, 3, "shift", (), 2), capacity=48)
    with executor.attached():
        for s in range(0, tokens.numel(), 3):
            executor.forward(cache, tokens[s : s + 3].view(1, -1))
            held = cache.slot_tokens[0, 0]  # layer 0: [heads, slots]
            rank = torch.where(held >= 0, held, torch.iinfo(torch.long).max).argsort(-1).argsort(-1)
            position = cache.seen - cache.compressed_len + rank
            for head in range(held.shape[0]):
                for slot in held[head].ge(0).nonzero().flatten().tolist():
                    key = raw[:, head : head + 1, int(held[head, slot]) : int(held[head, slot]) + 1]
                    cos, sin = rotary(key, torch.tensor([[int(position[head, slot])]]))
                    expected = key * cos.unsqueeze(1) + rotate_half(key) * sin.unsqueeze(1)
                    torch.testing.assert_close(
                        cache.compressed_kv[0, 0, 0, head, slot], expected[0, 0, 0], atol=2e-5, rtol=1e-4
                    )
    assert cache.evictions > 5


def test_slots_never_written_hold_zeros_not_uninitialised_memory(tokens: torch.Tensor) -> None:
    """At limit 12 and stride 5 the first eviction comes with slots 10 and 11 never written; they are then
    masked in attention and handed to the policy, where uninitialised NaN would poison the output (0 x NaN)
    or fail the in-place-edit check (NaN != NaN)."""
    executor = Executor(tiny_llama())
    cache = executor.new_cache(get_registry().build("l2:mode=random"), CacheConfig(12, 5, "shift", (1,)), 48)
    assert not bool(cache.compressed_kv.any())
    with executor.attached():
        for s in range(0, tokens.numel(), 5):
            logits, _ = executor.forward(cache, tokens[s : s + 5].view(1, -1))
            assert bool(torch.isfinite(logits).all())


@dataclasses.dataclass
class CountingRecent(ScoredPolicy):
    """Recent-only, recording how many slots each score() call reads."""

    name = "counting"

    def __post_init__(self) -> None:
        self.reads: list[int] = []

    def score(self, keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        self.reads.append(keys.shape[-2])
        return positions.float()

    def scores_at_write(self) -> bool:
        return True


def test_scores_made_at_write_read_each_key_once(tokens: torch.Tensor) -> None:
    executor = Executor(tiny_llama())
    config = CacheConfig(12, 1, "true", ())
    cache = executor.new_cache(CountingRecent(), config, capacity=48)
    with executor.attached():
        for s in range(tokens.numel()):
            executor.forward(cache, tokens[s : s + 1].view(1, 1))
    policy = cache.policy
    assert isinstance(policy, CountingRecent)
    assert policy.reads[0] == 12 and set(policy.reads[1:]) == {1}  # the filled cache once, then each new key
    expected = logits_of(executor, get_registry().build("recent"), tokens, config)
    torch.testing.assert_close(logits_of(executor, CountingRecent(), tokens, config), expected)


@pytest.mark.parametrize("spec,uniform", [("streaming", True), ("recent", True), ("l2", False)])
def test_victims_are_chosen_once_for_all_layers_only_when_all_rank_alike(
    tokens: torch.Tensor, spec: str, uniform: bool
) -> None:
    executor = Executor(tiny_llama())
    cache = executor.new_cache(get_registry().build(spec), CacheConfig(12, 1, "shift", ()), capacity=48)
    with executor.attached():
        for s in range(tokens.numel()):
            executor.forward(cache, tokens[s : s + 1].view(1, 1))
    assert cache.victims.uniform is uniform
    assert torch.equal(cache.slot_tokens, cache.slot_tokens[:1, :1, :1].expand_as(cache.slot_tokens)) is uniform


@dataclasses.dataclass
class BadScores(ScoredPolicy):
    name = "bad-scores"
    how: str = "shape"

    def score(self, keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if self.how == "shape":
            return positions.float()[..., 1:]
        if self.how == "integer":
            return positions
        if self.how == "nan":
            return positions.float() * float("nan")
        keys.mul_(0.5)  # edits the cache in place
        return positions.float()


@pytest.mark.parametrize(
    "how,message",
    [("shape", "shape"), ("integer", "floating"), ("nan", "NaN"), ("edit", "changed the keys")],
)
def test_bad_scores_name_the_policy_and_plugin(tokens: torch.Tensor, how: str, message: str) -> None:
    executor = Executor(tiny_llama())
    cache = executor.new_cache(BadScores(how).bound_to("odd-plugin"), CacheConfig(8, 4, "true", ()), capacity=48)
    with executor.attached(), pytest.raises(PolicyError, match=message) as info:
        for s in range(0, tokens.numel(), 4):
            executor.forward(cache, tokens[s : s + 4].view(1, -1))
    assert "policy 'bad-scores" in str(info.value) and "odd-plugin" in str(info.value)


def test_rank_shift_moves_each_kept_token_by_the_evicted_tokens_newer_than_it() -> None:
    tokens = torch.tensor([[[0, 1, 9, 2, 3, -1, 10, 11]], [[5, 0, 1, 2, 3, 4, 6, 7]]])
    freed = torch.tensor([[[3, 4, 5]], [[3, 4, 7]]])  # tokens 2, 3 and an empty slot; tokens 2, 3 and 7
    rows, moves = rank_shift(tokens, freed)
    moved = torch.zeros(tokens.numel(), dtype=torch.long).index_add_(0, rows, moves).view(tokens.shape)
    assert moved.tolist() == [[[2, 2, 0, 0, 0, 0, 0, 0]], [[1, 3, 3, 0, 0, 1, 1, 0]]]
    full = torch.tensor([[[0, 1, 9, 2, 3, 12, 10, 11]]])
    rows, moves = rank_shift(full, torch.tensor([[[4]]]))  # one victim (token 3): the older ones move by 1
    assert sorted(rows.tolist()) == [0, 1, 3] and moves == 1


def test_attention_outside_a_forward_pass_is_refused() -> None:
    # A model whose layers drop the keyword arguments (StableLM) still finds the forward pass's cache
    # (tests/test_families.py); called outside any forward pass of the executor there is none.
    module = torch.nn.Module()
    module.layer_idx = 0  # type: ignore[assignment]
    q = torch.randn(1, 2, 3, 4)
    with pytest.raises(UnsupportedModelError, match="outside kvcompare's forward pass"):
        chunk_causal_attention(module, q, q, q, None)
