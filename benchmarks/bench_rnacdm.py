"""RNA-CDM cascade sampling (``cpu`` preset: 32 px base -> 64 px SR): tiles/s with biogen's fused
kernels (GroupNorm+FiLM+SiLU, sampler step, attention) vs the same weights under
``biogen.ops.use_backend("torch")`` (the baseline of the ratio), interleaved in the same rounds after
a warm-up each (``conftest.compare``; ``BIOGEN_BENCH_ROUNDS``, default 3).

Cases:
- ``dpm25``: DPM-Solver++(2M), 25 steps per stage, guidance 3, batch ``BIOGEN_BENCH_BATCH`` (default 8);
- ``ddpm1000``: DDPM ancestral, 1000 steps per stage (the original sampler), guidance 3, **batch 1**
  so that it runs in minutes on a CPU. Set ``BIOGEN_BENCH_DDPM_STEPS`` to shorten it (recorded).

Run: ``PYTHONPATH=python pytest benchmarks/bench_rnacdm.py --benchmark-only -s``.
extra_info: seconds per cascade, tiles/s, speedup vs the torch backend with its range and IQR over
the rounds, peak memory of one cascade (CUDA max allocated or CPU resident high-water mark growth),
steps, batch.
"""

from __future__ import annotations

import os

import pytest
import torch

import biogen.ops
from biogen.models.rna_cdm import RNACDM, cascade_preset
from conftest import compare

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BATCH = int(os.environ.get("BIOGEN_BENCH_BATCH", "8"))
DDPM_STEPS = int(os.environ.get("BIOGEN_BENCH_DDPM_STEPS", "1000"))
LATENT = 200
CASES = {"dpm25": dict(scheduler="dpmsolver++", steps=25, batch=BATCH),
         "ddpm1000": dict(scheduler="ddpm", steps=DDPM_STEPS, batch=1)}
ROUNDS = int(os.environ.get("BIOGEN_BENCH_ROUNDS", "3"))


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


@pytest.mark.parametrize("case", list(CASES))
def test_cascade_sampling(benchmark, model, case):
    benchmark.group = f"rnacdm-{case}"
    c = CASES[case]

    def torch_backend():
        with biogen.ops.use_backend("torch"):
            return _run(model, case)

    res = compare(benchmark, {"torch-backend": torch_backend, "biogen": lambda: _run(model, case)},
                  ours="biogen", rounds=ROUNDS, memory=True, device=DEVICE)
    benchmark.extra_info.update(
        case=case, scheduler=c["scheduler"], steps_per_stage=c["steps"], batch=c["batch"], device=str(DEVICE),
        preset="cpu (32 -> 64 px)", tiles_per_s=c["batch"] / res.median("biogen"),
        torch_backend_tiles_per_s=c["batch"] / res.median("torch-backend"))
