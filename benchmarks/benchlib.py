"""What every benchmark here shares: how rounds alternate, how results are summarised, and the
header that says where and under what load they were measured.

Rules (docs/benchmarks.md): the compared methods alternate inside each round (the order rotates
from round to round, so neither always runs first), every figure is a median with its range over
at least 5 rounds, ratios are paired per round, cold- and warm-cache timings are reported
separately, and each script prints the machine and its targets. Tests never time anything.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence

import torch

MIN_ROUNDS = 5


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def torch_build() -> str:
    """torch version and what its kernels use on this CPU."""
    parts = [f"torch {torch.__version__}"]
    if torch.backends.mkl.is_available():
        parts.append("MKL")
    if torch.backends.mkldnn.is_available():
        parts.append("oneDNN")
    parts.append(f"CPU capability {torch.backends.cpu.get_cpu_capability()}")
    return ", ".join(parts)


def header(title: str, targets: Sequence[str]) -> None:
    """Print what was measured where: machine, threads, torch build, load, and the targets."""
    cores = os.cpu_count()
    print(f"# {title}")
    print(f"machine: {cpu_model()}, {cores} logical CPUs, {_mem_gib():.0f} GiB RAM")
    print(f"software: python {platform.python_version()}, {torch_build()}")
    print(f"threads: torch {torch.get_num_threads()} (OMP_NUM_THREADS={_env('OMP_NUM_THREADS')})")
    print(f"load average (1/5/15 min) at start: {load_average()}")
    print("targets:")
    for target in targets:
        print(f"  - {target}")
    print()


def footer() -> None:
    print(f"\nload average at end: {load_average()} — figures taken under load are noisy")


def _env(name: str) -> str:
    return os.environ.get(name, "unset")


def _mem_gib() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        return 0.0


def alternate(
    methods: dict[str, Callable[[], float | None]], rounds: int
) -> dict[str, list[float]]:
    """Run every method once per round, rotating the order; return each one's times.

    A method returns the seconds it measured itself, or None to be timed whole here.
    """
    if rounds < MIN_ROUNDS:
        raise ValueError(f"at least {MIN_ROUNDS} rounds, got {rounds}")
    names = list(methods)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t0 = time.perf_counter()
            measured = methods[name]()
            times[name].append(measured if measured is not None else time.perf_counter() - t0)
    return times


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def spread(values: Sequence[float], fmt: str = "{:.3f}") -> str:
    """'median (min-max)'."""
    return f"{fmt.format(median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def ratios(a: Sequence[float], b: Sequence[float]) -> list[float]:
    """Per-round a/b: each pair was measured side by side, so drift cancels."""
    return [x / y for x, y in zip(a, b, strict=True)]


def drop_page_cache(path: str | os.PathLike[str]) -> None:
    """Make the next read of `path` come from the disk: fsync, then POSIX_FADV_DONTNEED."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (VmHWM; ru_maxrss may be inherited)."""
    with open("/proc/self/status", encoding="utf-8") as f:
        for line in f:
            if line.startswith("VmHWM"):
                return int(line.split()[1]) / 1024
    return float("nan")
