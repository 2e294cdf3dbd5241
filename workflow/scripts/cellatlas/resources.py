"""Memory a job may use, checked before it starts computing rather than found out by the OOM killer."""

from __future__ import annotations

import os

from cellatlas.errors import InputDataError

GIB = 1 << 30


def memory_limit() -> tuple[int, str]:
    """(bytes, what bounds them): the machine's available memory, or the SLURM job's allocation if lower."""
    import psutil

    limit, where = psutil.virtual_memory().available, "available on this machine"
    slurm_mb = os.environ.get("SLURM_MEM_PER_NODE")
    if slurm_mb and slurm_mb.isdigit() and int(slurm_mb) * (1 << 20) < limit:
        limit, where = int(slurm_mb) * (1 << 20), f"of SLURM job {os.environ.get('SLURM_JOB_ID', '')}'s memory (mem_mb)"
    return limit, where


def check_memory(need: float, *, dataset: str, what: str, hint: str) -> None:
    """Raise :class:`InputDataError` when ``need`` bytes will not fit what this job may use."""
    limit, where = memory_limit()
    if need > limit:
        raise InputDataError(dataset, f"{what} needs about {need / GIB:.1f} GiB, more than the {limit / GIB:.1f} GiB "
                                      f"{where}; {hint}")
