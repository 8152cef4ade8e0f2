"""Shared by every benchmark suite: interleaved, calibrated timing of biogen against its baseline.

The API (one call per comparison)::

    from conftest import compare, peak_memory_mib

    def test_something(benchmark):
        res = compare(benchmark, {"torch": baseline_fn, "biogen": our_fn}, ours="biogen")
        res.ratio("torch")        # the baseline's median time over ours (ratio of medians)
        res.record(benchmark, "torch", "biogen-bf16")  # any other pair, spread included

``compare(benchmark, sides, ours=..., rounds=..., min_round_s=..., warmup=..., memory=...)``:

- ``sides``: name -> zero-argument callable doing one call of that side (inputs bound beforehand);
- warm-up: every side is called ``warmup`` times (>= 1) before anything is timed; then batches of
  1, 2, 4, ... calls calibrate how many calls make a round of at least ``min_round_s`` (default
  50 ms, env ``BIOGEN_BENCH_MIN_ROUND_S``): a sub-millisecond call timed alone measures the
  scheduler tick;
- ``rounds`` (default 5, env ``BIOGEN_BENCH_ROUNDS``): in each round every side runs its calls back
  to back, in alternating order (A B C, then C B A), so that a burst of load from other jobs falls on
  every side instead of on one;
- reported for ``ours`` against each other side ``b`` (in ``benchmark.extra_info``, and printed in
  the terminal summary): ``speedup_vs_<b>`` = median time of ``b`` / median time of ours,
  ``speedup_vs_<b>_range`` = [min, max] and ``speedup_vs_<b>_iqr`` = [25 %, 75 %] of the per-round
  ratios, ``cpu_time_ratio_vs_<b>`` (process CPU time, all threads: steadier when the cores are
  shared), ``<side>_median_s`` / ``<side>_calls_per_round``, the threads and the load average before
  and after (``os.getloadavg``: a shared machine is visible in the record);
- ``memory=True``: ``<side>_peak_mib`` from :func:`peak_memory_mib` of one call of every side;
- pytest-benchmark's own statistics (its table, ``--benchmark-json``) are those of ``ours``, per call.

Run any suite as ``PYTHONPATH=python python -m pytest benchmarks/<file> --benchmark-only``; the
``benchmark extra_info`` section after pytest-benchmark's table lists the ratios with their spread.
"""

from __future__ import annotations

import ctypes
import math
import os
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench files import from each other

