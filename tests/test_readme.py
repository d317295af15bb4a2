"""The README and the code agree: the protocol, the first two commands, the plugin example."""

import sys
import types
from collections.abc import Callable
from pathlib import Path

import torch

from kvcompare.config import CacheConfig
from kvcompare.executor import Executor
from kvcompare.plugins import PluginHost
from kvcompare.protocol import PROTOCOL_MD
from kvcompare.testing import tiny_llama

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_states_the_protocol_the_reports_state() -> None:
    assert PROTOCOL_MD in README.read_text()


def test_readme_opens_with_the_two_commands() -> None:
    lines = README.read_text().splitlines()
    assert "kvcompare run" in lines[3] and "python -m pytest" in lines[4]


def test_readme_policy_example_registers_and_runs(
    register_plugin: Callable[[object, str], None], host: PluginHost, tokens: torch.Tensor
) -> None:
    text = README.read_text()
    section = text[text.index("## Writing a policy plugin") :]
    code = section[section.index("```python") + len("```python") : section.index("```\n", section.index("```python"))]
    module = types.ModuleType("readme_example")
    sys.modules[module.__name__] = module
    try:
        exec(code, module.__dict__)
        register_plugin(module, "readme-example")
        policy = host.registry().build("oldest:margin=2")
        executor = Executor(tiny_llama())
        cache = executor.new_cache(policy, CacheConfig(16, 4, "shift", ()), capacity=tokens.numel())
        with executor.attached():
            for start in range(0, tokens.numel(), 4):
                executor.forward(cache, tokens[start : start + 4].view(1, -1))
    finally:
        del sys.modules[module.__name__]
    held = sorted(set(cache.c_token[cache.c_token >= 0].tolist()))
    assert held == [*range(12), *range(tokens.numel() - 4, tokens.numel())]  # the oldest, and the last chunk
