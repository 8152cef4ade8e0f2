"""RNA-CDM cascade sampling (``cpu`` preset: 32 px base -> 64 px SR): tiles/s with biogen's fused
kernels (GroupNorm+FiLM+SiLU, sampler step, attention) vs the same weights under
``biogen.ops.use_backend("torch")`` (the baseline of the ratio, measured in the same run).

Cases:
- ``dpm25``: DPM-Solver++(2M), 25 steps per stage, guidance 3, batch ``BIOGEN_BENCH_BATCH`` (default 8);
- ``ddpm1000``: DDPM ancestral, 1000 steps per stage (the original sampler), guidance 3, **batch 1**
  so that it runs in minutes on a CPU. Set ``BIOGEN_BENCH_DDPM_STEPS`` to shorten it (recorded).

Run: ``PYTHONPATH=python pytest benchmarks/bench_rnacdm.py --benchmark-only -s``.
extra_info: seconds, tiles/s, speedup vs torch backend, peak memory (CUDA max allocated or CPU RSS
growth), steps, batch.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
import torch

import biogen.ops
from biogen.models.rna_cdm import RNACDM, cascade_preset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_diffusion import PeakMemory  # noqa: E402  (shared peak-memory probe, same definition)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BATCH = int(os.environ.get("BIOGEN_BENCH_BATCH", "8"))
DDPM_STEPS = int(os.environ.get("BIOGEN_BENCH_DDPM_STEPS", "1000"))
LATENT = 200
CASES = {"dpm25": dict(scheduler="dpmsolver++", steps=25, batch=BATCH),
         "ddpm1000": dict(scheduler="ddpm", steps=DDPM_STEPS, batch=1)}
RESULTS: dict[tuple[str, str], float] = {}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = RNACDM(cascade_preset("cpu", LATENT))
    with torch.no_grad():  # untrained UNets output zeros (zero-init last layers); give them real work
        for p in m.parameters():
            p.add_(0.02 * torch.randn_like(p))
    m = m.to(DEVICE).eval()
    m.sample(torch.randn(2, LATENT), steps=2)  # warm-up: allocator and first-call costs stay out of the timings
    return m


def _run(model, case):
    c = CASES[case]
    z = torch.randn(c["batch"], LATENT, generator=torch.Generator().manual_seed(1))
    return model.sample(z, scheduler=c["scheduler"], steps=c["steps"], guidance_scale=3.0,
                        generator=torch.Generator().manual_seed(0))


# torch first, so the fused run can report its ratio against the same-run baseline
@pytest.mark.parametrize("backend", ["torch", "biogen"])
@pytest.mark.parametrize("case", list(CASES))
def test_cascade_sampling(benchmark, model, case, backend):
    benchmark.group = f"rnacdm-{case}"
    c = CASES[case]

    def go():
        if backend == "torch":
            with biogen.ops.use_backend("torch"):
                return _run(model, case)
        return _run(model, case)

    with PeakMemory() as mem:
        t0 = time.perf_counter()
        benchmark.pedantic(go, rounds=1, iterations=1, warmup_rounds=0)
        seconds = time.perf_counter() - t0
    RESULTS[(case, backend)] = seconds
    info = benchmark.extra_info
    info.update(case=case, scheduler=c["scheduler"], steps_per_stage=c["steps"], batch=c["batch"],
                seconds=seconds, tiles_per_s=c["batch"] / seconds, peak_memory_mb=mem.mb, device=str(DEVICE),
                torch_threads=torch.get_num_threads(), preset="cpu (32 -> 64 px)")
    if backend == "biogen" and (case, "torch") in RESULTS:
        info["speedup_vs_torch_backend"] = RESULTS[(case, "torch")] / seconds
    print(f"\n{case} {backend}: {seconds:.2f} s, {c['batch'] / seconds:.3f} tiles/s, peak {mem.mb:.0f} MiB"
          + (f", {info['speedup_vs_torch_backend']:.2f}x vs torch" if "speedup_vs_torch_backend" in info else ""))
