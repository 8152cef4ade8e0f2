"""UNet blocks, training signal, classifier-free guidance plumbing and the sampling loop."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import biogen.ops
from biogen.diffusion import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, cfg_forward, sample
from biogen.nn import (
    CrossAttention,
    Downsample,
    ResBlock,
    SelfAttention,
    UNet,
    UNetConfig,
    Upsample,
    timestep_embedding,
)

TINY = dict(in_channels=1, out_channels=1, base_channels=16, channel_mult=(1, 2), num_res_blocks=1,
            attention_levels=(1,), num_heads=2, num_groups=4)


def _randomize(module, std=0.15, seed=0):
    """Zero-initialised output layers would make many checks vacuous: give every weight a value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


def test_timestep_embedding_formula():
    t = torch.tensor([0, 7, 999])
    e = timestep_embedding(t, 10)
    k = torch.arange(5, dtype=torch.float64)
    f = torch.exp(-math.log(10000.0) * k / 5)
    want = torch.cat([torch.cos(t[:, None] * f), torch.sin(t[:, None] * f)], dim=1)
    torch.testing.assert_close(e.double(), want, atol=1e-5, rtol=1e-5)
    assert timestep_embedding(t, 7).shape == (3, 7)


def test_block_shapes():
    x, temb = torch.randn(2, 8, 6, 6), torch.randn(2, 32)
    assert ResBlock(8, 16, 32, 4)(x, temb).shape == (2, 16, 6, 6)
    assert ResBlock(8, 8, 32, 4, dropout=0.1)(x, temb).shape == (2, 8, 6, 6)
    assert SelfAttention(8, 2, 4)(x).shape == x.shape
    assert CrossAttention(8, 5, 2, 4)(x, torch.randn(2, 3, 5)).shape == x.shape
    assert Downsample(8)(x).shape == (2, 8, 3, 3)
    assert Upsample(8)(x).shape == (2, 8, 12, 12)
    u = UNet(**{**TINY, "channel_mult": (1, 2, 2), "cond_dim": 6, "cond_tokens": 3, "out_channels": 2})
    y = u(torch.randn(3, 1, 16, 12), torch.tensor([1, 50, 999]), torch.randn(3, 3, 6))
    assert y.shape == (3, 2, 16, 12)


def test_resblock_matches_unfused_torch_chain():
    blk = _randomize(ResBlock(8, 12, 16, 4))
    x, temb = torch.randn(2, 8, 5, 5), torch.randn(2, 16)
    h = blk.conv1(F.silu(F.group_norm(x, 4, blk.norm1.weight, blk.norm1.bias)))
    scale, shift = blk.emb(F.silu(temb)).chunk(2, dim=1)
    h = F.group_norm(h, 4, blk.norm2.weight, blk.norm2.bias) * (1 + scale[..., None, None]) + shift[..., None, None]
    want = blk.skip(x) + blk.conv2(F.silu(h))
    torch.testing.assert_close(blk(x, temb), want, atol=1e-5, rtol=1e-5)


