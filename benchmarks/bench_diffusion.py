"""End-to-end diffusion sampling: biogen's fused ops vs diffusers' UNet2DModel + DDIMScheduler.

The workload is RNA-CDM's base stage at CPU scale (preset ``rnacdm_base_cpu``: 64x64 RGB,
4 levels, attention at 16x16 and 8x8, cross-attention to the 200-d RNA latent): a full sampling loop
of ``BIOGEN_BENCH_STEPS`` (default 50) DDIM steps with classifier-free guidance (w = 3, so every
step is one forward at twice the batch) for ``BIOGEN_BENCH_BATCH`` (default 4) images.

- ``diffusers``: ``UNet2DModel`` of the same widths/levels/attention + ``DDIMScheduler``, what a user
  would otherwise run: the headline ratio. Its GFLOP per forward are recorded next to ours (it has
  no cross-attention, so it does slightly less work). Skipped when diffusers is not importable.
- ``biogen``: default backends (C++/CUDA fused GroupNorm+FiLM+SiLU, fused sampler step).
- ``torch-backend``: the identical network and weights under ``biogen.ops.use_backend("torch")``
  (the secondary ratio: what the fused kernels alone buy).

The three loops run interleaved in the same rounds after a warm-up loop each (``conftest.compare``).
Run: ``PYTHONPATH=python pytest benchmarks/bench_diffusion.py --benchmark-only -s``.
extra_info: seconds per loop, the ratios with their range and IQR over the rounds, GFLOP per
forward, peak memory of one loop (CUDA: max allocated; CPU: resident high-water mark growth).
"""

from __future__ import annotations

import os

import pytest
import torch

import biogen.ops
from biogen.diffusion import DDIMScheduler, sample
from biogen.nn import UNet, unet_preset
from conftest import compare

STEPS = int(os.environ.get("BIOGEN_BENCH_STEPS", "50"))
BATCH = int(os.environ.get("BIOGEN_BENCH_BATCH", "4"))
ROUNDS = int(os.environ.get("BIOGEN_BENCH_ROUNDS", "3"))
GUIDANCE = 3.0
PRESET = "rnacdm_base_cpu"
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _flops(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        fn()
    return counter.get_total_flops() / 1e9


def _biogen_loop(unet):
    cond = torch.randn(BATCH, 200, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    return sample(unet, DDIMScheduler(), (BATCH, 3, 64, 64), cond=cond, guidance_scale=GUIDANCE, steps=STEPS,
                  generator=torch.Generator(DEVICE).manual_seed(0), progress=False)


def _diffusers_unet(diffusers):
    cfg = unet_preset(PRESET)
    widths = tuple(cfg.base_channels * m for m in cfg.channel_mult)
    attn = set(cfg.attention_levels)
    torch.manual_seed(0)
    return diffusers.UNet2DModel(
        sample_size=64, in_channels=3, out_channels=3, layers_per_block=cfg.num_res_blocks,
        block_out_channels=widths, norm_num_groups=cfg.num_groups, resnet_time_scale_shift="scale_shift",
        attention_head_dim=widths[-1] // cfg.num_heads,
        down_block_types=tuple("AttnDownBlock2D" if i in attn else "DownBlock2D" for i in range(len(widths))),
        up_block_types=tuple("AttnUpBlock2D" if i in attn else "UpBlock2D" for i in reversed(range(len(widths)))),
    ).to(DEVICE).eval()


def test_sampling_loop(benchmark):
    diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed (pip install diffusers)")
    benchmark.group = "diffusion-sampling"
    torch.manual_seed(0)
    ours = UNet(unet_preset(PRESET)).to(DEVICE).eval()
    theirs = _diffusers_unet(diffusers)
    sched = diffusers.DDIMScheduler()

    def diffusers_loop():
        sched.set_timesteps(STEPS)
        x = torch.randn((BATCH, 3, 64, 64), generator=torch.Generator(DEVICE).manual_seed(0), device=DEVICE)
        with torch.no_grad():
            for t in sched.timesteps:
                out = theirs(torch.cat([x, x]), t).sample
                c, u = out.chunk(2)
                x = sched.step(u + GUIDANCE * (c - u), t, x).prev_sample
        return x

    def torch_backend_loop():
        with biogen.ops.use_backend("torch"):
            return _biogen_loop(ours)

    x = torch.randn(2 * BATCH, 3, 64, 64, device=DEVICE)
    gflop_ours = _flops(lambda: ours(x, torch.full((2 * BATCH,), 500, device=DEVICE),
                                     torch.randn(2 * BATCH, 200, device=DEVICE)))
    gflop_theirs = _flops(lambda: theirs(x, torch.tensor(500, device=DEVICE)))
    res = compare(benchmark, {"diffusers": diffusers_loop, "biogen": lambda: _biogen_loop(ours),
                              "torch-backend": torch_backend_loop},
                  ours="biogen", rounds=ROUNDS, memory=True, device=DEVICE)
    benchmark.extra_info.update(steps=STEPS, batch=BATCH, guidance=GUIDANCE, preset=PRESET, device=str(DEVICE),
                                gflop_per_forward=gflop_ours, diffusers_gflop_per_forward=gflop_theirs,
                                diffusers_version=diffusers.__version__,
                                note="UNet2DModel has no cross-attention; guidance = batched forward at 2x batch")
    print(f"\nGFLOP per forward: biogen {gflop_ours:.2f}, diffusers {gflop_theirs:.2f}; peak MiB "
          + ", ".join(f"{k} {v:.0f}" for k, v in res.peak_mib.items()))
