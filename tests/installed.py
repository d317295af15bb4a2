"""The example plugin packages (examples/), really installed into a private folder for a test, and a plugin host
that finds them by their entry points, as an installed third-party plugin is found."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from kvcompare.plugins import PluginHost

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def install_example(name: str, target: Path) -> Path:
    """Install ``examples/<name>`` (no dependencies) into ``target``; return ``target``."""
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation"]
    subprocess.run([*command, "--target", str(target), str(EXAMPLES / name)], check=True)
    return target


def host_finding(site: Path, monkeypatch: pytest.MonkeyPatch) -> PluginHost:
    """A fresh plugin host that has loaded every entry point, ``site``'s included (on sys.path for the test)."""
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    host = PluginHost()
    host.load()
    return host
