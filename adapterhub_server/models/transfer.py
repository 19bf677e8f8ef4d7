"""Host-to-device copies of the small per-step tensors, without stalling the host.

A copy from ordinary (pageable) host memory makes the host wait for the device's stream
to drain first: once per step and per small tensor, that is a host-device synchronisation
the decode loop does not need. Staged through pinned memory and issued non-blocking, the
copy is queued behind the running kernels and the host moves on; PyTorch's pinned-memory
cache keeps the staging buffer alive until the copy has run. On CPU this is a plain tensor.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def to_device(
    values: Sequence | torch.Tensor, dtype: torch.dtype, device: torch.device | str
) -> torch.Tensor:
    """`values` (a nested list or a CPU tensor) as a tensor of `dtype` on `device`."""
    device = torch.device(device)
    if isinstance(values, torch.Tensor):
        host = values.to(dtype)
    else:
        host = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)
