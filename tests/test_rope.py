"""Shift mode's re-rotation: moving a key from position p to q equals rotating its raw key at q."""

from __future__ import annotations

import pytest
import torch

from kvcompare.engine.executor import Executor
from kvcompare.engine.rope import UnsupportedModelError, find_rotary


def hf_rotate(model: torch.nn.Module, raw: torch.Tensor, position: int) -> torch.Tensor:
    """Rotate with the model's own rotary embedding and apply_rotary_pos_emb."""
    rotary_emb = model.base_model.rotary_emb
    module = __import__(type(model).__module__, fromlist=["apply_rotary_pos_emb"])
    cos, sin = rotary_emb(raw, torch.full((1, raw.shape[2]), position))
    _, rotated = module.apply_rotary_pos_emb(raw, raw, cos, sin)
    return rotated


@pytest.mark.parametrize("p,q", [(0, 5), (37, 3), (900, 1000), (5, 5)])
def test_rerotation_equals_rotating_the_raw_key(tiny_model: torch.nn.Module, p: int, q: int) -> None:
    head_dim = tiny_model.config.hidden_size // tiny_model.config.num_attention_heads
    raw = torch.randn(1, 2, 3, head_dim, generator=torch.Generator().manual_seed(p))
    rotary = find_rotary(tiny_model)
    moved = hf_rotate(tiny_model, raw, p)
    rotary.rotate_rows_(moved.view(-1, head_dim), torch.arange(6), q - p)
    torch.testing.assert_close(moved, hf_rotate(tiny_model, raw, q), atol=1e-5, rtol=1e-5)


def test_rerotation_with_mixed_deltas_moves_each_slot_by_its_own(tiny_model: torch.nn.Module) -> None:
    head_dim = tiny_model.config.hidden_size // tiny_model.config.num_attention_heads
    raw = torch.randn(1, 2, 5, head_dim, generator=torch.Generator().manual_seed(3))
    start, delta = [0, 10, 11, 40, 41], [0, 3, 3, 0, 7]  # zeros inside and at the edges
    keys = torch.cat([hf_rotate(tiny_model, raw[:, :, i : i + 1], p) for i, p in enumerate(start)], dim=2)
    moves = torch.tensor(delta).expand(1, 2, 5).flatten()
    rows = moves.nonzero().flatten()  # only the keys that move are given; the others must stay as they are
    find_rotary(tiny_model).rotate_rows_(keys.view(-1, head_dim), rows, moves[rows])
    expected = torch.cat(
        [hf_rotate(tiny_model, raw[:, :, i : i + 1], p + d) for i, (p, d) in enumerate(zip(start, delta, strict=True))],
        2,
    )
    torch.testing.assert_close(keys, expected, atol=1e-5, rtol=1e-5)


def test_partial_rotary_leaves_the_other_channels_alone(tiny_model: torch.nn.Module) -> None:
    rotary = find_rotary(tiny_model)
    head_dim = tiny_model.config.hidden_size // tiny_model.config.num_attention_heads
    x = torch.randn(2, 4, head_dim)
    out = x.clone()
    rotary.rotate_rows_(out.view(-1, head_dim), torch.arange(8), 7)
    assert torch.equal(out[..., rotary.rotary_dim :], x[..., rotary.rotary_dim :])
    assert not torch.equal(out[..., : rotary.rotary_dim], x[..., : rotary.rotary_dim])
    expected_dim = head_dim if "Llama" in type(tiny_model).__name__ else head_dim // 4
    assert rotary.rotary_dim == expected_dim


def test_model_without_rope_is_refused() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(UnsupportedModelError, match="no rotary embedding module"):
        Executor(model)


def test_a_cache_moves_each_layers_keys_with_that_layers_rotary() -> None:
    """Local and global frequencies (Gemma-3) and layers without RoPE (SmolLM3) in one cache: each compressed
    layer's keys move by its own rotary, and a NoPE layer's never move."""
    from kvcompare.config import CacheConfig
    from kvcompare.engine.cache import BoundedKVCache
    from kvcompare.engine.rope import Rotary
    from kvcompare.engine.storage import CacheLayout
    from kvcompare.plugins import get_registry

    local = Rotary(1.0 / (10.0 ** (torch.arange(0, 8, 2) / 8)), 8)
    global_ = Rotary(1.0 / (1e4 ** (torch.arange(0, 8, 2) / 8)), 8, interleaved=True)
    per_layer = (local, None, global_, local, None)  # layer 0 is a skip layer
    layout = CacheLayout(num_layers=5, kv_heads=2, head_dim=8, dtype=torch.float32, device=torch.device("cpu"))
    cache = BoundedKVCache(
        layout, get_registry().build("recent"), CacheConfig(8, 2, "shift", (0,)), capacity=16, rotary=per_layer
    )
    cache.compressed_kv.normal_(generator=torch.Generator().manual_seed(0))
    before = cache.compressed_kv[0].clone()
    per = cache.slot_tokens[0].numel()
    rows = torch.arange(4 * per)  # every row of the four compressed layers
    moves = torch.arange(4 * per) % 3
    cache._rerotate(rows, moves)
    for n, rotary in enumerate(per_layer[1:]):
        expected = before[n].clone()
        if rotary is not None:
            flat = expected.view(-1, 8)
            rotary.rotate_rows_(flat, torch.arange(per), moves[n * per : (n + 1) * per])
        torch.testing.assert_close(cache.compressed_kv[0, n], expected, msg=lambda m, n=n: f"compressed layer {n}: {m}")
