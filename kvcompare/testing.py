"""Tiny randomly initialised models for tests and device checks: full rotary (Llama) and partial (GPT-NeoX)."""

from __future__ import annotations

from typing import Any

import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM

TINY_VOCAB = 96
_TINY_SHAPES: dict[str, Any] = {
    "vocab_size": TINY_VOCAB,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "max_position_embeddings": 1024,
}


def tiny_llama(**changes: Any) -> LlamaForCausalLM:
    """Full rotary, grouped-query attention (4 query heads share 2 KV heads)."""
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**{**_TINY_SHAPES, "num_key_value_heads": 2, **changes})).eval()


def tiny_neox(**changes: Any) -> GPTNeoXForCausalLM:
    """Partial rotary: only a quarter of each head's channels are rotated."""
    torch.manual_seed(0)
    return GPTNeoXForCausalLM(GPTNeoXConfig(**{**_TINY_SHAPES, "rotary_pct": 0.25, **changes})).eval()
