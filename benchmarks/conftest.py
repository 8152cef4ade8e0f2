"""Shared by the benchmark suites: print each benchmark's extra_info (ratios, GFLOP/s, peak memory)
after pytest-benchmark's timing table, which has no column for them."""

from __future__ import annotations


def _fmt(v):
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
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
