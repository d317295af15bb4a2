"""Tiny randomly initialised models of many families and RoPE variants, built from transformers' config classes
(no download), for the model-fidelity matrix (tests/test_families.py).

Windows and soft-caps are small, so that a 32-token probe feels them: a tiny model whose window were ignored
would still pass on short text.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import transformers

SHAPES: dict[str, Any] = {
    "vocab_size": 96,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
}
WINDOW = 8  # sliding windows of the local layers, in tokens


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    config: str  # transformers config class
    model: str  # transformers causal LM class
    changes: dict[str, Any] = dataclasses.field(default_factory=dict)
    shapes: bool = True  # start from SHAPES
    refused: str = ""  # what the refusal must name ("" for a supported family)
    before_load: bool = False  # refused from the configuration alone

    def build(self) -> torch.nn.Module:
        torch.manual_seed(0)
        config = getattr(transformers, self.config)(**{**(SHAPES if self.shapes else {}), **self.changes})
        return getattr(transformers, self.model)(config).eval()

    def configuration(self) -> Any:
        return getattr(transformers, self.config)(**{**(SHAPES if self.shapes else {}), **self.changes})


def rope(kind: str, **params: Any) -> dict[str, Any]:
    return {"rope_parameters": {"rope_type": kind, "rope_theta": 10000.0, **params}}


FAMILIES = [
    Family("llama", "LlamaConfig", "LlamaForCausalLM"),
    Family("llama-linear", "LlamaConfig", "LlamaForCausalLM", rope("linear", factor=2.0)),
    Family(
        "llama-llama3",
        "LlamaConfig",
        "LlamaForCausalLM",
        rope("llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64),
    ),
    Family(
        "llama-yarn", "LlamaConfig", "LlamaForCausalLM", rope("yarn", factor=4.0, original_max_position_embeddings=64)
    ),
    Family("mistral-window", "MistralConfig", "MistralForCausalLM", {"sliding_window": WINDOW}),
    Family("mixtral", "MixtralConfig", "MixtralForCausalLM", {"num_local_experts": 2, "num_experts_per_tok": 1}),
    Family("qwen2", "Qwen2Config", "Qwen2ForCausalLM"),
    Family(
        "qwen2-window",
        "Qwen2Config",
        "Qwen2ForCausalLM",
        {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 2},
    ),
    Family("qwen3", "Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),
    Family("gemma", "GemmaConfig", "GemmaForCausalLM", {"head_dim": 16}),
    Family(
        "gemma2",
        "Gemma2Config",
        "Gemma2ForCausalLM",
        {
            "head_dim": 16,
            "sliding_window": WINDOW,
            "attn_logit_softcapping": 1.0,
            "final_logit_softcapping": 5.0,
            "initializer_range": 0.3,  # logits large enough for the soft-cap to change them
        },
    ),
    Family(
        "gemma3",
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        {"head_dim": 16, "sliding_window": WINDOW, "sliding_window_pattern": 2},
    ),
    Family("phi3", "Phi3Config", "Phi3ForCausalLM", {"pad_token_id": 0}),
    Family("phi", "PhiConfig", "PhiForCausalLM", {"partial_rotary_factor": 0.5}),
    Family("gpt-neox", "GPTNeoXConfig", "GPTNeoXForCausalLM", {"rotary_pct": 0.25, "num_key_value_heads": None}),
    Family("stablelm", "StableLmConfig", "StableLmForCausalLM"),
    Family("olmo2", "Olmo2Config", "Olmo2ForCausalLM"),
    Family("cohere", "CohereConfig", "CohereForCausalLM"),
    Family("granite", "GraniteConfig", "GraniteForCausalLM"),
    Family(
        "smollm3",
        "SmolLM3Config",
        "SmolLM3ForCausalLM",
        {"no_rope_layer_interval": 2, "pad_token_id": 0, "bos_token_id": None, "eos_token_id": None},
    ),
    Family(
        "gpt-oss",
        "GptOssConfig",
        "GptOssForCausalLM",
        {"head_dim": 16, "sliding_window": WINDOW, "num_local_experts": 2, "num_experts_per_tok": 1},
    ),
    Family("starcoder2", "Starcoder2Config", "Starcoder2ForCausalLM", {"sliding_window": WINDOW}),
    Family("olmo", "OlmoConfig", "OlmoForCausalLM"),
    Family("glm", "GlmConfig", "GlmForCausalLM", {"head_dim": 16, "pad_token_id": 0, "eos_token_id": None}),
    # Refused: what kvcompare cannot reproduce exactly.
    Family(
        "falcon",
        "FalconConfig",
        "FalconForCausalLM",
        {"new_decoder_architecture": True, "num_kv_heads": 2, "num_key_value_heads": None},
        refused="computes attention in its own code",
    ),
    Family(
        "llama-dynamic",
        "LlamaConfig",
        "LlamaForCausalLM",
        rope("dynamic", factor=2.0),
        refused="dynamic RoPE",
        before_load=True,
    ),
    Family(
        "phi3-longrope",
        "Phi3Config",
        "Phi3ForCausalLM",
        {
            "pad_token_id": 0,
            "original_max_position_embeddings": 64,
            "rope_parameters": {
                "rope_type": "longrope",
                "rope_theta": 10000.0,
                "short_factor": [1.0] * 8,
                "long_factor": [2.0] * 8,
            },
        },
        refused="longrope RoPE",
        before_load=True,
    ),
    Family(
        "gpt-j",
        "GPTJConfig",
        "GPTJForCausalLM",
        {"vocab_size": 96, "n_embd": 64, "n_layer": 2, "n_head": 4, "rotary_dim": 8, "n_positions": 1024},
        shapes=False,
        refused="no rotary embedding module",
    ),
    Family(
        "gpt2",
        "GPT2Config",
        "GPT2LMHeadModel",
        {"vocab_size": 96, "n_embd": 64, "n_layer": 2, "n_head": 4},
        shapes=False,
        refused="no rotary embedding module",
    ),
    Family(
        "bloom",
        "BloomConfig",
        "BloomForCausalLM",
        {"vocab_size": 96, "hidden_size": 64, "n_layer": 2, "n_head": 4},
        shapes=False,
        refused="no rotary embedding module",
    ),
    Family(
        "gemma3n-shared-kv",
        "Gemma3nTextConfig",
        "Gemma3nForCausalLM",
        {
            "head_dim": 16,
            "sliding_window": WINDOW,
            "layer_types": ["sliding_attention", "full_attention"] * 2,
            "num_kv_shared_layers": 2,  # layers 2 and 3 attend to layers 0's and 1's keys and values
            "vocab_size_per_layer_input": 96,
            "hidden_size_per_layer_input": 8,
            "laurel_rank": 4,
            "altup_num_inputs": 2,
        },
        refused="layers 2-3 reuse the keys and values of an earlier layer",
        before_load=True,
    ),
    Family(
        "falcon-alibi",
        "FalconConfig",
        "FalconForCausalLM",
        {"alibi": True, "num_key_value_heads": None},
        refused="ALiBi",
        before_load=True,
    ),
]
SUPPORTED = [f for f in FAMILIES if not f.refused]
REFUSED = [f for f in FAMILIES if f.refused]
BY_NAME = {f.name: f for f in FAMILIES}
