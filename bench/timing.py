"""Timing and the machine it runs on: blocks of torch.utils.benchmark, copy bandwidth,
the CPU load of other processes (and waiting for it to pass), glibc keeping freed
memory, the machine's description and the git revision. bench/mnist_epochs.py and
bench/overhead.py use these too.
"""
from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.utils.benchmark as torch_benchmark

# --------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------

def block_times(step: Callable, num_threads: int, min_run_time: float, label: str) -> List[float]:
    """Per-call times (seconds) of the blocks of one blocked_autorange.

    torch.utils.benchmark synchronizes CUDA around each block, sets the thread count,
    and picks how many calls a block holds; a median over blocks resists outliers.
    """
    timer = torch_benchmark.Timer(
        stmt="step()", globals={"step": step}, num_threads=num_threads, label=label)
    return list(timer.blocked_autorange(min_run_time=min_run_time).times)


def measure_copy_bandwidth(device: str, num_threads: int, min_run_time: float,
                           megabytes: int = 256) -> Dict[str, float]:
    """GB/s of dst.copy_(src) on a buffer far larger than any cache (read + write counted)."""
    numel = megabytes * 2**20 // 4
    source = torch.rand(numel, device=device)
    destination = torch.empty_like(source)
    destination.copy_(source)  # first touch: page faults are not bandwidth
    times = block_times(lambda: destination.copy_(source), num_threads, min_run_time, "copy")
    seconds = statistics.median(times)
    bytes_moved = 2 * numel * 4
    return {"buffer_MiB": megabytes, "median_s": seconds, "GBps": bytes_moved / seconds / 1e9}


def interquartile_range(values: Sequence[float]) -> Optional[float]:
    if len(values) < 2:
        return None
    quartiles = statistics.quantiles(values, n=4)
    return quartiles[2] - quartiles[0]


# --------------------------------------------------------------------------------------
# Describing the machine
# --------------------------------------------------------------------------------------

def describe_cpu() -> str:
    model = platform.processor() or platform.machine()
    flags = ""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name") and model in (platform.processor(), platform.machine()):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = line
    except OSError:
        pass
    isa = next((name for name, flag in (("AVX-512", " avx512f"), ("AVX2", " avx2")) if flag in flags), "")
    last_level_cache = ""
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index3/size") as size:
            text = size.read().strip()  # e.g. "32768K"
        if text.endswith("K") and text[:-1].isdigit() and int(text[:-1]) % 1024 == 0:
            text = f"{int(text[:-1]) // 1024} MiB"
        last_level_cache = f", L3 {text}"
    except OSError:
        pass
    details = ", ".join(part for part in (f"{os.cpu_count()} logical CPUs", isa) if part)
    return f"{model} ({details}{last_level_cache})"


def describe_machine(device: str) -> Dict[str, str]:
    machine = {"cpu": describe_cpu(), "torch": torch.__version__, "python": platform.python_version()}
    if device == "cuda":
        properties = torch.cuda.get_device_properties(0)
        machine["gpu"] = f"{properties.name} ({properties.total_memory / 2**30:.0f} GiB, sm_{properties.major}{properties.minor})"
        machine["cuda"] = str(torch.version.cuda)
        machine["cudnn"] = str(torch.backends.cudnn.version())
    return machine


class OtherCpuLoad:
    """How busy the CPUs were with work *other than this process* since creation.

    On a shared machine, other work steals cores from the timed threads and stalls
    their barriers (an OpenMP region waits a whole time slice for a descheduled
    thread), which can slow one implementation far more than the other. Rows timed
    under such load are marked, and --wait-idle waits for a quiet moment.
    """

    def __init__(self):
        self._start = self._sample()

    @staticmethod
    def _sample():
        with open("/proc/stat") as stat:  # first line: all CPUs, in clock ticks
            fields = [int(value) for value in stat.readline().split()[1:9]]
        busy_ticks = sum(fields) - fields[3] - fields[4]  # all but idle and iowait
        return busy_ticks / os.sysconf("SC_CLK_TCK"), time.process_time(), time.perf_counter()

    def fraction(self) -> Optional[float]:
        """Fraction of all CPUs' time since creation that others used (0 = idle)."""
        if self._start is None:
            return None
        (busy_before, own_before, wall_before), (busy_after, own_after, wall_after) = self._start, self._sample()
        elapsed = (wall_after - wall_before) * (os.cpu_count() or 1)
        others = (busy_after - busy_before) - (own_after - own_before)
        return None if elapsed <= 0 else min(1.0, max(0.0, others / elapsed))

    @classmethod
    def start(cls) -> "OtherCpuLoad":
        try:
            return cls()
        except (OSError, ValueError, IndexError):  # not Linux: no /proc/stat
            meter = cls.__new__(cls)
            meter._start = None
            return meter


def other_cpu_load_over(seconds: float) -> Optional[float]:
    meter = OtherCpuLoad.start()
    time.sleep(seconds)
    return meter.fraction()


def wait_until_idle(max_seconds: float, threshold: float = 0.1) -> Optional[float]:
    """Wait (at most max_seconds) for half a second in which others use < threshold."""
    deadline = time.perf_counter() + max_seconds
    while True:
        load = other_cpu_load_over(0.5)
        if load is None or load < threshold or time.perf_counter() >= deadline:
            return load


def git_revision() -> str:
    """The checkout's commit (with -dirty), so logged numbers can be tied to code."""
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        result = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=here,
                                capture_output=True, text=True, timeout=10)
        return result.stdout.strip() or "no commit"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# Other processes using more than this fraction of the CPUs make a row's timing suspect.
BUSY_THRESHOLD = 0.1


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4


def keep_freed_memory() -> str:
    """Make glibc keep freed memory for reuse instead of returning it to the OS.

    Every call allocates a fresh output (tens of MB here). Whether glibc serves it
    from memory it kept or from new pages (a page fault per 4 KiB on first write,
    which cost up to 3 ms per call on this machine) depends on the heap's history,
    so either side of a row could be charged for it at random. Keeping freed memory
    gives both sides the steady state that a caching allocator gives on GPUs.
    Blocks of 32 MiB (glibc's largest mmap threshold) and more would still be mapped
    afresh by every call and unmapped after it (a (32,128,112,112) float32 step then
    ran at 4 GB/s on either side, 50176 page faults per tensor), so mmap is turned
    off (M_MMAP_MAX 0): every block comes from the heap, trimmed only past 2 GiB of
    free top. Returns a description."""
    if not sys.platform.startswith("linux"):
        return "allocator: system default"
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        ok = (libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20) == 1 and libc.mallopt(_M_MMAP_MAX, 0) == 1
              and libc.mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1) == 1)
    except (OSError, AttributeError):
        ok = False
    return "allocator: glibc, freed memory kept (mallopt)" if ok else "allocator: system default (mallopt failed)"
