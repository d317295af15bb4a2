"""Shared fixtures: tiny randomly initialised Llama and GPT-NeoX models, and a plugin registered for one test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM

from kvcompare.plugins import PluginHost, get_host

VOCAB = 96


def tiny_llama() -> LlamaForCausalLM:
    """Full rotary, grouped-query attention (4 query heads share 2 KV heads)."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
    )
    return LlamaForCausalLM(config).eval()


def tiny_neox() -> GPTNeoXForCausalLM:
    """Partial rotary: only a quarter of each head's channels are rotated."""
    torch.manual_seed(0)
    config = GPTNeoXConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        max_position_embeddings=1024,
        rotary_pct=0.25,
    )
    return GPTNeoXForCausalLM(config).eval()


@pytest.fixture(params=["llama", "neox"])
def tiny_model(request: pytest.FixtureRequest) -> torch.nn.Module:
    return tiny_llama() if request.param == "llama" else tiny_neox()


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (48,), generator=torch.Generator().manual_seed(1))


@pytest.fixture
def host() -> PluginHost:
    return get_host()


@pytest.fixture
def register_plugin(host: PluginHost) -> Iterator[object]:
    """Register plugin objects for one test and unregister them after, as users' test suites would."""
    added: list[object] = []

    def register(plugin: object, name: str) -> None:
        host.add(plugin, name)
        added.append(plugin)

    yield register
    for plugin in added:
        if host.pm.is_registered(plugin):
            host.pm.unregister(plugin)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama with a small byte-level BPE tokenizer saved as a local Hugging Face folder."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-llama")
    text = (Path(__file__).parent / "data" / "tiny_corpus.txt").read_text()
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([text], vocab_size=300, min_frequency=1, show_progress=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer)
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder
