"""What a worker's device has to offer: free memory, the device to use, and giving memory back."""

from __future__ import annotations

import gc


def available_memory(device: str) -> int:
    """Bytes free on `device` now: MemAvailable for the CPU, free VRAM for CUDA."""
    if device.startswith("cuda"):
        import torch

        free, _total = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def default_offer(device: str) -> int:
    """What a worker offers without --memory: half the free RAM, or 90% of the free VRAM."""
    free = available_memory(device)
    return int(free * (0.9 if device.startswith("cuda") else 0.5))


def free_memory(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()
