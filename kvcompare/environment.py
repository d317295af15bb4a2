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


def load_distortion(compiled: bool) -> str:
    """How far other work on the CPUs distorts CPU decode steps, eager or ``compiled``, as measured on a tiny
    float32 model on 2 cores at a 1-minute load average of about 3.6 (issue 34), for warnings."""
    eager = "eager CPU steps took about 8 times as long (30 ms against 3.6 ms on a quiet machine)"
    if not compiled:
        return f"on a tiny model at a load of 3.6 on 2 cores, {eager}"
    return (
        "compiled CPU steps suffer far more than eager ones, as all their threads wait for the slowest: on a tiny "
        "model at a load of 3.6 on 2 cores they took over 100 times as long (0.42-0.46 s against 1-3 ms on a quiet "
        f"machine) while {eager}, and the A/A control showed it only as noise"
    )


#: The load average above the free CPUs that an otherwise idle machine shows (background services, the run's own
#: start-up): below it, a --compile run is not warned.
IDLE_LOAD = 0.5


def busy_for_compiled_steps(threads: int, cpus: int | None, load: list[float] | None) -> str | None:
    """A warning for a --compile run when the 1-minute ``load`` average (other work, before the run starts) is more
    than :data:`IDLE_LOAD` above the ``cpus`` its ``threads`` leave free, or None."""
    if not load or not cpus:
        return None
    free = max(cpus - threads, 0)
    if load[0] <= free + IDLE_LOAD:
        return None
    return (
        f"the 1-minute load average is {load[0]:g}, above the {free} CPUs the run's {threads} threads leave free: "
        f"other work will compete with the timed steps, and {load_distortion(True)}; measure on a quiet machine, or "
        "with fewer --threads"
    )
