"""The executor's oracles on a GPU (marked `cuda`, skipped without one), and low-precision re-rotation.

On cuda the same checks as on CPU: a limit at or above the length gives the full cache's logits, a limit is
never exceeded, shift mode puts each kept key at its rank; in float32 and bfloat16. The bfloat16 drift test
runs on CPU too: re-rotating a rotated bfloat16 key at every eviction would ruin StreamingLLM's sinks.
"""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import rotate_half

from kvcompare.config import CacheConfig
from kvcompare.engine.executor import Executor
from kvcompare.plugins import get_registry
from kvcompare.testing import TINY_VOCAB, builtin_policies, tiny_llama, tiny_neox

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, CUDA])]
POLICIES = [*builtin_policies(full=True), "l2:mode=random"]
#: How far the executor's logits may be from one plain forward pass, per dtype (summation order differs).
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 0.1}


def feed(executor: Executor, cache, tokens: torch.Tensor, stride: int) -> torch.Tensor:  # type: ignore[no-untyped-def]
    with executor.attached():
        return torch.cat(
            [
                executor.forward(cache, tokens[s : s + stride].view(1, -1))[0][0]
                for s in range(0, tokens.numel(), stride)
            ]
        )


@pytest.mark.cuda
@CUDA
@pytest.mark.parametrize("model", [tiny_llama, tiny_neox])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("spec", POLICIES)
@pytest.mark.parametrize("positions", ["true", "shift"])
def test_on_cuda_a_limit_at_the_length_gives_the_full_logits_and_a_limit_holds(
    model,
    dtype: torch.dtype,
    spec: str,
    positions: str,  # type: ignore[no-untyped-def]
) -> None:
    device = torch.device("cuda")
    net = model().to(device=device, dtype=dtype).eval()
    tokens = torch.randint(0, TINY_VOCAB, (48,), generator=torch.Generator().manual_seed(1)).to(device)
    net.config._attn_implementation = "sdpa"
    with torch.no_grad():
        expected = net(tokens.view(1, -1)).logits[0].float()
    executor = Executor(net)
    policy = get_registry().build(spec)
    for stride in (1, 7):
        cache = executor.new_cache(policy, CacheConfig(48, stride, positions, (0,)), 48, True)
        got = feed(executor, cache, tokens, stride).float()
        assert (got - expected).abs().max().item() < TOLERANCE[dtype], f"stride {stride}"
    if policy.bounded:
        limited = executor.new_cache(policy, CacheConfig(12, 5, positions, (1,)), 48, True)
        feed(executor, limited, tokens, 5)
        assert limited.lengths()[0] <= 12 and limited.lengths()[1] == 48 and limited.evictions > 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shift_mode_keys_stay_at_their_rank_after_many_moves(device: str, dtype: torch.dtype) -> None:
    """600 tokens one at a time at limit 16: StreamingLLM's sinks move at each of ~580 evictions. Each held
    key of layer 0 (which depends on its token alone) must equal the token's key rotated once, in float32, to
    its rank: within one rounding of ``dtype``. Rotating a rotated bfloat16 key each time is off by more than
    100% by then."""
    model = tiny_llama().to(device=device, dtype=dtype).eval()
    count = 600
    tokens = torch.randint(0, TINY_VOCAB, (count,), generator=torch.Generator().manual_seed(1)).to(device)
    layer = model.model.layers[0]
    with torch.no_grad():
        raw = layer.self_attn.k_proj(layer.input_layernorm(model.model.embed_tokens(tokens))).float()
    raw = raw.view(count, -1, model.config.head_dim).transpose(0, 1)  # [heads, tokens, dim]
    executor = Executor(model)
    cache = executor.new_cache(get_registry().build("streaming"), CacheConfig(16, 1, "shift", ()), capacity=count)
    feed(executor, cache, tokens, 1)
    held = cache.slot_tokens[0, 0]
    rank = torch.where(held >= 0, held, torch.iinfo(torch.long).max).argsort(-1).argsort(-1)
    position = cache.seen - cache.compressed_len + rank
    worst = 0.0
    for head in range(held.shape[0]):
        for slot in held[head].ge(0).nonzero().flatten().tolist():
            key = raw[head, int(held[head, slot])]
            cos, sin = model.model.rotary_emb(
                key.view(1, 1, -1), torch.tensor([[int(position[head, slot])]], device=device)
            )
            expected = key * cos[0, 0].float() + rotate_half(key) * sin[0, 0].float()
            got = cache.compressed_kv[0, 0, 0, head, slot].float()
            worst = max(worst, float((got - expected).norm() / expected.norm()))
    assert cache.evictions > 500
    assert worst < (1e-4 if dtype == torch.float32 else 1e-2), worst
