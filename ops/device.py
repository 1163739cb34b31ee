"""Where the neural models run, and the per-device settings that go with it.

One code path serves CPU and CUDA; what differs is decided here, once: the device itself, the CPU thread count,
bf16 autocast on CUDA, and pinned host memory for the host-to-device copies. Callers never test
``device.type`` themselves.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

from sessionrec.ops.errors import SessionrecError

if TYPE_CHECKING:
    import torch

DEVICE_CHOICES: tuple[str, ...] = ("auto", "cpu", "cuda")


class DeviceError(SessionrecError):
    """The requested device does not exist on this machine."""


def resolve_device(requested: str = "auto", cpu_threads: int | None = None) -> "torch.device":
    """``auto``: CUDA when available, else CPU; ``cpu`` / ``cuda`` (or ``cuda:N``) force a device.

    On CPU ``cpu_threads`` (when given) becomes torch's intra-op thread count. The session models' matrices are
    small (a batch of 64 times a hidden size of 100), so one thread is usually as fast as two, and on a shared,
    busy machine two spinning OpenMP threads were measured 8x slower than one: the thread count is a setting,
    not a guess from ``os.cpu_count()``. The setting is process-wide (torch has no other kind).
    """
    import torch

    name = requested.strip().lower()
    if name not in DEVICE_CHOICES and not name.startswith("cuda:"):
        raise DeviceError(f"unknown device {requested!r}; choose one of {', '.join(DEVICE_CHOICES)} or cuda:N")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError(
                f"device {requested!r} was requested but CUDA is not available here (torch {torch.__version__}, "
                "CUDA build: " + str(torch.version.cuda) + "); use device 'auto' or 'cpu'"
            )
        device = torch.device(name)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"{requested!r}: only {torch.cuda.device_count()} CUDA device(s) exist here")
        return device
    if cpu_threads is not None:
        if cpu_threads < 1:
            raise DeviceError(f"cpu_threads must be at least 1, got {cpu_threads}")
        torch.set_num_threads(cpu_threads)
    return torch.device("cpu")


@contextlib.contextmanager
def autocast(device: "torch.device") -> Iterator[None]:
    """bf16 autocast on CUDA (halves the bytes moved, uses the tensor cores); exact float32 on CPU, where bf16
    matrix products are slower than float32 ones on most processors."""
    import torch

    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        yield


def to_device(array: np.ndarray, device: "torch.device") -> "torch.Tensor":
    """A host array as a tensor on ``device``; through pinned memory on CUDA so that the copy is asynchronous."""
    import torch

    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor


def synchronize(device: "torch.device") -> None:
    """Wait for queued kernels, so that wall-clock timings on CUDA mean something."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_bytes(device: "torch.device") -> int:
    """Peak memory of this process's work on ``device``: CUDA allocations, or the peak RSS on CPU."""
    import resource
    import sys

    import torch

    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB on Linux
