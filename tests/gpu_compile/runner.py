"""Compiles recorded launches for sm_80 / sm_90 and prints the results as JSON (one line).

Runs as ``python -m tests.gpu_compile.runner SPEC`` in a process without TRITON_INTERPRET (the
tests start it so); SPEC is JSON: ``{"cases": [[op, dtype, head_dim, m, causal, unknown, relu],
...], "archs": ["sm80", ...], "fallbacks": bool}`` for the matrix, or ``{"probe": "oversized" | "no_dot"}`` for the
checks that must flag a bad kernel.
"""

from __future__ import annotations

import json
import os
import sys

import torch

from biogen.ops.triton import _common, group_norm, masked_attention

from .aot import compile_launch
from .cases import ARCHS, Case, launches


def matrix(cases: list[Case], archs: list[str], fallbacks: bool = True) -> list[dict]:
    out = []
    for case in cases:
        for arch_name in archs:
            arch = ARCHS[arch_name]
            seen = set()
            for launch in launches(case, arch):
                for config, est in launch.plan.candidates:
                    key = (launch.name, str(config), tuple(sorted((k, str(v)) for k, v in launch.consts.items())))
                    if key in seen or est > arch.smem_per_block:  # a plan never picks what does not fit
                        continue
                    if not fallbacks and config != launch.config:
                        continue
                    seen.add(key)
                    r = compile_launch(launch, arch, config)
                    out.append(dict(case=case.id, dtype=case.dtype, arch=arch_name, arch_limit=arch.smem_per_block,
                                    kernel=r.kernel, config=r.config, chosen=config == launch.config, shared=r.shared,
                                    estimate=est, registers=r.registers, spill_stores=r.spill_stores,
                                    spill_loads=r.spill_loads, stack=r.stack, mma_sync=r.mma_sync, wgmma=r.wgmma))
    return out


def probe(name: str) -> dict:
    if name == "oversized":
        # 256 x 256 tiles with three stages: far past an A100 block's shared memory
        huge = _common.Config.of(8, 3, BM=256, BN=256)
        launch = [x for x in launches(Case("masked", "bf16", 128), _common.SM80) if x.name == "_fwd_kernel"][0]
        est = masked_attention._smem("fwd", torch.bfloat16, 128)(huge)
        try:
            r = compile_launch(launch, _common.SM80, huge)
        except Exception as exc:  # Triton may refuse it itself
            return dict(error=str(exc)[-500:], estimate=est)
        return dict(shared=r.shared, estimate=est)
    if name == "no_dot":
        x = torch.empty(2, 32, 8, 8, dtype=torch.bfloat16, device="meta")
        w = torch.empty(32, dtype=torch.float32, device="meta")
        with _common.recording(_common.SM90) as rec:
            group_norm.forward(x, w, w, None, None, 8, 1e-5, "silu")
        gn = compile_launch(rec[0], _common.SM90)
        fwd = [x for x in launches(Case("masked", "bf16", 64), _common.SM90) if x.name == "_fwd_kernel"][0]
        att = compile_launch(fwd, _common.SM90)
        return dict(group_norm=[gn.mma_sync, gn.wgmma], attention=[att.mma_sync, att.wgmma])
    raise ValueError(name)


def main() -> None:
    assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run without TRITON_INTERPRET"
    spec = json.loads(sys.argv[1])
    if "probe" in spec:
        res = probe(spec["probe"])
    else:
        res = matrix([Case(*c) for c in spec["cases"]], spec["archs"], spec.get("fallbacks", True))
    print(json.dumps(res))


if __name__ == "__main__":
    main()
