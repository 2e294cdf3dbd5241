"""Device counts of ``train.trainer.devices``, without torch: the Snakefile asks them too (a
training job's GPU request), and must not import torch to do so."""

from __future__ import annotations

from typing import Any


def requested_devices(devices: Any) -> int | None:
    """How many devices ``train.trainer.devices`` names: a count, or a list of ids ("0,1", [0, 1]);
    None for "auto"/-1 (as many as the machine has, which only the job can tell)."""
    if isinstance(devices, (list, tuple)) or "," in str(devices):
        ids = devices if isinstance(devices, (list, tuple)) else str(devices).strip("[] ").split(",")
        return max(len([i for i in ids if str(i).strip()]), 1)
    text = str(devices).strip()
    if text.lstrip("-").isdigit() and int(text) > 0:
        return int(text)
    return None
