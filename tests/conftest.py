"""Shared fixtures: tiny randomly initialised Llama and GPT-NeoX models, and a plugin registered for one test.

``KVCOMPARE_TEST_COMPILE=1 python -m pytest`` runs the whole suite with compiled decode steps (--compile): every
executor compiles its one-token steps with torch.compile's ``eager`` backend (dynamo traces the same whole-graph
step as inductor compiles, in about a second), so every test that decodes checks the compiled step too.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from kvcompare.logs import NORMAL, configure
from kvcompare.plugins import PluginHost, get_host
from kvcompare.testing import TINY_VOCAB, tiny_llama, tiny_neox

#: The suite's mode: compiled decode steps in every executor (KVCOMPARE_TEST_COMPILE=1), or eager (default).
COMPILED_STEPS = os.environ.get("KVCOMPARE_TEST_COMPILE") == "1"


@pytest.fixture(autouse=True)
def decode_steps_of_the_suites_mode(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """In the compiled mode, every executor built in the test compiles its decode steps, from a fresh compiler (no
    earlier test's graphs count against torch's recompile limit)."""
    if not COMPILED_STEPS:
        yield
        return
    from kvcompare.engine import compiled
    from kvcompare.engine.executor import Executor

    built = Executor.__init__

    def compiling(self: Executor, *args: object, **kwargs: object) -> None:
        built(self, *args, **kwargs)  # type: ignore[arg-type]
        self.compile_decode_steps()

    monkeypatch.setattr(compiled, "DEFAULT_BACKEND", "eager")
    monkeypatch.setattr(Executor, "__init__", compiling)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(autouse=True)
def messages_as_the_cli_shows_them() -> None:
    """Every test sees kvcompare's messages as `kvcompare run` shows them by default, whatever ran before."""
    configure(NORMAL)


@pytest.fixture(params=["llama", "neox"])
def tiny_model(request: pytest.FixtureRequest) -> torch.nn.Module:
    return tiny_llama() if request.param == "llama" else tiny_neox()


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(0, TINY_VOCAB, (48,), generator=torch.Generator().manual_seed(1))


@pytest.fixture
def host() -> PluginHost:
    return get_host()


@contextlib.contextmanager
def plugins_registered(host: PluginHost) -> Iterator[Callable[[object, str], None]]:
    """Register plugin objects inside the block and unregister them (and forget their failures) after it."""
    added: list[tuple[object, str]] = []

    def register(plugin: object, name: str) -> None:
        host.add(plugin, name)
        added.append((plugin, name))

    try:
        yield register
    finally:
        for plugin, name in added:
            if host.pm.is_registered(plugin):
                host.pm.unregister(plugin)
            host.failures[:] = [f for f in host.failures if f.name != name]


@pytest.fixture
def register_plugin(host: PluginHost) -> Iterator[Callable[[object, str], None]]:
    """Register plugin objects for one test and unregister them after, as users' test suites would."""
    with plugins_registered(host) as register:
        yield register


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
