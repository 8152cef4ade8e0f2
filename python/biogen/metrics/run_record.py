"""What a measured experiment ran on: seed, hardware, threads, versions, wall time, peak memory.

``with RunRecord(seed=0) as rec: ...`` then ``rec.as_dict()`` (JSON-ready) and ``rec.markdown()``
(the report section). Peak memory is the process's peak resident set size (``ru_maxrss``), which
includes everything loaded before the block (imports, the data set).
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
import time
from typing import Optional

__all__ = ["RunRecord"]

_PACKAGES = ("numpy", "scipy", "scikit-learn", "pandas", "anndata", "scanpy", "torch")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _peak_rss_mb() -> Optional[float]:
    try:
        import resource
    except ImportError:  # Windows
        return None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KiB on Linux


def _loadavg() -> Optional[float]:
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):  # not on every platform
        return None


def _versions() -> dict:
    from .._version import __version__

    out = {"python": platform.python_version(), "biogen": __version__}
    for pkg in _PACKAGES:
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


class RunRecord:
    """Records a run's provenance and cost; wall time counts from construction (or entering ``with``)
    to each :meth:`as_dict` call."""

    def __init__(self, seed: int, **extra):
        self.seed, self.extra = seed, extra
        self._start()

    def _start(self) -> None:
        self._t0, self._cpu0 = time.perf_counter(), time.process_time()
        self._load0 = _loadavg()

    def __enter__(self) -> "RunRecord":
        self._start()
        return self

    def __exit__(self, *exc) -> None:
        pass  # the record keeps counting: a report written after the block includes its own writing

    def as_dict(self) -> dict:
        torch = sys.modules.get("torch")  # report torch's threads only if the run used torch
        peak = _peak_rss_mb()
        wall = time.perf_counter() - self._t0
        return {
            "seed": self.seed,
            **self.extra,
            "cpu": _cpu_model(),
            "machine": platform.machine(),
            "os": platform.platform(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads() if torch is not None else None,
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            "gpu": (torch.cuda.get_device_name(0) if torch is not None and torch.cuda.is_available() else None),
            "versions": _versions(),
            "wall_s": round(wall, 2),
            # CPU seconds of all the process's threads: on a shared machine wall time says little alone
            "cpu_s": round(time.process_time() - self._cpu0, 2),
            "load_avg_1min": {"start": self._load0, "end": _loadavg()},
            "peak_rss_mb": None if peak is None else round(peak, 1),
        }

    def markdown(self) -> str:
        d = self.as_dict()
        versions = ", ".join(f"{k} {v}" for k, v in d["versions"].items())
        extra = "".join(f"- {k}: {d[k]}\n" for k in self.extra)
        return (f"- seed: {d['seed']}\n{extra}"
                f"- hardware: {d['cpu']} ({d['machine']}, {d['cpu_count']} logical CPUs visible)"
                + (f", GPU {d['gpu']}" if d["gpu"] else "") + "\n"
                f"- threads: torch {d['torch_threads']}, OMP_NUM_THREADS={d['OMP_NUM_THREADS']}\n"
                f"- versions: {versions}\n"
                f"- wall time: {d['wall_s']:.1f} s (process CPU time {d['cpu_s']:.1f} s; 1-min load average "
                f"{d['load_avg_1min']['start']} at the start, {d['load_avg_1min']['end']} at the end)\n"
                f"- peak memory (process peak RSS): {d['peak_rss_mb']} MB\n")
