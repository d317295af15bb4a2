"""The README and the code agree: the protocol, the first two commands, the plugin example."""

import sys
import types
from collections.abc import Callable
from pathlib import Path

import torch

from kvcompare.config import CacheConfig
from kvcompare.engine.executor import Executor
from kvcompare.plugins import PluginHost
from kvcompare.protocol import PROTOCOL_MD
from kvcompare.testing import tiny_llama

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_states_the_protocol_the_reports_state() -> None:
    assert PROTOCOL_MD in README.read_text()


def test_readme_opens_with_the_two_commands() -> None:
    lines = README.read_text().splitlines()
    assert "kvcompare run" in lines[3] and "python -m pytest" in lines[4]


def readme_examples() -> list[str]:
    """The Python blocks of the README's plugin section, in order."""
    text = README.read_text()
    section = text[text.index("## Writing a policy plugin") : text.index("## Development")]
    return [block.split("```", 1)[0] for block in section.split("```python")[1:]]


def held_after_running(
    code: str, spec: str, register_plugin: Callable[[object, str], None], host: PluginHost, tokens: torch.Tensor
) -> list[list[int]]:
    """Run a README example's policy over ``tokens`` (limit 16, chunks of 4); what each head holds at the end."""
    module = types.ModuleType("readme_example")
    sys.modules[module.__name__] = module
    try:
        exec(code, module.__dict__)
        register_plugin(module, "readme-example")
        policy = host.registry().build(spec)
        executor = Executor(tiny_llama())
        cache = executor.new_cache(policy, CacheConfig(16, 4, "shift", ()), capacity=tokens.numel())
        with executor.attached():
            for start in range(0, tokens.numel(), 4):
                executor.forward(cache, tokens[start : start + 4].view(1, -1))
    finally:
        del sys.modules[module.__name__]
    assert cache.evictions > 0
    return [sorted(row[row >= 0].tolist()) for row in cache.slot_tokens.flatten(0, 2)]


def test_readme_policy_example_registers_and_runs(
    register_plugin: Callable[[object, str], None], host: PluginHost, tokens: torch.Tensor
) -> None:
    held = held_after_running(readme_examples()[0], "oldest:margin=2", register_plugin, host, tokens)
    oldest = [*range(12), *range(tokens.numel() - 4, tokens.numel())]  # the oldest, and the last chunk
    assert all(row == oldest for row in held)


def test_readme_attention_example_reads_attention(
    register_plugin: Callable[[object, str], None], host: PluginHost, tokens: torch.Tensor
) -> None:
    first, second = readme_examples()[:2]
    held = held_after_running(first + second, "least-attended", register_plugin, host, tokens)
    last_chunk = list(range(tokens.numel() - 4, tokens.numel()))
    assert all(len(row) == 16 and row[-4:] == last_chunk for row in held)
    assert len({tuple(row) for row in held}) > 1  # each head kept what its own queries attended
