"""End-to-end diffusion sampling: biogen's fused ops vs the same network on torch ops vs diffusers.

The workload is RNA-CDM's base stage at CPU scale (preset ``rnacdm_base_cpu``: 64x64 RGB,
4 levels, attention at 16x16 and 8x8, cross-attention to the 200-d RNA latent): a full sampling loop
of ``BIOGEN_BENCH_STEPS`` (default 50) DDIM steps with classifier-free guidance (w = 3, so every
step is one forward at twice the batch) for ``BIOGEN_BENCH_BATCH`` (default 4) images.

- ``biogen``: default backends (C++/CUDA fused GroupNorm+FiLM+SiLU, fused sampler step).
- ``torch``: the identical network and weights under ``biogen.ops.use_backend("torch")`` — the
  baseline of the ratio (same run).
- ``diffusers``: ``UNet2DModel`` of the same widths/levels/attention + ``DDIMScheduler`` (skipped
  when diffusers is not importable); its FLOPs are recorded next to ours.

Run: ``PYTHONPATH=python pytest benchmarks/bench_diffusion.py --benchmark-only -s``.
extra_info: seconds per loop, speedup vs torch, GFLOP per forward, peak memory (CUDA: max
allocated; CPU: peak resident-set growth during the loop, sampled every 2 ms).
"""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch

import biogen.ops
from biogen.diffusion import DDIMScheduler, sample
from biogen.nn import UNet, unet_preset

STEPS = int(os.environ.get("BIOGEN_BENCH_STEPS", "50"))
BATCH = int(os.environ.get("BIOGEN_BENCH_BATCH", "4"))
GUIDANCE = 3.0
PRESET = "rnacdm_base_cpu"
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
RESULTS: dict[str, float] = {}


class PeakMemory:
    """Peak memory of a block: CUDA max-allocated, or the CPU resident set sampled by a thread."""

    def __enter__(self):
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        self.base = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _poll(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc):
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self._rss())
        self.mb = (self.peak - self.base) / 2**20


def _flops(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        fn()
    return counter.get_total_flops() / 1e9


@pytest.fixture(scope="module")
def biogen_unet():
    torch.manual_seed(0)
    return UNet(unet_preset(PRESET)).to(DEVICE).eval()


def _biogen_loop(unet):
    cond = torch.randn(BATCH, 200, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    return sample(unet, DDIMScheduler(), (BATCH, 3, 64, 64), cond=cond, guidance_scale=GUIDANCE, steps=STEPS,
                  generator=torch.Generator(DEVICE).manual_seed(0), progress=False)


def _record(benchmark, name, fn, gflop):
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        benchmark.pedantic(fn, rounds=1, iterations=1, warmup_rounds=0)
        seconds = time.perf_counter() - t0
    RESULTS[name] = seconds
    info = benchmark.extra_info
    info.update(seconds_per_loop=seconds, steps=STEPS, batch=BATCH, guidance=GUIDANCE, preset=PRESET,
                gflop_per_forward=gflop, peak_memory_mb=mem.mb, device=str(DEVICE),
                torch_threads=torch.get_num_threads())
    if name != "torch" and "torch" in RESULTS:
        info["speedup_vs_torch_backend"] = RESULTS["torch"] / seconds
    print(f"\n{name}: {seconds:.2f} s / loop, {gflop:.2f} GFLOP / forward, peak {mem.mb:.0f} MiB"
          + (f", {info['speedup_vs_torch_backend']:.2f}x vs torch backend" if "speedup_vs_torch_backend" in info else ""))


def _biogen_gflop(unet):
    x = torch.randn(2 * BATCH, 3, 64, 64, device=DEVICE)
    t = torch.full((2 * BATCH,), 500, device=DEVICE)
    c = torch.randn(2 * BATCH, 200, device=DEVICE)
    return _flops(lambda: unet(x, t, c))


# the torch baseline runs first so the others can report their ratio against it
@pytest.mark.parametrize("backend", ["torch", "biogen"])
def test_sampling_loop(benchmark, biogen_unet, backend):
    benchmark.group = "diffusion-sampling"
    gflop = _biogen_gflop(biogen_unet)
    if backend == "torch":
        with biogen.ops.use_backend("torch"):
            _record(benchmark, "torch", lambda: _biogen_loop(biogen_unet), gflop)
    else:
        _record(benchmark, "biogen", lambda: _biogen_loop(biogen_unet), gflop)


def test_sampling_loop_diffusers(benchmark):
    diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed (pip install diffusers)")
    benchmark.group = "diffusion-sampling"
    cfg = unet_preset(PRESET)
    widths = tuple(cfg.base_channels * m for m in cfg.channel_mult)
    attn = set(cfg.attention_levels)
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=64, in_channels=3, out_channels=3, layers_per_block=cfg.num_res_blocks,
        block_out_channels=widths, norm_num_groups=cfg.num_groups, resnet_time_scale_shift="scale_shift",
        attention_head_dim=widths[-1] // cfg.num_heads,
        down_block_types=tuple("AttnDownBlock2D" if i in attn else "DownBlock2D" for i in range(len(widths))),
        up_block_types=tuple("AttnUpBlock2D" if i in attn else "UpBlock2D" for i in reversed(range(len(widths)))),
    ).to(DEVICE).eval()
    sched = diffusers.DDIMScheduler()

    def loop():
        sched.set_timesteps(STEPS)
        x = torch.randn((BATCH, 3, 64, 64), generator=torch.Generator(DEVICE).manual_seed(0), device=DEVICE)
        with torch.no_grad():
            for t in sched.timesteps:
                out = unet(torch.cat([x, x]), t).sample
                c, u = out.chunk(2)
                x = sched.step(u + GUIDANCE * (c - u), t, x).prev_sample
        return x

    x = torch.randn(2 * BATCH, 3, 64, 64, device=DEVICE)
    gflop = _flops(lambda: unet(x, torch.tensor(500, device=DEVICE)))
    _record(benchmark, "diffusers", loop, gflop)
    benchmark.extra_info["diffusers_version"] = diffusers.__version__
    if "biogen" in RESULTS:
        benchmark.extra_info["biogen_speedup_vs_diffusers"] = RESULTS["diffusers"] / RESULTS["biogen"]
        print(f"biogen vs diffusers: {RESULTS['diffusers'] / RESULTS['biogen']:.2f}x")
    benchmark.extra_info["note"] = "UNet2DModel has no cross-attention; guidance = batched forward at 2x batch"
