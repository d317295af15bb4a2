"""Plugins: a test-registered policy, an installed third-party package, and plugins that break."""

from __future__ import annotations

import dataclasses
import importlib.metadata
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from installed import host_finding, install_example

from kvcompare.cli import main
from kvcompare.config import CacheConfig
from kvcompare.engine.executor import Executor
from kvcompare.hookspecs import hookimpl
from kvcompare.plugins import PluginHost
from kvcompare.policy import KVPolicy, PolicyError
from kvcompare.testing import tiny_llama, tiny_neox


@dataclasses.dataclass
class OldestFirst(KVPolicy):
    """Keep the oldest tokens (a deliberately poor policy, registered only by a test)."""

    name = "oldest"
    extra: int = 0

    def select(self, keys: torch.Tensor, keep: int, positions: torch.Tensor) -> torch.Tensor:
        return torch.arange(keep).expand(*keys.shape[:3], keep)


class TestPlugin:
    @hookimpl
    def register_policies(self, register: Callable[[type], None]) -> None:
        register(OldestFirst)


def test_a_registered_plugin_is_listed_and_runs(
    register_plugin: Callable[..., None], host: PluginHost, capsys: pytest.CaptureFixture[str], tokens: torch.Tensor
) -> None:

    register_plugin(TestPlugin(), "test-plugin")
    registry = host.registry()
    assert registry.entry("oldest").plugin == "test-plugin"
    assert main(["policies"]) == 0
    assert "oldest  (plugin: test-plugin)" in capsys.readouterr().out
    result = Executor(tiny_llama()).score(tokens, registry.build("oldest"), CacheConfig(16, 4))
    assert result.max_cached <= 16 and result.nll.size == tokens.numel() - 1


def test_a_plugin_registered_for_a_test_is_gone_after_it(host: PluginHost) -> None:
    from conftest import plugins_registered

    assert "oldest" not in host.registry().names()
    with plugins_registered(host) as register:
        register(TestPlugin(), "test-plugin")
        assert "oldest" in host.registry().names()
    assert "oldest" not in host.registry().names()


def test_a_misspelt_hook_fails_loudly_without_taking_others_down(
    host: PluginHost, capsys: pytest.CaptureFixture[str]
) -> None:
    class Misspelt:
        @hookimpl
        def register_policy(self, register: Callable[[type], None]) -> None:  # missing "s"
            raise AssertionError("never called")

    fresh = PluginHost()
    fresh.load()
    fresh.add(Misspelt(), "misspelt")
    assert [f.name for f in fresh.failures] == ["misspelt"]
    assert "register_policy" in fresh.failures[0].error
    assert "not loaded" in capsys.readouterr().err
    assert {"full", "streaming", "l2", "recent"} <= set(fresh.registry().names())


