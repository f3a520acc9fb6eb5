"""Devices and processes: torchrun ranks, device choice, autocast, measured matmul peak."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from tinylm.core.errors import TinylmError

# ----- devices, distribution, FLOPs ------------------------------------------------------------------

@dataclass
class Dist:
    """This process's place in a torchrun job (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str | torch.device) -> torch.device:
    """The device a `--device` value names: auto (cuda if available, else cpu), cpu, cuda, cuda:N or mps; a
    device this machine does not have is a one-line error.

    Args:
        name: the value; a torch.device passes through.
    """
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    known = "auto, cpu, cuda, cuda:N or mps"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise TinylmError(f"not a device: {name!r} ({known})") from None
    if device.type not in ("cpu", "cuda", "mps"):
        raise TinylmError(f"not a device: {name!r} ({known})")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise TinylmError(f"device {name} asked for but no CUDA device is available")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise TinylmError(f"device {name} asked for but this machine has {count} CUDA device"
                              f"{'s' if count != 1 else ''} (cuda:0 to cuda:{count - 1})")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise TinylmError(f"device {name} asked for but no MPS (Apple GPU) device is available")
    return device


def available_memory(device: str | torch.device = "cpu") -> int:
    """Bytes that can be allocated now: the device's free memory on CUDA; on a CPU, MemAvailable of
    /proc/meminfo (what the kernel can hand out without swapping), else free physical pages (sysconf).

    Args:
        device: where the memory would be allocated.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # the file counts kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # no such figure on this platform: do not refuse
        return 2**63


def check_memory(need: int, device: str | torch.device, what: str) -> None:
    """Refuse, with the estimate, an allocation of `need` bytes that exceeds the memory available.

    Args:
        need: the estimated bytes.
        device: where they would be allocated (CUDA: the device's free memory is checked too, as the
            weights pass through CPU memory first).
        what: the start of the message, e.g. "grow: the grown model (dim 6400000)".
    """
    for dev in ("cpu", device) if torch.device(device).type == "cuda" else ("cpu",):
        free = available_memory(dev)
        if need > free:
            where = "" if torch.device(dev).type == "cpu" else f" on {dev}"
            raise TinylmError(f"{what} would need {_gb(need)} for its weights, {_gb(free)} available{where}")


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def init_distributed(device: str) -> tuple[Dist, torch.device]:
    """Join the torchrun process group (NCCL on GPUs, gloo on CPUs) and pick this rank's device.

    Args:
        device: run.device: auto | cpu | cuda (each rank takes cuda:LOCAL_RANK).
    """
    if device not in ("auto", "cpu", "cuda"):
        raise TinylmError(f"run.device must be auto, cpu or cuda, got {device!r}")
    use_cuda = resolve_device(device).type == "cuda"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    d = Dist(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))
    dev = torch.device("cuda", d.local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return d, dev


_PEAK_CACHE: dict[tuple[str, torch.dtype], float] = {}


def measure_peak_flops(device: torch.device, dtype: torch.dtype = torch.float32, n: int = 2048) -> float:
    """An achievable peak: the best of 5 timed n x n matmuls (2 n^3 FLOPs each) in `dtype`.

    On a CPU this is the fp32 matmul rate of the current thread count (torch.get_num_threads()), the
    ceiling a training step's matmuls can reach, which makes MFU comparable between machines where a
    datasheet figure (clock x FMA units) is unknown. On GPUs prefer run.peak_flops (datasheet dense
    bf16, e.g. 989e12 for an H100 SXM).

    Args:
        device: where to measure.
        dtype: matmul dtype (float32 on CPU; bfloat16 on GPUs).
        n: matrix size.
    """
    key = (str(device), dtype)
    if key not in _PEAK_CACHE:
        _PEAK_CACHE[key] = matmul_flops(device, dtype, n)
    return _PEAK_CACHE[key]


def matmul_flops(device: torch.device, dtype: torch.dtype = torch.float32, n: int = 2048, repeats: int = 6) -> float:
    """FLOP/s of the fastest of `repeats` timed n x n matmuls (uncached; see measure_peak_flops)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_bf16_units() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware: AVX512-BF16, with or without AMX (Intel from
    Sapphire Rapids, AMD from Zen 4). A bf16 matmul of a 1m model's shapes runs 4-10x faster than fp32 there,
    with AMX ("bf16 on a CPU with AMX") and without (4.0-7.7x on an AMD EPYC, "bf16 on an AVX512-BF16 CPU without
    AMX", both BENCHMARKS.md); elsewhere torch emulates bf16 matmuls, 20x slower than fp32. torch exposes the
    check only privately, so a torch without it answers False."""
    check = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    return check is not None and bool(check())


# glibc's malloc serves a block above its mmap threshold (128 KiB, adapting up to 32 MiB) from a fresh mapping and
# unmaps it when freed. PyTorch's CPU allocator does not cache, so a training step, which allocates and frees the
# same activations every step, faulted ~29K pages back in each step: 84 ms of system time in a 511 ms step of the
# quickstart's model on 2 AVX2 cores, and fixed-batch steps 8-13% faster without (BENCHMARKS.md, "The quickstart on
# an AVX2-only CPU"; the quickstart's own recipe faults far less and gained no tokens, "bf16 on an AVX512-BF16
# CPU"). jemalloc or tcmalloc through LD_PRELOAD are the usual cure but must be there before the process starts;
# glibc's mallopt does the same at run time, so it is called here by hand (two ctypes calls, no library does it).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (glibc malloc.h)
HEAP_BLOCK = 1 << 27  # blocks up to 128 MiB are kept for reuse: a 1m model's logits are 32 MiB, a 135M model's 400+
HEAP_TRIM = 1 << 30  # free memory at the heap's top is returned to the kernel only past 1 GiB


@functools.cache  # the thresholds hold for the whole process: every later training setup finds them set
def keep_freed_cpu_memory() -> bool:
    """Make glibc's malloc keep freed blocks up to HEAP_BLOCK for reuse instead of unmapping them, for the
    rest of the process; the peak memory is about the same (+1-3% measured), page faults stop. Returns whether
    it applied: False off Linux and glibc (musl, macOS), where nothing changes."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, HEAP_BLOCK)) and bool(mallopt(M_TRIM_THRESHOLD, HEAP_TRIM))


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)