def test_self_attention_matches_softmax_attention():
    blk = _randomize(SelfAttention(8, 2, 4))
    x = torch.randn(2, 8, 3, 5)
    h = F.group_norm(x, 4, blk.norm.weight, blk.norm.bias)
    q, k, v = blk.qkv(h).flatten(2).chunk(3, dim=1)  # (B, C, L)
    q, k, v = (t.reshape(2, 2, 4, 15) for t in (q, k, v))  # (B, heads, hd, L)
    a = torch.softmax(torch.einsum("bhdi,bhdj->bhij", q, k) / 2.0, dim=-1)
    o = torch.einsum("bhij,bhdj->bhdi", a, v).reshape(2, 8, 3, 5)
    torch.testing.assert_close(blk(x), x + blk.proj(o), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("heads,tokens", [(1, 1), (2, 3), (4, 5)])
def test_cross_attention_matches_torch_multihead_attention(heads, tokens):
    """nn.MultiheadAttention with the block's weights copied in, in float64: pixels query the
    condition tokens (kdim = vdim = cond_dim), plus the residual."""
    C, D, G = 8, 6, 4
    blk = _randomize(CrossAttention(C, D, heads, G), std=0.4).double()
    x = torch.randn(2, C, 3, 5, dtype=torch.float64)
    cond = torch.randn(2, tokens, D, dtype=torch.float64)
    mha = nn.MultiheadAttention(C, heads, kdim=D, vdim=D, batch_first=True, dtype=torch.float64)
    with torch.no_grad():
        mha.q_proj_weight.copy_(blk.q.weight)
        mha.k_proj_weight.copy_(blk.kv.weight[:C])
        mha.v_proj_weight.copy_(blk.kv.weight[C:])
        mha.in_proj_bias.copy_(torch.cat([blk.q.bias, blk.kv.bias]))
        mha.out_proj.weight.copy_(blk.proj.weight)
        mha.out_proj.bias.copy_(blk.proj.bias)
    h = F.group_norm(x, G, blk.norm.weight, blk.norm.bias).flatten(2).transpose(1, 2)  # (B, H*W, C)
    o, _ = mha(h, cond, cond, need_weights=False)
    want = x + o.transpose(1, 2).reshape(x.shape)
    with torch.no_grad():
        got = blk(x, cond)
    assert float((got - x).abs().max()) > 0.1  # the attention branch is not vacuous
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


def test_config_validation():
    with pytest.raises(ValueError, match="divisible by num_groups"):
        UNetConfig(base_channels=24, num_groups=32)
    with pytest.raises(ValueError, match="attention_levels"):
        UNetConfig(channel_mult=(1, 2), attention_levels=(2,))
    with pytest.raises(ValueError, match="num_heads"):
        UNetConfig(base_channels=16, num_groups=4, num_heads=3, channel_mult=(1,), attention_levels=())
    u = UNet(**TINY, cond_dim=4)
    with pytest.raises(ValueError, match="divisible by 2"):
        u(torch.randn(1, 1, 7, 8), torch.tensor([1]))
    with pytest.raises(ValueError, match="cond must have shape"):
        u(torch.randn(1, 1, 8, 8), torch.tensor([1]), torch.randn(1, 5))
    with pytest.raises(ValueError, match="cond_drop_mask"):
        u(torch.randn(1, 1, 8, 8), torch.tensor([1]), torch.randn(1, 4), torch.tensor([1]))
    with pytest.raises(ValueError, match="unconditional"):
        UNet(**TINY)(torch.randn(1, 1, 8, 8), torch.tensor([1]), torch.randn(1, 4))


def test_null_condition_and_batched_cfg_forward():
    u = _randomize(UNet(**TINY, cond_dim=4, cond_tokens=2)).eval()
    x, t, c = torch.randn(3, 1, 8, 8), torch.tensor([5, 300, 900]), torch.randn(3, 2, 4)
    drop = torch.tensor([True, False, True])
    mixed = u(x, t, c, drop)
    torch.testing.assert_close(mixed[drop], u(x, t)[drop], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[~drop], u(x, t, c)[~drop], atol=1e-5, rtol=1e-5)
    m_c, m_u = cfg_forward(u, x, t, c)
    torch.testing.assert_close(m_c, u(x, t, c), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m_u, u(x, t), atol=1e-5, rtol=1e-5)
    assert (m_c - m_u).abs().max() > 1e-3  # the condition matters


def _manual_ddim(u, shape, cond, w, steps, seed):
    s = DDIMScheduler(clip_sample=False)
    s.set_timesteps(steps)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        for t in s.timesteps:
            c, n = u(x, t, cond), u(x, t)
            x = s.step(n + w * (c - n), t, x).prev_sample
    return x


@pytest.mark.parametrize("w", [1.0, 3.0])
def test_sample_guidance_matches_manual_loop(w):
    u = _randomize(UNet(**TINY, cond_dim=4), std=0.05).eval()
    cond = torch.randn(2, 4)
    got = sample(u, DDIMScheduler(clip_sample=False), (2, 1, 8, 8), cond=cond, guidance_scale=w, steps=6,
                 generator=torch.Generator().manual_seed(11), progress=False)
    want = _manual_ddim(u, (2, 1, 8, 8), cond, w, 6, 11)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("sched", [DDPMScheduler, DDIMScheduler, DPMSolverMultistepScheduler])
def test_sampling_is_deterministic_with_a_seed(sched):
    u = _randomize(UNet(**TINY, cond_dim=4), std=0.05)
    cond = torch.randn(2, 4)
    run = lambda seed: sample(u, sched(), (2, 1, 8, 8), cond=cond, guidance_scale=2.0, steps=5,  # noqa: E731
                              generator=torch.Generator().manual_seed(seed), progress=False,
                              dynamic_threshold=0.9)
    a, b, c = run(3), run(3), run(4)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert u.training  # restored after sampling in eval mode


def test_backend_equivalence_torch_vs_default():
    u = _randomize(UNet(**{**TINY, "base_channels": 8, "channel_mult": (1, 2, 2)}, cond_dim=4, cond_tokens=2),
                   std=0.1).eval()
    x, t, c = torch.randn(2, 1, 8, 8), torch.tensor([10, 700]), torch.randn(2, 2, 4)
    with torch.no_grad():
        fast = u(x, t, c)
        with biogen.ops.use_backend("torch"):
            ref = u(x, t, c)
    torch.testing.assert_close(fast, ref, atol=1e-4, rtol=1e-4)
    # and gradients flow through the fused ops
    u.train()
    u(x, t, c).square().mean().backward()
    assert all(p.grad is not None for p in u.parameters() if p.requires_grad and p is not u.null_cond)


def _blobs(n, size, g):
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    cy, cx = (torch.rand(2, n, 1, 1, generator=g) * (size - 4) + 2)
    r = torch.rand(n, 1, 1, generator=g) * 1.5 + 1.5
    img = torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r**2))
    return (img * 2 - 1)[:, None]


