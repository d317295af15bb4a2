"""Memory: the most a measurement added to what was in use when it began (the device allocator's on cuda and mps,
the process's resident memory on a CPU), what the device can still give, and a check that a cell's buffers fit in
it before they are allocated."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools

import psutil
import torch


class PeakMemory:
    """The most memory one pass added above what was in use when it began, in bytes (``peak``): per cell, whatever
    ran before it. Begin it before the pass allocates its cache, and sample at chunk boundaries; samples stay outside
    the timed decode steps; the one inside the TTFT (:meth:`~kvcompare.engine.executor.Executor.generate`) is taken
    at the same point for every policy, after the prefill and before the prefill setting's compression frees the
    context's buffers, whose peak it would otherwise miss.

    On cuda the allocator's high-water mark is reset at the start (so peaks between samples count too); on mps the
    allocated bytes are sampled. On a CPU the resident set is sampled, after the C allocator has returned the memory
    earlier passes freed to the system (glibc's ``malloc_trim``), so that memory it kept is not taken for this
    pass's; where there is no glibc, memory an earlier pass freed and this one reuses is not counted.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._process = psutil.Process()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        elif device.type == "cpu":
            release_freed_memory()
        self.start = self._in_use()  # bytes in use when the pass began (the weights, anything else alive)
        self.peak = 0

    def _in_use(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.memory_allocated(self.device))
        if self.device.type == "mps":
            return int(torch.mps.current_allocated_memory())
        return int(self._process.memory_info().rss)

    def sample(self) -> None:
        """Read the memory now (the allocator's high-water mark on cuda, its allocation on mps, the resident set on
        a CPU) and keep in :attr:`peak` how far it is above :attr:`start`, if that is the most yet."""
        current = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else self._in_use()
        self.peak = max(self.peak, current - self.start)


def release_freed_memory() -> None:
    """Have the C allocator return the memory it holds free to the system (glibc's ``malloc_trim``; nothing
    elsewhere), so that the resident set counts only memory in use."""
    with contextlib.suppress(OSError, AttributeError):
        _libc().malloc_trim(0)


@functools.cache
def _libc() -> ctypes.CDLL:
    name = ctypes.util.find_library("c")
    if name is None:
        raise OSError("no C library")
    return ctypes.CDLL(name)


def free_memory(device: torch.device) -> int:
    """Bytes the device can still give: the allocator's free memory (cuda, mps) or the machine's available RAM."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type == "mps":
        return int(torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory())
    return int(psutil.virtual_memory().available)


class AllocationError(RuntimeError):
    """A cell's buffers would not fit in the device's free memory: that cell fails, the run goes on."""


def ensure_fits(nbytes: int, device: torch.device, what: str) -> None:
    """Raise AllocationError before ``what`` allocates ``nbytes`` that ``device`` does not have free.

    On a CPU an allocation beyond the available memory may not fail at once (the kernel overcommits) but kill
    the process when the pages are touched, losing every cell not yet written; so it is refused here.
    """
    free = free_memory(device)
    if nbytes > free:
        raise AllocationError(
            f"{what} needs {nbytes / 2**30:.2f} GiB, more than the {free / 2**30:.2f} GiB free on {device}"
        )
