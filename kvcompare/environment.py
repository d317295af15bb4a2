"""What a result was measured with: git sha, library versions, device name, platform."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import psutil
import torch

LIBRARIES = (
    "kvcompare",
    "torch",
    "transformers",
    "gguf",
    "accelerate",
    "datasets",
    "pluggy",
    "pyarrow",
    "polars",
    "altair",
    "scipy",
)


def git_sha() -> str:
    """The commit of the kvcompare checkout, with ``-dirty`` for uncommitted changes, or ``unknown``."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=here, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def versions() -> dict[str, str]:
    """Python's and each measured library's version (``not installed`` when absent)."""
    found = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def device_name(device: torch.device) -> str:
    """The device's human name (the GPU's model, or the CPU's)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return f"Apple MPS ({platform.machine()})"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"CPU: {line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    except OSError:
        pass
    return f"CPU: {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def environment(device: torch.device) -> dict[str, Any]:
    """What a row's measurements depend on besides the configuration: git sha, versions, device, threads, memory
    bandwidth."""
    return {
        "git_sha": git_sha(),
        "versions": versions(),
        "device_name": device_name(device),
        "platform": platform.platform(),
    }


def physical_cores() -> int:
    """The default --threads: one per physical core (hyper-threads share a core's arithmetic units)."""
    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages, where the platform has them."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None
