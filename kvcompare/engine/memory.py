"""Memory: the peak of the process (CPU) or of the device allocator (cuda, mps) during one measurement, what
the device can still give, and a check that a cell's buffers fit in it before they are allocated."""

from __future__ import annotations

import psutil
import torch


class PeakMemory:
    """Samples memory at chunk boundaries and keeps the maximum in ``peak`` (bytes). Samples stay outside the timed
    decode steps; the one inside the TTFT (:meth:`~kvcompare.engine.executor.Executor.generate`) is taken at the same
    point for every policy, after the prefill and before the prefill setting's compression frees the context's
    buffers, whose peak it would otherwise miss."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._process = psutil.Process()
        self.peak = 0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    def sample(self) -> None:
        """Read the memory now, in bytes (the allocator's peak on cuda, its allocation on mps, the resident set on
        a CPU), and keep it in :attr:`peak` if it is the highest yet."""
        if self.device.type == "cuda":
            current = torch.cuda.max_memory_allocated(self.device)
        elif self.device.type == "mps":
            current = torch.mps.current_allocated_memory()
        else:
            current = self._process.memory_info().rss
        self.peak = max(self.peak, current)


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
