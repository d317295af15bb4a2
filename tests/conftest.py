"""Shared fixtures: tiny randomly initialised Llama and GPT-NeoX models, and a plugin registered for one test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from kvcompare.plugins import PluginHost, get_host
from kvcompare.testing import TINY_VOCAB, tiny_llama, tiny_neox


@pytest.fixture(params=["llama", "neox"])
def tiny_model(request: pytest.FixtureRequest) -> torch.nn.Module:
    return tiny_llama() if request.param == "llama" else tiny_neox()


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(0, TINY_VOCAB, (48,), generator=torch.Generator().manual_seed(1))


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
    tiny_llama(vocab_size=tokenizer.vocab_size, max_position_embeddings=4096).save_pretrained(folder)
    return folder