def test_a_plugin_that_fails_to_import_is_reported_by_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dist = tmp_path / "broken_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[kvcompare]\nbroken = broken_plugin_module\n")
    (tmp_path / "broken_plugin_module.py").write_text("raise ImportError('missing dependency xyz')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    fresh = PluginHost()
    fresh.load()
    assert [f.name for f in fresh.failures] == ["broken"]
    assert "missing dependency xyz" in fresh.failures[0].error
    assert {"full", "streaming", "l2", "recent"} <= set(fresh.registry().names())


def test_a_policy_registered_twice_is_refused() -> None:
    fresh = PluginHost()
    fresh.add(TestPlugin(), "one")
    fresh.add(TestPlugin(), "two")
    fresh.registry()
    assert any("registered twice" in f.error for f in fresh.failures)


def entry_points(site: Path, monkeypatch: pytest.MonkeyPatch, lines: str, modules: dict[str, str]) -> None:
    """An installed distribution in ``site`` (on sys.path for the test) with ``[kvcompare]`` entry points ``lines``
    and the modules (name: source) they name."""
    dist = site / "some_plugins-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: some-plugins\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(f"[kvcompare]\n{lines}")
    for name, source in modules.items():
        (site / f"{name}.py").write_text(source)
    monkeypatch.syspath_prepend(str(site))


def test_built_ins_load_by_import_without_any_entry_point(monkeypatch: pytest.MonkeyPatch) -> None:
    from kvcompare.plugins import BUILTIN_PLUGINS

    monkeypatch.setattr(importlib.metadata, "entry_points", lambda **_: [])
    fresh = PluginHost()
    fresh.load()
    assert not fresh.failures
    origins = {info.name: info.origin for info in fresh.plugins()}
    assert {module.rsplit(".", 1)[1]: "built-in" for module in BUILTIN_PLUGINS}.items() <= origins.items()
    assert origins["full"] == origins["ppl"] == "core"
    assert {"streaming", "l2", "recent", "h2o", "tova", "snapkv", "keydiff"} <= set(fresh.registry().names())
    assert {"passkey", "niah_single", "cwe"} <= set(fresh.tasks().names())


def test_full_and_ppl_are_core_and_always_registered() -> None:
    from kvcompare.core import FullCache, Perplexity, full_cache
    from kvcompare.engine import fidelity
    from kvcompare.task import Task

    bare = PluginHost()  # nothing loaded: the core's own plugins only
    assert bare.registry().names() == ["full"] and bare.tasks().names() == ["ppl"]
    assert bare.registry().entry("full").cls is FullCache and bare.tasks().entry("ppl").cls is Perplexity
    assert full_cache() == FullCache() and full_cache().plugin == "full"  # the name its rows always carried
    assert fidelity.full_cache is full_cache
    # nothing in the core only raises: the rolling pass has no probes to build or score (the runner draws passages)
    assert Perplexity.probes is Task.probes and Perplexity.score is Task.score


def test_a_stale_entry_point_of_a_built_in_is_not_registered_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An editable install made before built-ins loaded by import still lists them (and the removed
    ``kvcompare_plugins.full``) as entry points: they are skipped, not registered again nor reported broken."""
    entry_points(
        tmp_path,
        monkeypatch,
        "streaming = kvcompare_plugins.streaming\nfull = kvcompare_plugins.full\nl2_again = kvcompare_plugins.l2\n",
        {},
    )
    fresh = PluginHost()
    fresh.load()
    assert not fresh.failures
    assert "l2_again" not in {info.name for info in fresh.plugins()}
    assert fresh.registry().entry("l2").plugin == "l2" and not fresh.failures


def test_a_third_party_plugin_may_not_take_a_built_in_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = (
        "import dataclasses\nfrom kvcompare import KVPolicy, hookimpl\n\n"
        "@dataclasses.dataclass\nclass Mine(KVPolicy):\n    name = 'streaming'\n\n"
        "@hookimpl\ndef register_policies(register):\n    register(Mine)\n"
    )
    entry_points(tmp_path, monkeypatch, "mystream = my_stream\nstreaming = my_stream\n", {"my_stream": source})
    fresh = PluginHost()
    fresh.load()
    fresh.registry()
    errors = {f.name: f.error for f in fresh.failures}
    assert "policy 'streaming' is registered twice: by plugin 'streaming' and by 'mystream'" in errors["mystream"]
    assert "plugin name 'streaming' is taken by the built-in plugin" in errors["streaming (my_stream)"]
    assert "streaming" in {info.name for info in fresh.plugins()}  # the built-in stays


def test_not_a_policy_is_refused() -> None:
    from kvcompare.registry import PolicyRegistry

    with pytest.raises(PolicyError, match="not a KVPolicy"):
        PolicyRegistry().add(dict, "bad")


@pytest.fixture(scope="module")
def installed_example(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return install_example("kvcompare-example-plugin", tmp_path_factory.mktemp("site"))


def test_an_installed_third_party_plugin_is_found_listed_and_run(
    installed_example: Path, monkeypatch: pytest.MonkeyPatch, tokens: torch.Tensor
) -> None:
    fresh = host_finding(installed_example, monkeypatch)
    infos = {i.name: i for i in fresh.plugins()}
    assert infos["uniform"].distribution == "kvcompare-example-plugin" and infos["uniform"].version == "0.1.0"
    registry = fresh.registry()
    policy = registry.build("uniform:recent=4")
    assert policy.plugin == "uniform"
    result = Executor(tiny_neox()).score(tokens, policy, CacheConfig(12, 3, "shift", (0,)))
    assert result.max_cached <= 12


def test_cli_lists_policies_and_plugins(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["policies"]) == 0
    out = capsys.readouterr().out
    for line in (
        "full  (plugin: full, core)",
        "streaming  (plugin: streaming, built-in)",
        "start_size: int = 4",
        "mode: keep_low|keep_high|random = 'keep_low'",
        "recent  (plugin: recent, built-in)",
    ):
        assert line in out
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    version = importlib.metadata.version("kvcompare")
    assert f"streaming        kvcompare {version} (built-in)" in out
    assert f"full             kvcompare {version} (core)" in out