def test_unet_training_reduces_denoising_loss():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    u = UNet(**TINY)
    sched = DDPMScheduler(num_train_timesteps=200)
    x_eval = _blobs(64, 8, g)
    n_eval = torch.randn(x_eval.shape, generator=g)
    t_eval = torch.randint(0, 200, (64,), generator=g)

    def eval_loss():
        with torch.no_grad():
            u.eval()
            pred = u(sched.add_noise(x_eval, n_eval, t_eval), t_eval)
            u.train()
            return F.mse_loss(pred, n_eval).item()

    before = eval_loss()
    opt = torch.optim.Adam(u.parameters(), lr=3e-3)
    for _ in range(80):
        x0 = _blobs(16, 8, g)
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, 200, (16,), generator=g)
        loss = F.mse_loss(u(sched.add_noise(x0, noise, t), t), noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = eval_loss()
    # measured: before 0.99 (the zero-initialised output predicts 0), after 80 steps 0.12
    assert after < 0.4 * before, (before, after)


def test_presets_and_sample_argument_errors():
    from biogen.nn import UNET_PRESETS, unet_preset

    for name in UNET_PRESETS:
        cfg = unet_preset(name)
        assert cfg.cond_dim == 200 and cfg.downsample_factor == 8  # RNA latent, 64x64 -> 8x8
    assert unet_preset("rnacdm_base_cpu", base_channels=8).base_channels == 8
    with pytest.raises(ValueError, match="unknown UNet preset"):
        unet_preset("imagen")
    u = UNet(**TINY, cond_dim=4)
    with pytest.raises(ValueError, match="needs cond"):
        sample(u, DDIMScheduler(), (1, 1, 8, 8), guidance_scale=2.0, steps=2, progress=False)
    with pytest.raises(ValueError, match="dynamic_threshold"):
        sample(u, DDIMScheduler(), (1, 1, 8, 8), dynamic_threshold=1.5, steps=2, progress=False)
    with pytest.raises(ValueError, match="eta is a DDIM option"):
        sample(u, DDPMScheduler(), (1, 1, 8, 8), eta=0.5, steps=2, progress=False)
    with pytest.raises(ValueError, match="batch"):
        sample(u, DDIMScheduler(), (2, 1, 8, 8), cond=torch.randn(3, 4), steps=2, progress=False)