ROUNDS = int(os.environ.get("BIOGEN_BENCH_ROUNDS", "5"))
MIN_ROUND_S = float(os.environ.get("BIOGEN_BENCH_MIN_ROUND_S", "0.05"))


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    pos = q * (len(xs) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


# ------------------------------------------------------------------------------ peak memory


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _status_kib(name: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(name + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def malloc_trim() -> None:
    """Give freed heap pages back to the OS (glibc), so that a call's RSS growth is its own."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_memory_mib(fn: Callable[[], object], device: Optional[torch.device] = None) -> float:
    """Extra peak memory of one call of ``fn`` above what was resident before it (MiB).

    CUDA: ``torch.cuda.max_memory_allocated`` growth. CPU: the resident high-water mark (Linux:
    VmHWM reset through ``/proc/self/clear_refs``; elsewhere RSS sampled every millisecond) after
    ``malloc_trim``. In-process, so memory that the allocator kept from earlier calls and reuses does
    not show: benchmarks that need exact figures measure in a fresh child process instead.
    """
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    malloc_trim()
    base = _rss()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := current RSS
        fn()
        hwm = _status_kib("VmHWM")
        if hwm is not None:
            return max(0, hwm * 1024 - base) / 2**20
    except OSError:
        pass
    peak = [base]
    stop = threading.Event()

    def sample():
        while not stop.wait(0.001):
            peak[0] = max(peak[0], _rss())

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        fn()
    finally:
        stop.set()
        t.join()
    return max(0, max(peak[0], _rss()) - base) / 2**20


# ------------------------------------------------------------------------------ interleaved timing


@dataclass
class Comparison:
    ours: str
    calls: dict[str, int]
    wall: dict[str, list[float]] = field(default_factory=dict)  # seconds per call, one per round
    cpu: dict[str, list[float]] = field(default_factory=dict)
    peak_mib: dict[str, float] = field(default_factory=dict)

    def median(self, side: str) -> float:
        return statistics.median(self.wall[side])

    def ratio(self, base: str, ours: Optional[str] = None) -> float:
        """Ratio of medians: the baseline's median time per call over ours'."""
        return self.median(base) / self.median(ours or self.ours)

    def round_ratios(self, base: str, ours: Optional[str] = None) -> list[float]:
        return [b / o for b, o in zip(self.wall[base], self.wall[ours or self.ours])]

    def record(self, benchmark, base: str, ours: Optional[str] = None) -> None:
        """Write ``<ours>``'s ratio to ``base`` with its spread into ``benchmark.extra_info`` and print
        it; the key prefix is ``speedup_vs_<base>`` for the main side, ``<ours>_speedup_vs_<base>``
        for any other pair."""
        o = ours or self.ours
        key = f"speedup_vs_{base}" if o == self.ours else f"{o}_speedup_vs_{base}"
        rr = self.round_ratios(base, o)
        info = benchmark.extra_info
        info[key] = self.ratio(base, o)
        info[f"{key}_range"] = [round(min(rr), 3), round(max(rr), 3)]
        info[f"{key}_iqr"] = [round(_quantile(rr, .25), 3), round(_quantile(rr, .75), 3)]
        cpu_key = key.replace("speedup_vs_", "cpu_time_ratio_vs_")
        info[cpu_key] = statistics.median(self.cpu[base]) / statistics.median(self.cpu[o])
        print(f"\n[{benchmark.group or benchmark.name}] {self.summary(base, o)}", flush=True)

    def summary(self, base: str, ours: Optional[str] = None) -> str:
        r = self.round_ratios(base, ours)
        return (f"{ours or self.ours} vs {base}: {self.ratio(base, ours):.2f}x (rounds {min(r):.2f}-{max(r):.2f}, "
                f"IQR {_quantile(r, .25):.2f}-{_quantile(r, .75):.2f}; {self.median(ours or self.ours) * 1e3:.4g} vs "
                f"{self.median(base) * 1e3:.4g} ms per call)")


def compare(benchmark, sides: dict[str, Callable[[], object]], *, ours: str = "biogen",
            rounds: Optional[int] = None, min_round_s: Optional[float] = None, warmup: int = 1,
            memory: bool = False, device: Optional[torch.device] = None) -> Comparison:
    """Time ``sides`` interleaved in the same rounds; record ``ours``'s statistics in ``benchmark``
    and every ratio (with its spread over the rounds) in ``benchmark.extra_info``. See the module doc."""
    if ours not in sides:
        raise ValueError(f"ours={ours!r} is not one of the sides {list(sides)}")
    rounds = ROUNDS if rounds is None else rounds
    min_round_s = MIN_ROUND_S if min_round_s is None else min_round_s
    load_before = os.getloadavg()[0]
    calls = {}
    for name, fn in sides.items():
        for _ in range(max(1, warmup)):
            fn()
        _sync()
        # calibration: batches of 1, 2, 4, ... calls until one lasts min_round_s (a single fast call
        # is one scheduler tick of noise away from ten times its time on a loaded machine)
        n = 1
        while True:
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            _sync()
            t = time.perf_counter() - t0
            if t >= min_round_s or n >= 1 << 20:
                break
            n *= 2
        calls[name] = max(1, math.ceil(min_round_s * n / max(t, 1e-9)))
    res = Comparison(ours, calls, {n: [] for n in sides}, {n: [] for n in sides})
    if memory:
        res.peak_mib = {n: peak_memory_mib(fn, device) for n, fn in sides.items()}
    order = list(sides)
    for r in range(rounds):
        for name in (order if r % 2 == 0 else order[::-1]):
            fn, n = sides[name], calls[name]
            c0, t0 = time.process_time(), time.perf_counter()
            for _ in range(n):
                fn()
            _sync()
            res.wall[name].append((time.perf_counter() - t0) / n)
            res.cpu[name].append((time.process_time() - c0) / n)

    info = benchmark.extra_info
    info.update(rounds=rounds, threads=torch.get_num_threads(), load_avg_before=round(load_before, 1),
                load_avg_after=round(os.getloadavg()[0], 1))
    for name in sides:
        info[f"{name}_median_s"] = res.median(name)
        info[f"{name}_calls_per_round"] = calls[name]
        if name in res.peak_mib:
            info[f"{name}_peak_mib"] = round(res.peak_mib[name], 1)
    for base in sides:
        if base != ours:
            res.record(benchmark, base)
    _record(benchmark, calls[ours], [t * calls[ours] for t in res.wall[ours]])
    return res


def _record(benchmark, calls: int, round_seconds: list[float]) -> None:
    """Hand ours' rounds to pytest-benchmark as if it had timed them (its table is per call)."""
    if getattr(benchmark, "disabled", False):
        return
    stats = benchmark._make_stats(calls)  # what benchmark.pedantic(..., iterations=calls) does
    for t in round_seconds:
        stats.update(t)
    benchmark._mode = "biogen compare(...)"


# ------------------------------------------------------------------------------ report


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, list):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return str(v)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """pytest-benchmark's table has no column for extra_info: list it after the table."""
    session = getattr(config, "_benchmarksession", None)
    benches = getattr(session, "benchmarks", None) or []
    if not benches:
        return
    tr = terminalreporter
    tr.section("benchmark extra_info")
    for b in sorted(benches, key=lambda b: (b.group or "", b.name)):
        median = b.stats.median if getattr(b, "stats", None) else float("nan")
        extra = "  ".join(f"{k}={_fmt(v)}" for k, v in sorted(b.extra_info.items()))
        tr.write_line(f"[{b.group}] {b.name}: median {median:.4g} s  {extra}")
