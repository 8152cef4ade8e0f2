"""The README's compile/resource table from a ``BIOGEN_GPU_COMPILE_REPORT`` file (chosen configs).

``python -m tests.gpu_compile.table report.json``
"""

from __future__ import annotations

import json
import sys


def _tc(x: dict) -> str:
    parts = [f"{x['wgmma']} wgmma"] if x["wgmma"] else []
    parts += [f"{x['mma_sync']} mma.sync"] if x["mma_sync"] else []
    return " + ".join(parts) or "none"


def table(results: list[dict]) -> str:
    rows: dict = {}
    for r in results:
        if r["chosen"]:
            rows.setdefault((r["case"], r["kernel"]), {})[r["arch"]] = r
    lines = ["| case | kernel | config (sm_80 / sm_90) | shared KB (sm_80 / sm_90) | registers | spills, B/thread "
             "| tensor-core instructions (sm_80 / sm_90) |", "|---|---|---|---|---|---|---|"]
    for (case, kernel), by in rows.items():
        a, h = by.get("sm80"), by.get("sm90")

        def pair(f):
            return " / ".join(f(x) if x else "—" for x in (a, h))

        cfg = a["config"] if a and h and a["config"] == h["config"] else pair(lambda x: x["config"])
        shared = pair(lambda x: f"{x['shared'] / 1024:.0f}")
        regs = pair(lambda x: str(x["registers"]))
        spills = pair(lambda x: str(max(x["spill_stores"], x["spill_loads"])))
        lines.append(f"| {case} | `{kernel}` | {cfg} | {shared} | {regs} | {spills} | {pair(_tc)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        print(table(json.load(f)))
