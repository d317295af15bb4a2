"""The prefill setting (compress once after the context, as kvpress, SnapKV and PyramidKV) against references.

A reference runs the whole context through the model in one forward pass, with its own attention function
(registered through transformers' AttentionInterface, attention computed by hand head by head) that captures each
layer's post-RoPE queries, keys and values; it then applies each policy's published rule plainly, per layer and KV
head (kvpress's StreamingLLMPress, KnormPress, KeyDiffPress, SnapKVPress and TOVAPress, the SnapKV repository, H2O's
real-drop ``H2OKVCache_LayerWise``). None of kvcompare's code computes a reference.

A freshly initialised model attends almost uniformly, which would let the attention rules be decided by position
alone, so each model is also run with its query and key projections scaled up (``-sharp``: peaked attention).

It proves that kvcompare, prefilling the same context in one pass or in chunks, in either position mode, and then
compressing once, keeps in every compressed layer exactly its budget and exactly the reference's tokens, on a GQA
and a non-GQA model, for uniform and pyramid budgets; that the kept keys and values are the reference's (in shift
mode rotated to consecutive positions ending before the next token) and the tokens fed after the compression (a
decode step, a chunk, a teacher-forced quality pass) get the logits of a hand-made attention over them; that a
budget at or above the context changes no score; that the latency pass reports the compressed cache's bytes and
time; and that a third-party select() policy keeps what it selects.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterator
from typing import ClassVar

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_slots import SelectRecent
from transformers import AttentionInterface, LlamaForCausalLM

from kvcompare import KVPolicy
from kvcompare.config import CacheConfig
from kvcompare.engine.budgets import compressed_layer_budgets
from kvcompare.engine.cache import BoundedKVCache
from kvcompare.engine.executor import Executor
from kvcompare.plugins import get_registry
from kvcompare.testing import TINY_VOCAB, tiny_llama

CONTEXT = 45  # chunks of 8 end with 5 tokens, chunks of 4 with one
CHUNKS = (CONTEXT, 8, 4)
SKIP = (0,)
LAYERS = 4  # tiny_llama's
BUDGETS = (6, 13, 36)
POSITIONS = ("true", "shift")
#: tiny_llama(): 4 query heads share 2 KV heads; num_key_value_heads=4: one each; -sharp: peaked attention.
KINDS = ("gqa", "mha", "gqa-sharp", "mha-sharp")
SHARPEN = 8.0
REFERENCE_ATTENTION = "prefill-compression-reference"


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Tensors this small gain nothing from a second thread, and on a busy two-core machine its spin-waits make
    the passes about ten times slower; the thread count is restored after this module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- the models and the text -------------------------------------------------------------------------------------


@functools.cache
def model_of(kind: str, dtype: torch.dtype = torch.float64) -> LlamaForCausalLM:
    """float64 by default: kvcompare's scores differ from the reference's only far below float32's ulp, at which
    both compare them, so a near tie cannot flip a kept token. A freshly initialised model attends almost uniformly
    (the last query's largest weight is about 1/n), so the attention-based rules would be decided by position alone:
    the ``-sharp`` kinds scale the query and key projections by :data:`SHARPEN` (largest weight about 0.4)."""
    model = tiny_llama() if kind.startswith("gqa") else tiny_llama(num_key_value_heads=4)
    if kind.endswith("-sharp"):
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.q_proj.weight.mul_(SHARPEN)
                layer.self_attn.k_proj.weight.mul_(SHARPEN)
    return model.to(dtype)  # type: ignore[arg-type]


@functools.cache
def text() -> torch.Tensor:
    """Seeded random tokens: the context, then a few to feed after it."""
    return torch.randint(0, TINY_VOCAB, (CONTEXT + 11,), generator=torch.Generator().manual_seed(11))


def context() -> torch.Tensor:
    return text()[:CONTEXT]


# -- the reference: one forward pass, attention by hand ----------------------------------------------------------


@dataclasses.dataclass
class Capture:
    """What the reference pass saw, per model layer, for its one sequence (the batch of one dropped)."""

    queries: dict[int, torch.Tensor]  # [heads, n, head_dim], post-RoPE
    keys: dict[int, torch.Tensor]  # [kv_heads, n, head_dim], post-RoPE (after ``past``, when given)
    values: dict[int, torch.Tensor]  # [kv_heads, n, head_dim]
    logits: torch.Tensor  # [q, vocab]

    @property
    def length(self) -> int:
        return self.keys[0].shape[1]


class ReferenceAttention:
    """Causal attention written out per query head (query head h reads KV head h // group, as repeat_kv). With
    ``past`` (model layer -> (keys, values), each ``[kv_heads, m, head_dim]``) the chunk's keys and values come after
    those, and its queries see all of them: the chunk continues a given cache."""

    def __init__(self, past: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None) -> None:
        self.past = past or {}
        self.queries: dict[int, torch.Tensor] = {}
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}

    def __call__(
        self,
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        *args: object,
        scaling: float | None = None,
        **kwargs: object,
    ) -> tuple[torch.Tensor, None]:
        layer = int(module.layer_idx)  # type: ignore[arg-type]
        keys, values = key[0], value[0]
        if layer in self.past:
            keys = torch.cat([self.past[layer][0], keys], dim=1)
            values = torch.cat([self.past[layer][1], values], dim=1)
        self.queries[layer], self.keys[layer], self.values[layer] = query[0], keys, values
        heads, q_len, dim = query.shape[1:]
        kv_len, group = keys.shape[1], heads // keys.shape[0]
        scale = scaling if scaling is not None else 1 / math.sqrt(dim)
        # Query i (the chunk's last is the newest token) sees key j iff j <= kv_len - q_len + i.
        visible = torch.ones(q_len, kv_len, dtype=torch.bool).tril(diagonal=kv_len - q_len)
        out = torch.empty_like(query[0])
        for h in range(heads):
            logits = (query[0, h] @ keys[h // group].T) * scale
            out[h] = logits.masked_fill(~visible, float("-inf")).softmax(dim=-1) @ values[h // group]
        return out.transpose(0, 1).unsqueeze(0), None


def run_reference(
    model: LlamaForCausalLM,
    ids: torch.Tensor,
    start: int = 0,
    past: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> Capture:
    """Run ``ids`` (``[n]``, at positions ``start..``) through ``model`` with :class:`ReferenceAttention`."""
    attention = ReferenceAttention(past)
    AttentionInterface.register(REFERENCE_ATTENTION, attention)
    config = model.config
    previous = config._attn_implementation
    config._attn_implementation = REFERENCE_ATTENTION
    try:
        with torch.inference_mode():
            positions = torch.arange(start, start + ids.numel()).view(1, -1)
            out = model(input_ids=ids.view(1, -1), position_ids=positions, use_cache=False)
    finally:
        config._attn_implementation = previous
    return Capture(attention.queries, attention.keys, attention.values, out.logits[0])


@functools.cache
def captured(kind: str) -> Capture:
    return run_reference(model_of(kind), context())


def causal_weights(capture: Capture, layer: int, head: int, rows: range, dtype: torch.dtype) -> torch.Tensor:
    """Query head ``head``'s attention weights (``[len(rows), n]``) from the context queries ``rows`` over every
    context key, causally: softmax of q.k / sqrt(head_dim), in ``dtype``."""
    queries, keys = capture.queries[layer], capture.keys[layer]
    group = queries.shape[0] // keys.shape[0]
    q = queries[head, rows.start : rows.stop].to(dtype)
    k = keys[head // group].to(dtype)
    logits = (q @ k.T) / math.sqrt(q.shape[-1])
    visible = torch.arange(k.shape[0]).view(1, -1) <= torch.tensor(list(rows)).view(-1, 1)
    return logits.masked_fill(~visible, float("-inf")).softmax(dim=-1)


def group_heads(capture: Capture, layer: int, kv: int) -> range:
    group = capture.queries[layer].shape[0] // capture.keys[layer].shape[0]
    return range(kv * group, (kv + 1) * group)


def top(scores: torch.Tensor, count: int) -> set[int]:
    """The ``count`` highest ``scores`` (token i's is ``scores[i]``) compared as float32, equal ones the newest
    first: the rule kvcompare documents for ties (random weights make them unlikely)."""
    rounded = scores.float().tolist()
    return set(sorted(range(len(rounded)), key=lambda t: (rounded[t], t), reverse=True)[: max(count, 0)])


#: A policy's rule: (capture, model layer, KV head, the layer's budget) -> the context tokens that head keeps.
Rule = Callable[[Capture, int, int, int], set[int]]


def streaming_rule(sinks: int) -> Rule:
    """StreamingLLMPress: the first ``n_sink`` tokens and the most recent ``budget - n_sink``."""

    def rule(capture: Capture, layer: int, kv: int, budget: int) -> set[int]:
        n = capture.length
        return set(range(sinks)) | set(range(n - (budget - sinks), n))

    return rule


def recent_rule(capture: Capture, layer: int, kv: int, budget: int) -> set[int]:
    return set(range(capture.length - budget, capture.length))


def knorm_rule(keep_high: bool) -> Rule:
    """KnormPress (Devoto et al.): score = -||key||, so the lowest-norm keys stay (keep_high: the highest)."""

    def rule(capture: Capture, layer: int, kv: int, budget: int) -> set[int]:
        norms = capture.keys[layer][kv].norm(dim=-1)
        return top(norms if keep_high else -norms, budget)

    return rule


def keydiff_rule(capture: Capture, layer: int, kv: int, budget: int) -> set[int]:
    """KeyDiffPress: anchor = mean of the normalised keys; score = -cosine(key, anchor)."""
    keys = capture.keys[layer][kv]
    anchor = F.normalize(keys, p=2, dim=-1).mean(dim=0, keepdim=True)
    return top(-F.cosine_similarity(keys, anchor, dim=-1), budget)


def snapkv_rule(window: int, kernel: int) -> Rule:
    """SnapKVPress / SnapKV: the last ``window`` queries' float32 attention on the older tokens, averaged over the
    window, average-pooled (zero padding counted), averaged over the KV head's query heads; the window stays."""

    def rule(capture: Capture, layer: int, kv: int, budget: int) -> set[int]:
        n, half = capture.length, kernel // 2
        pooled_by_head = []
        for head in group_heads(capture, layer, kv):
            weights = causal_weights(capture, layer, head, range(n - window, n), torch.float32)
            votes = weights[:, : n - window].mean(dim=0).tolist()
            padded = [0.0] * half + votes + [0.0] * half
            pooled_by_head.append([sum(padded[i : i + kernel]) / kernel for i in range(n - window)])
        scores = torch.tensor(pooled_by_head, dtype=torch.float32).mean(dim=0)
        return top(scores, budget - window) | set(range(n - window, n))

    return rule


def tova_rule(per_head: bool) -> Rule:
    """TOVAPress: the last query's attention (softmax over every key, itself included), averaged over all the
    layer's query heads (per_head: summed over the KV head's group); the last token always stays."""

    def rule(capture: Capture, layer: int, kv: int, budget: int) -> set[int]:
        n = capture.length
        heads = group_heads(capture, layer, kv) if per_head else range(capture.queries[layer].shape[0])
        weights = [causal_weights(capture, layer, h, range(n - 1, n), torch.float64)[0] for h in heads]
        scores = torch.stack(weights).sum(dim=0) if per_head else torch.stack(weights).mean(dim=0)
        return top(scores[: n - 1], budget - 1) | {n - 1}

    return rule


def h2o_rule(recent_ratio: float) -> Rule:
    """H2O's real-drop cache: a token's score is the attention every query gave it (the columns of the causal
    attention summed; GQA: over the KV head's query heads); the newest ``int(budget * recent_ratio)`` are the recent
    window, the rest of the budget the highest scores among the older tokens."""

    def rule(capture: Capture, layer: int, kv: int, budget: int) -> set[int]:
        n, recent = capture.length, int(budget * recent_ratio)
        accumulated = torch.zeros(n, dtype=torch.float64)
        for head in group_heads(capture, layer, kv):
            accumulated += causal_weights(capture, layer, head, range(n), torch.float64).sum(dim=0)
        return top(accumulated[: n - recent], budget - recent) | set(range(n - recent, n))

    return rule


RULES: dict[str, Rule] = {
    "streaming": streaming_rule(4),
    "recent": recent_rule,
    "l2": knorm_rule(keep_high=False),
    "l2:mode=keep_high": knorm_rule(keep_high=True),
    "keydiff": keydiff_rule,
    "snapkv": snapkv_rule(32, 5),  # kvcompare's defaults
    "snapkv:window=4:kernel=3": snapkv_rule(4, 3),
    "snapkv:window=8:kernel=5": snapkv_rule(8, 5),
    "tova": tova_rule(per_head=False),
    "tova:per_head=true": tova_rule(per_head=True),
    "h2o": h2o_rule(0.5),
    "h2o:recent_ratio=0.2": h2o_rule(0.2),
}
WINDOWS = {"snapkv": 32, "snapkv:window=4:kernel=3": 4, "snapkv:window=8:kernel=5": 8}


def expected_kept(kind: str, spec: str, budgets: list[int]) -> list[list[set[int]]]:
    """Per compressed layer (model layer n + 1) and KV head, the tokens the reference keeps."""
    capture = captured(kind)
    kv_heads = capture.keys[0].shape[0]
    return [[RULES[spec](capture, n + 1, kv, budget) for kv in range(kv_heads)] for n, budget in enumerate(budgets)]


# -- kvcompare's side ------------------------------------------------------------------------------------------


def prefilled(kind: str, policy: KVPolicy, config: CacheConfig, chunk: int, extra: int = 0) -> BoundedKVCache:
    """kvcompare's cache after prefilling the context in chunks of ``chunk`` and compressing once."""
    executor = Executor(model_of(kind))
    cache = executor.new_cache(policy, config, capacity=CONTEXT + extra)
    with executor.attached():
        executor.prefill(cache, context().view(1, -1), chunk)
    assert cache.compress()
    return cache


def kept_tokens(cache: BoundedKVCache) -> list[list[set[int]]]:
    """Per compressed layer and KV head, the tokens held, checked to be in ascending (time) order."""
    lengths = cache.lengths()
    kept = []
    for n in range(cache.slot_tokens.shape[0]):
        rows = cache.slot_tokens[n, 0, :, : lengths[n + 1]]
        assert bool((rows.diff(dim=-1) > 0).all()), f"layer {n + 1}: kept tokens not ascending"
        kept.append([set(row.tolist()) for row in rows])
    return kept


def prefill_config(budget: int | None, chunk: int, positions: str, **changes: object) -> CacheConfig:
    """The prefill setting's cache config (``budget`` None: no limit, the ``full`` baseline's), skipping layer 0."""
    return CacheConfig(budget, chunk, positions, SKIP, compression="prefill", **changes)  # type: ignore[arg-type]


ORACLE_CASES = [(spec, budget) for spec in RULES for budget in BUDGETS if budget > WINDOWS.get(spec, 0)]
#: Chunks of 4 (a final chunk of one token; SnapKV's window spans chunks) on the peaked models only, for time.
ORACLE_RUNS = [(kind, chunk) for kind in KINDS for chunk in CHUNKS if chunk != 4 or kind.endswith("-sharp")]


@pytest.mark.parametrize("positions", POSITIONS)
@pytest.mark.parametrize("kind,chunk", ORACLE_RUNS)
@pytest.mark.parametrize("spec,budget", ORACLE_CASES)
def test_each_layer_and_head_keeps_exactly_the_reference_tokens(
    spec: str, budget: int, kind: str, chunk: int, positions: str
) -> None:
    cache = prefilled(kind, get_registry().build(spec), prefill_config(budget, chunk, positions), chunk)
    assert cache.lengths() == {0: CONTEXT, 1: budget, 2: budget, 3: budget}
    expected = expected_kept(kind, spec, [budget] * (LAYERS - 1))
    for n, (fast, slow) in enumerate(zip(kept_tokens(cache), expected, strict=True)):
        assert fast == slow, f"layer {n + 1}"


def test_the_reference_attention_is_the_model_s() -> None:
    """The hand-written attention gives the model's own logits, so the later layers' captures are right."""
    for kind in KINDS:
        model = model_of(kind)
        with torch.inference_mode():
            own = model(input_ids=context().view(1, -1)).logits[0]
        torch.testing.assert_close(captured(kind).logits, own, rtol=1e-10, atol=1e-10)
        executor = Executor(model)
        cache = executor.new_cache(get_registry().build("full"), prefill_config(None, 8, "true"), CONTEXT)
        with executor.attached():
            last = executor.prefill(cache, context().view(1, -1), 8)
        assert not cache.compress()  # full never compresses
        torch.testing.assert_close(last[0], own[-1], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("spec", ["streaming", "l2", "snapkv:window=4:kernel=3", "tova", "h2o", "keydiff"])
@pytest.mark.parametrize("kind", KINDS)
def test_kept_sets_do_not_depend_on_the_position_mode(spec: str, kind: str) -> None:
    kept = {
        positions: kept_tokens(prefilled(kind, get_registry().build(spec), prefill_config(13, 8, positions), 8))
        for positions in POSITIONS
    }
    assert kept["true"] == kept["shift"]


# -- what the compressed cache holds, and what the model computes over it -----------------------------------------


def rope_shift(keys: torch.Tensor, by: torch.Tensor, theta: float) -> torch.Tensor:
    """Keys (``[n, head_dim]``, Llama's rotate-half RoPE) moved by ``by`` (``[n]``) positions: RoPE is a rotation,
    so a key rotated at position t and rotated again by d is the key at t + d."""
    dim = keys.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angles = by.to(torch.float64).view(-1, 1) * inv_freq.view(1, -1)
    cos, sin = torch.cat([angles.cos(), angles.cos()], dim=-1), torch.cat([angles.sin(), angles.sin()], dim=-1)
    first, second = keys[..., : dim // 2], keys[..., dim // 2 :]
    return keys * cos + torch.cat([-second, first], dim=-1) * sin


def reference_past(
    kind: str, spec: str, budgets: list[int], positions: str
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """The reference's cache after the compression, per model layer ``(keys, values)``, each ``[kv_heads, n,
    head_dim]``: the skip layer's whole context, and each compressed layer's kept tokens per KV head in time order;
    in shift mode the keys are rotated so that rank r of a layer's b kept tokens sits at position CONTEXT - b + r."""
    capture = captured(kind)
    theta = float(model_of(kind).config.rope_parameters["rope_theta"])  # type: ignore[index, arg-type]
    past = {0: (capture.keys[0], capture.values[0])}
    for n, (heads, budget) in enumerate(zip(expected_kept(kind, spec, budgets), budgets, strict=True)):
        layer, keys, values = n + 1, [], []
        for kv, tokens in enumerate(heads):
            kept = torch.tensor(sorted(tokens))
            key = capture.keys[layer][kv, kept]
            if positions == "shift":
                key = rope_shift(key, CONTEXT - budget + torch.arange(budget) - kept, theta)
            keys.append(key)
            values.append(capture.values[layer][kv, kept])
        past[layer] = (torch.stack(keys), torch.stack(values))
    return past


def tolerance(positions: str) -> tuple[float, float]:
    """Shift mode re-rotates with float32 angles, as the model's own RoPE computes them: a key moved by d positions
    agrees with the exact float64 rotation to about d * 1e-7 of its norm, not to 1e-15."""
    return (1e-9, 1e-9) if positions == "true" else (1e-5, 1e-5)  # rtol, atol


@pytest.mark.parametrize("layer_budget", ["uniform", "pyramid"])
@pytest.mark.parametrize("positions", POSITIONS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("spec", ["streaming", "l2", "snapkv:window=4:kernel=3", "h2o", "tova:per_head=true"])
def test_the_tokens_after_compression_attend_exactly_the_kept_keys_at_their_positions(
    spec: str, kind: str, positions: str, layer_budget: str
) -> None:
    """The kept keys and values are the reference's, in time order: in true mode at their own positions, in shift
    mode rotated to consecutive positions ending just before the next token. A decode step and then a chunk fed
    after the compression get the logits of the reference's attention over exactly those (and over the whole
    context in the skip layer)."""
    model = model_of(kind)
    config = prefill_config(13 if layer_budget == "uniform" else 16, 8, positions, layer_budget=layer_budget, reserve=4)
    budgets = compressed_layer_budgets(config, LAYERS)
    cache = prefilled(kind, get_registry().build(spec), config, 8, extra=4)
    past = reference_past(kind, spec, budgets, positions)
    rtol, atol = tolerance(positions)
    for n, budget in enumerate(budgets):
        torch.testing.assert_close(cache.compressed_kv[0, n, 0, :, :budget], past[n + 1][0], rtol=rtol, atol=atol)
        torch.testing.assert_close(cache.compressed_kv[1, n, 0, :, :budget], past[n + 1][1], rtol=rtol, atol=atol)
    after = text()[CONTEXT : CONTEXT + 4]
    executor = Executor(model)
    with executor.attached():
        step, _ = executor.forward(cache, after[:1].view(1, -1))
        chunk, _ = executor.forward(cache, after[1:].view(1, -1))
    assert cache.lengths() == {0: CONTEXT + 4, **{n + 1: budget + 4 for n, budget in enumerate(budgets)}}
    reference = run_reference(model, after, start=CONTEXT, past=past)
    torch.testing.assert_close(torch.cat([step[0], chunk[0]]), reference.logits, rtol=rtol, atol=atol)


@pytest.mark.parametrize("positions", POSITIONS)
@pytest.mark.parametrize("kind", ["gqa-sharp", "mha"])
@pytest.mark.parametrize("spec", ["streaming", "keydiff", "snapkv:window=8:kernel=5", "tova", "h2o"])
def test_a_quality_pass_scores_the_continuation_over_the_kept_tokens(spec: str, kind: str, positions: str) -> None:
    """``score(..., context=K)``: the context's tokens are scored over the whole context, the rest over the
    reference's kept tokens (teacher-forced, in chunks that do not end at the context's end)."""
    model = model_of(kind)
    config = prefill_config(13, 7, positions)
    result = Executor(model).score(text(), get_registry().build(spec), config, context=CONTEXT)
    past = reference_past(kind, spec, [13] * (LAYERS - 1), positions)
    continuation = run_reference(model, text()[CONTEXT:-1], start=CONTEXT, past=past)
    logits = torch.cat([captured(kind).logits, continuation.logits])  # row i predicts token i + 1
    nll = -logits.log_softmax(dim=-1).gather(1, text()[1:].view(-1, 1)).squeeze(1)
    np.testing.assert_allclose(result.nll, nll.numpy(), rtol=1e-5, atol=1e-5)  # kvcompare's NLL is float32


def test_shift_mode_differs_from_true_mode_only_through_positions() -> None:
    """recent keeps the newest tokens, already consecutive before the next: no key moves, so both modes give the
    same logits after the compression; streaming's sinks move in shift mode, so the logits differ there."""
    logits: dict[tuple[str, str], torch.Tensor] = {}
    for spec in ("recent", "streaming"):
        for positions in POSITIONS:
            cache = prefilled("gqa", get_registry().build(spec), prefill_config(13, 8, positions), 8, extra=3)
            executor = Executor(model_of("gqa"))
            with executor.attached():
                logits[spec, positions] = executor.forward(cache, text()[CONTEXT : CONTEXT + 3].view(1, -1))[0]
    assert torch.equal(logits["recent", "true"], logits["recent", "shift"])
    assert not torch.allclose(logits["streaming", "true"], logits["streaming", "shift"], rtol=1e-6, atol=1e-6)


# -- per-layer budgets ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("positions", POSITIONS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("spec", ["streaming", "l2", "keydiff", "snapkv:window=4:kernel=3", "tova", "h2o"])
def test_a_pyramid_gives_each_layer_its_own_budget_and_the_reference_s_tokens(
    spec: str, kind: str, positions: str
) -> None:
    config = prefill_config(16, 8, positions, layer_budget="pyramid", reserve=4)
    budgets = compressed_layer_budgets(config, LAYERS)
    assert len(set(budgets)) == LAYERS - 1 and sum(budgets) == 16 * (LAYERS - 1) and max(budgets) < CONTEXT
    cache = prefilled(kind, get_registry().build(spec), config, 8)
    assert cache.lengths() == {0: CONTEXT, **{n + 1: budget for n, budget in enumerate(budgets)}}
    assert kept_tokens(cache) == expected_kept(kind, spec, budgets)


# -- a budget at or above the context ------------------------------------------------------------------------------

BOUNDED = [spec for spec in RULES if spec != "snapkv"] + ["snapkv:window=32"]


@functools.cache
def full_nll(kind: str, positions: str) -> np.ndarray:
    executor = Executor(model_of(kind, torch.float32))
    return executor.score(text(), get_registry().build("full"), prefill_config(None, 8, positions), context=CONTEXT).nll


@pytest.mark.parametrize("limit", [CONTEXT, CONTEXT + 7])
@pytest.mark.parametrize("positions", POSITIONS)
@pytest.mark.parametrize("kind", KINDS[:2])
@pytest.mark.parametrize("spec", BOUNDED)
def test_a_budget_at_or_above_the_context_scores_as_the_full_cache(
    spec: str, kind: str, positions: str, limit: int
) -> None:
    """Nothing is dropped, so every token's NLL is full's, bit for bit (float32, as runs are)."""
    executor = Executor(model_of(kind, torch.float32))
    result = executor.score(text(), get_registry().build(spec), prefill_config(limit, 8, positions), context=CONTEXT)
    assert result.nll.shape == (text().numel() - 1,)
    np.testing.assert_array_equal(result.nll, full_nll(kind, positions))


def test_compression_happens_once_and_the_cache_grows_after() -> None:
    executor = Executor(model_of("gqa"))
    cache = prefilled("gqa", get_registry().build("l2"), prefill_config(13, 8, "shift"), 8, extra=6)
    before = (cache.slot_tokens.clone(), cache.compressed_kv.clone())
    assert not cache.compress()  # the one compression is done
    assert torch.equal(cache.slot_tokens, before[0]) and torch.equal(cache.compressed_kv, before[1])
    with executor.attached():
        for start in range(CONTEXT, CONTEXT + 6, 3):
            executor.forward(cache, text()[start : start + 3].view(1, -1))
    assert cache.lengths() == {0: CONTEXT + 6, 1: 19, 2: 19, 3: 19}
    for n in range(LAYERS - 1):  # the kept tokens stay, the new ones follow them in time order
        assert torch.equal(cache.slot_tokens[n, 0, :, :13], before[0][n, 0, :, :13])
        assert cache.slot_tokens[n, 0, :, 13:19].tolist() == [list(range(CONTEXT, CONTEXT + 6))] * 2


# -- the latency pass --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["streaming", "l2", "snapkv:window=4:kernel=3", "tova", "h2o"])
def test_generate_reports_the_compressed_bytes_and_the_compression_time(spec: str) -> None:
    model = model_of("gqa", torch.float32)
    config = model.config
    assert config.num_key_value_heads is not None
    per_token = 2 * config.num_key_value_heads * (config.hidden_size // config.num_attention_heads) * 4  # K and V
    executor = Executor(model)
    budget = 13
    result = executor.generate(context(), get_registry().build(spec), prefill_config(budget, 8, "true"), 4, 1)
    assert result.kv_bytes_compressed is not None
    assert result.kv_bytes_compressed == per_token * (CONTEXT + (LAYERS - 1) * budget)  # skip layer 0 keeps all
    assert result.peak_kv_bytes == per_token * LAYERS * CONTEXT  # the whole prefilled context, before compression
    assert result.kv_bytes_compressed < result.peak_kv_bytes
    assert result.compress_s is not None and 0 < result.compress_s <= result.ttft_s
    assert len(result.generated) == 1 + 1 + 4  # the first token, then warm-up and counted steps
    whole = executor.generate(context(), get_registry().build(spec), prefill_config(CONTEXT, 8, "true"), 4, 1)
    assert whole.kv_bytes_compressed == per_token * LAYERS * CONTEXT  # a budget of the context keeps it all
    full = executor.generate(context(), get_registry().build("full"), prefill_config(None, 8, "true"), 4, 1)
    assert whole.generated == full.generated and full.kv_bytes_compressed is None  # full never compresses


# -- select() policies ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class SelectFirstChannel(KVPolicy):
    """A third-party select() policy whose choice differs by layer and head: the keys with the largest first
    channel. Records what it was given."""

    name = "prefill-select-channel"
    given: ClassVar[list[tuple[tuple[int, ...], int, torch.Tensor]]] = []

    def select(self, keys: torch.Tensor, keep: int, positions: torch.Tensor) -> torch.Tensor:
        self.given.append((tuple(keys.shape), keep, positions.clone()))
        return keys[..., 0].topk(keep, dim=-1).indices.sort(dim=-1).values


@pytest.mark.parametrize("layer_budget", ["uniform", "pyramid"])
@pytest.mark.parametrize("kind", KINDS)
def test_a_select_policy_keeps_what_it_selects(kind: str, layer_budget: str) -> None:
    config = prefill_config(16, 8, "shift", layer_budget=layer_budget, reserve=4)
    budgets = compressed_layer_budgets(config, LAYERS)
    capture = captured(kind)
    kv_heads = capture.keys[0].shape[0]

    cache = prefilled(kind, SelectRecent(), config, 8)
    recent = [[recent_rule(capture, n + 1, kv, budget) for kv in range(kv_heads)] for n, budget in enumerate(budgets)]
    assert kept_tokens(cache) == recent

    SelectFirstChannel.given.clear()
    cache = prefilled(kind, SelectFirstChannel(), config, 8)
    channel = [
        [top(capture.keys[n + 1][kv, :, 0], budget) for kv in range(kv_heads)] for n, budget in enumerate(budgets)
    ]
    assert kept_tokens(cache) == channel
    # select() was given every context token in time order: all layers at once for one budget, else one at a time.
    calls = [(shape[0], keep) for shape, keep, _ in SelectFirstChannel.given]
    assert calls == ([(LAYERS - 1, 16)] if layer_budget == "uniform" else [(1, budget) for budget in budgets])
    for shape, _, positions in SelectFirstChannel.given:
        assert shape[1:] == (1, kv_heads, CONTEXT, capture.keys[0].shape[-1])
        assert torch.equal(positions, torch.arange(CONTEXT).expand_as(positions))
