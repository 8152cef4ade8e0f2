"""Schedulers against closed forms (always) and against diffusers' full seeded loops (if installed)."""

import math

import numpy as np
import pytest
import torch

from biogen.diffusion import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    SchedulerConfig,
    make_scheduler,
)

SCHEDULERS = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler, "dpm": DPMSolverMultistepScheduler}


def _x0(shape=(3, 2, 5, 4), seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=g) * 1.6 - 0.8)  # inside the clip range


# ----------------------------------------------------------------------------- schedules


def test_linear_and_scaled_linear_alphas_cumprod():
    n = 1000
    lin = DDPMScheduler(beta_schedule="linear").alphas_cumprod.double()
    b = np.linspace(1e-4, 0.02, n)
    np.testing.assert_allclose(lin.numpy(), np.cumprod(1 - b), rtol=2e-5)
    sl = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).alphas_cumprod.double()
    b = np.linspace(0.00085**0.5, 0.012**0.5, n) ** 2
    np.testing.assert_allclose(sl.numpy(), np.cumprod(1 - b), rtol=2e-5)


def test_cosine_alphas_cumprod_matches_closed_form():
    n = 1000
    acp = DDPMScheduler(beta_schedule="squaredcos_cap_v2").alphas_cumprod.double().numpy()
    f = lambda t: np.cos((t / n + 0.008) / 1.008 * np.pi / 2) ** 2
    closed = f(np.arange(1, n + 1)) / f(0)
    # the 0.999 beta cap only bites at the very end of the schedule
    np.testing.assert_allclose(acp[:990], closed[:990], rtol=1e-4, atol=1e-7)
    assert np.all(np.diff(acp) < 0)


# ----------------------------------------------------------------------------- closed-form steps


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
def test_ddim_with_true_eps_recovers_x0(spacing, pred):
    s = DDIMScheduler(clip_sample=False, timestep_spacing=spacing, prediction_type=pred)
    s.set_timesteps(20)
    x0 = _x0()
    eps = torch.randn_like(x0)
    t0 = int(s.timesteps[0])
    x = s.add_noise(x0, eps, t0)
    for t in s.timesteps:
        a = float(s.alphas_cumprod.double()[t]) ** 0.5
        m = eps if pred == "epsilon" else a * eps - (1 - a * a) ** 0.5 * x0
        out = s.step(m, t, x)
        x = out.prev_sample
        torch.testing.assert_close(out.pred_original_sample, x0, atol=2e-4, rtol=0)
    torch.testing.assert_close(x, x0, atol=5e-5, rtol=0)  # float32 round-off over 20 steps


def test_ddpm_step_is_the_gaussian_posterior():
    s = DDPMScheduler(prediction_type="sample", clip_sample=False)
    s.set_timesteps(10)
    t, p = int(s.timesteps[3]), int(s.timesteps[4])
    acp = s.alphas_cumprod.double()
    a_t, a_p = float(acp[t]), float(acp[p])
    x0 = _x0().double()
    xt = torch.randn_like(x0)
    z = torch.randn_like(x0)
    out = s.step(x0.float(), t, xt.float(), variance_noise=z.float())
    # posterior q(x_p | x_t, x0) by Gaussian conditioning: x_t | x_p ~ N(sqrt(alpha) x_p, 1 - alpha)
    alpha = a_t / a_p
    prec = alpha / (1 - alpha) + 1 / (1 - a_p)
    var = 1 / prec
    mean = var * (math.sqrt(alpha) * xt / (1 - alpha) + math.sqrt(a_p) * x0 / (1 - a_p))
    torch.testing.assert_close(out.prev_sample.double(), mean + math.sqrt(var) * z, atol=1e-5, rtol=1e-5)
    c_x0, c_s, v = s.posterior(t)
    assert v == pytest.approx(var, rel=1e-6)


def test_ddpm_noise_statistics_and_no_noise_at_zero():
    s = DDPMScheduler(prediction_type="sample", clip_sample=False)
    s.set_timesteps(50)
    x0 = torch.zeros(4000, 1, 1, 1)
    xt = torch.zeros_like(x0)
    t = int(s.timesteps[10])
    out = s.step(x0, t, xt, generator=torch.Generator().manual_seed(0))
    _, _, var = s.posterior(t)
    assert out.prev_sample.var().item() == pytest.approx(var, rel=0.08)
    last = s.step(x0 + 0.3, 0, xt + 1.0)  # t = 0: no noise, posterior mean is x0 itself
    torch.testing.assert_close(last.prev_sample, x0 + 0.3)


@pytest.mark.parametrize("eta", [0.0, 0.4, 1.0])
@pytest.mark.parametrize("pred", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("clip", [False, True])
def test_ddim_step_matches_float64_formula(eta, pred, clip):
    """Song et al. eq. 12 in float64, written here: x_p = sqrt(abar_p) x0 + sqrt(1 - abar_p - std^2) eps
    + std z, std = eta sqrt((1 - abar_p) / (1 - abar_t)) sqrt(1 - abar_t / abar_p); with clipping, x0 is
    clamped and eps stays the network's (diffusers' DDIM). Every step of the schedule, the last one to
    abar_0 (set_alpha_to_one=False)."""
    s = DDIMScheduler(clip_sample=clip, prediction_type=pred, set_alpha_to_one=False, clip_sample_range=1.0)
    s.set_timesteps(10)
    acp = s.alphas_cumprod.double()
    g = torch.Generator().manual_seed(11)
    ts = s.timesteps.tolist()
    bit = False
    for i, t in enumerate(ts):
        a_t = float(acp[t])
        a_p = float(acp[ts[i + 1]]) if i + 1 < len(ts) else float(acp[0])
        x, m, z = (torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64) * 1.5 for _ in range(3))
        at, st = math.sqrt(a_t), math.sqrt(1 - a_t)
        x0, eps = {"epsilon": ((x - st * m) / at, m), "sample": (m, (x - at * m) / st),
                   "v_prediction": (at * x - st * m, at * m + st * x)}[pred]
        if clip:
            bit |= bool((x0.abs() > 1).any())
            x0 = x0.clamp(-1, 1)
        std = eta * math.sqrt((1 - a_p) / (1 - a_t) * (1 - a_t / a_p))
        want = math.sqrt(a_p) * x0 + math.sqrt(1 - a_p - std**2) * eps + std * z
        out = s.step(m.float(), t, x.float(), variance_noise=z.float(), eta=eta)
        scale = 1 + float(want.abs().max())
        torch.testing.assert_close(out.pred_original_sample.double(), x0, atol=2e-5 * scale, rtol=0)
        torch.testing.assert_close(out.prev_sample.double(), want, atol=2e-5 * scale, rtol=0)
    assert bit == clip


def test_dpm_first_order_equals_ddim_eta0():
    dpm = DPMSolverMultistepScheduler(solver_order=1, timestep_spacing="trailing", thresholding=False)
    ddim = DDIMScheduler(timestep_spacing="trailing", clip_sample=False)
    dpm.set_timesteps(25)
    ddim.set_timesteps(25)
    assert torch.equal(dpm.timesteps, ddim.timesteps)
    x_a = x_b = torch.randn(2, 3, 4, 4)
    for t in dpm.timesteps:
        eps_a = torch.tanh(x_a) * 0.7 + 0.01 * float(t) / 1000
        eps_b = torch.tanh(x_b) * 0.7 + 0.01 * float(t) / 1000
        x_a = dpm.step(eps_a, t, x_a).prev_sample
        x_b = ddim.step(eps_b, t, x_b).prev_sample
        torch.testing.assert_close(x_a, x_b, atol=2e-5, rtol=1e-5)


def _ode_solve(scheduler, steps, x):
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        x = scheduler.step(torch.tanh(1.5 * x) * 0.8, t, x).prev_sample
    return x


def test_dpm_second_order_converges_faster_than_first_order():
    x = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(5))
    fine = _ode_solve(DPMSolverMultistepScheduler(solver_order=1, timestep_spacing="trailing"), 1000, x)
    err1 = (_ode_solve(DPMSolverMultistepScheduler(solver_order=1), 10, x) - fine).abs().max().item()
    err2 = (_ode_solve(DPMSolverMultistepScheduler(solver_order=2), 10, x) - fine).abs().max().item()
    assert err2 < 0.5 * err1, (err1, err2)


@pytest.mark.parametrize("name", ["ddpm", "ddim", "dpm"])
@pytest.mark.parametrize("steps", [1, 7, 30])
def test_exact_x0_model_ends_at_x0(name, steps):
    s = SCHEDULERS[name](prediction_type="sample")
    s.set_timesteps(steps)
    x0 = _x0()
    x = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(4)
    for t in s.timesteps:
        x = s.step(x0, t, x, generator=g).prev_sample
    torch.testing.assert_close(x, x0, atol=1e-5, rtol=0)


def test_guidance_one_equals_conditional_and_guided_equals_combination():
    s = DDIMScheduler(clip_sample=False)
    s.set_timesteps(10)
    x = torch.randn(2, 1, 4, 4)
    c, u = torch.randn_like(x), torch.randn_like(x)
    t = s.timesteps[2]
    torch.testing.assert_close(s.step(c, t, x, model_output_uncond=u, guidance_scale=1.0).prev_sample,
                               s.step(c, t, x).prev_sample)
    w = 3.0
    torch.testing.assert_close(s.step(c, t, x, model_output_uncond=u, guidance_scale=w).prev_sample,
                               s.step(u + w * (c - u), t, x).prev_sample, atol=1e-5, rtol=1e-5)


def test_dynamic_thresholding_and_clipping_bound_x0():
    x = torch.randn(3, 2, 4, 4) * 5
    m = torch.randn_like(x) * 5
    s = DDIMScheduler(prediction_type="sample", thresholding=True, sample_max_value=2.0)
    s.set_timesteps(10)
    x0 = s.step(m, s.timesteps[0], x).pred_original_sample
    flat = m.reshape(3, -1)
    q = torch.quantile(flat.abs(), 0.995, dim=1).clamp(1, 2.0)[:, None]
    torch.testing.assert_close(x0.reshape(3, -1), flat.clamp(-q, q) / q)
    s = DDIMScheduler(prediction_type="sample", clip_sample=True, clip_sample_range=0.5)
    s.set_timesteps(10)
    torch.testing.assert_close(s.step(m, s.timesteps[0], x).pred_original_sample, m.clamp(-0.5, 0.5))


def test_add_noise_formula_per_sample_timesteps():
    s = DDPMScheduler()
    x0, eps = torch.randn(3, 2, 2), torch.randn(3, 2, 2)
    t = torch.tensor([0, 500, 999])
    got = s.add_noise(x0, eps, t)
    acp = s.alphas_cumprod.double()[t].view(-1, 1, 1)
    torch.testing.assert_close(got.double(), acp.sqrt() * x0 + (1 - acp).sqrt() * eps, atol=1e-6, rtol=1e-6)
    assert torch.equal(s.scale_model_input(x0, 3), x0)


def test_default_timesteps_match_diffusers_conventions():
    s = DDIMScheduler()
    s.set_timesteps(50)
    assert s.timesteps[:3].tolist() == [980, 960, 940] and s.timesteps[-1].item() == 0
    d = DPMSolverMultistepScheduler()
    d.set_timesteps(50)
    assert d.timesteps[0].item() == 999 and len(d.timesteps) == 50 and d.timesteps[-1].item() == 20
    t = DDIMScheduler(timestep_spacing="trailing")
    t.set_timesteps(10)
    assert t.timesteps.tolist() == list(range(999, 0, -100))


# ----------------------------------------------------------------------------- errors


def test_errors_are_clear():
    with pytest.raises(ValueError, match="beta_schedule"):
        DDIMScheduler(beta_schedule="cosine")
    with pytest.raises(ValueError, match="prediction_type"):
        DDIMScheduler(prediction_type="eps")
    with pytest.raises(ValueError, match="timestep_spacing"):
        DDIMScheduler(timestep_spacing="uniform")
    with pytest.raises(TypeError, match="unknown option"):
        DDIMScheduler(num_steps=10)
    with pytest.raises(ValueError, match="solver_order"):
        DPMSolverMultistepScheduler(solver_order=3)
    with pytest.raises(ValueError, match="beta_start"):
        SchedulerConfig(beta_start=0.1, beta_end=0.01)
    with pytest.raises(ValueError, match="scheduler"):
        make_scheduler("euler")
    s = DDIMScheduler()
    x = torch.zeros(1, 1, 2, 2)
    with pytest.raises(RuntimeError, match="before set_timesteps"):
        s.step(x, 980, x)
    s.set_timesteps(50)
    with pytest.raises(ValueError, match="not in the schedule"):
        s.step(x, 981, x)
    with pytest.raises(ValueError, match="out of range"):
        s.step(x, 1000, x)
    with pytest.raises(ValueError, match="model_output must have the shape"):
        s.step(torch.zeros(1, 1, 2, 3), 980, x)
    with pytest.raises(ValueError, match="num_inference_steps"):
        s.set_timesteps(0)
    with pytest.raises(ValueError, match="timesteps must lie"):
        s.add_noise(x, x, 1000)


# ----------------------------------------------------------------------------- vs diffusers


def _model(x, t, cond):
    return torch.tanh(x * (0.8 + 0.2 * cond)) * 0.9 + 0.05 * math.sin(float(t) / 100.0) + 0.1 * cond


DIFFUSERS_CASES = [
    ("ddpm", {}),
    ("ddpm", {"prediction_type": "v_prediction", "beta_schedule": "squaredcos_cap_v2", "timestep_spacing": "trailing"}),
    ("ddpm", {"prediction_type": "sample", "thresholding": True, "sample_max_value": 1.5}),
    ("ddim", {"clip_sample": False}),
    ("ddim", {"prediction_type": "v_prediction", "beta_schedule": "scaled_linear", "timestep_spacing": "trailing",
              "clip_sample": False}),
    ("ddim", {"eta": 1.0, "steps_offset": 1, "set_alpha_to_one": False}),
    ("ddim", {"thresholding": True, "sample_max_value": 2.0, "eta": 0.5}),
    ("dpm", {}),
    ("dpm", {"prediction_type": "v_prediction", "beta_schedule": "squaredcos_cap_v2"}),
    ("dpm", {"prediction_type": "sample", "thresholding": True, "timestep_spacing": "leading", "steps": 12}),
]


@pytest.mark.parametrize("name,opts", DIFFUSERS_CASES)
def test_full_loop_matches_diffusers(name, opts):
    diffusers = pytest.importorskip("diffusers")
    opts = dict(opts)
    steps = opts.pop("steps", 25)
    eta = opts.pop("eta", None)
    ours = SCHEDULERS[name](**opts)
    ref_cls = {"ddpm": diffusers.DDPMScheduler, "ddim": diffusers.DDIMScheduler,
               "dpm": diffusers.DPMSolverMultistepScheduler}[name]
    ref = ref_cls(**opts)
    ours.set_timesteps(steps)
    ref.set_timesteps(steps)
    assert ours.timesteps.tolist() == ref.timesteps.tolist()
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(0)) * 1.5
    xa, xb = x.clone(), x.clone()
    ga, gb = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    w = 2.5
    extra = {} if eta is None else {"eta": eta}
    ref_extra = dict(extra)
    for t in ours.timesteps:
        ca, ua = _model(xa, t, 1.0), _model(xa, t, 0.0)
        out_a = ours.step(ca, t, xa, generator=ga, model_output_uncond=ua, guidance_scale=w, **extra)
        cb, ub = _model(xb, t, 1.0), _model(xb, t, 0.0)
        out_b = ref.step(ub + w * (cb - ub), t, xb, generator=gb, **ref_extra)
        torch.testing.assert_close(out_a.prev_sample, out_b.prev_sample, atol=1e-5, rtol=1e-5)
        xa, xb = out_a.prev_sample, out_b.prev_sample


# Every option of ours that mirrors a diffusers option, with clipping / thresholding biting:
# (scheduler, config, step options). diffusers' defaults come first (DDIM clip_sample=True: issue #18).
CLIPPING_CASES = [
    ("ddpm", {}, {}),
    ("ddpm", {"prediction_type": "v_prediction", "clip_sample_range": 0.8}, {}),
    ("ddpm", {"prediction_type": "sample", "timestep_spacing": "trailing"}, {}),
    ("ddpm", {"thresholding": True, "sample_max_value": 1.5}, {}),
    ("ddim", {}, {}),
    ("ddim", {"prediction_type": "sample"}, {}),
    ("ddim", {"prediction_type": "v_prediction", "clip_sample_range": 0.8}, {"eta": 0.7}),
    ("ddim", {"set_alpha_to_one": False, "steps_offset": 1}, {"eta": 1.0}),
    ("ddim", {}, {"use_clipped_model_output": True}),
    ("ddim", {"prediction_type": "v_prediction"}, {"use_clipped_model_output": True, "eta": 0.5}),
    ("ddim", {"thresholding": True, "sample_max_value": 2.0}, {}),
    ("ddim", {"thresholding": True, "sample_max_value": 2.0, "dynamic_thresholding_ratio": 0.9}, {"eta": 0.5}),
    ("ddim", {"thresholding": True, "sample_max_value": 2.0}, {"use_clipped_model_output": True}),
    ("dpm", {"thresholding": True, "sample_max_value": 2.0}, {}),
    ("dpm", {"prediction_type": "sample", "thresholding": True, "sample_max_value": 1.5}, {}),
    ("dpm", {"prediction_type": "v_prediction", "thresholding": True, "solver_order": 1}, {}),
]


def _x0_unclipped(pred, m, x, acp_t):
    a, s = acp_t**0.5, (1 - acp_t) ** 0.5
    return {"epsilon": (x - s * m) / a, "sample": m, "v_prediction": a * x - s * m}[pred]


@pytest.mark.parametrize("name,opts,step_opts", CLIPPING_CASES)
def test_loop_with_clipping_active_matches_diffusers(name, opts, step_opts):
    """30 seeded guided steps, step by step against diffusers (installed by the test extra), on a
    stand-in network whose x0 estimates leave the clip range: the test asserts that clipping (or
    dynamic thresholding beyond plain [-1, 1] clipping) changed x0 on some step."""
    diffusers = pytest.importorskip("diffusers")
    ours = SCHEDULERS[name](**opts)
    ref = {"ddpm": diffusers.DDPMScheduler, "ddim": diffusers.DDIMScheduler,
           "dpm": diffusers.DPMSolverMultistepScheduler}[name](**opts)
    ours.set_timesteps(30)
    ref.set_timesteps(30)
    assert ours.timesteps.tolist() == ref.timesteps.tolist()
    cfg = ours.config
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(0)) * 1.5
    xa, xb = x.clone(), x.clone()
    ga, gb = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    w = 2.5
    bit = 0
    for t in ours.timesteps:
        ca, ua = _model(xa, t, 1.0), _model(xa, t, 0.0)
        out_a = ours.step(ca, t, xa, generator=ga, model_output_uncond=ua, guidance_scale=w, **step_opts)
        cb, ub = _model(xb, t, 1.0), _model(xb, t, 0.0)
        m = ub + w * (cb - ub)
        raw = _x0_unclipped(cfg.prediction_type, m, xb, ref.alphas_cumprod[t])
        if cfg.thresholding:
            q = torch.quantile(raw.reshape(2, -1).abs(), cfg.dynamic_thresholding_ratio, dim=1)
            bit += int(bool((q > 1.05).any()))  # the rescaling regime, not mere [-1, 1] clipping
        else:
            bit += int(bool((raw.abs() > cfg.clip_sample_range * 1.05).any()))
        out_b = ref.step(m, t, xb, generator=gb, **step_opts)
        torch.testing.assert_close(out_a.prev_sample, out_b.prev_sample, atol=1e-5, rtol=1e-5)
        xa, xb = out_a.prev_sample, out_b.prev_sample
    assert bit >= 3, f"clipping / thresholding changed x0 on only {bit} of 30 steps"


@pytest.mark.parametrize("name", ["ddpm", "ddim", "dpm"])
@pytest.mark.parametrize("pred", ["epsilon", "sample", "v_prediction"])
def test_loop_same_under_torch_backend(name, pred):
    """The fused op's default backend and the torch reference give the same trajectory."""
    import biogen.ops

    def loop():
        s = SCHEDULERS[name](prediction_type=pred, clip_sample=False)
        s.set_timesteps(8)
        x = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(0))
        g = torch.Generator().manual_seed(1)
        for t in s.timesteps:
            x = s.step(torch.tanh(x) * 0.9, t, x, generator=g).prev_sample
        return x

    fast = loop()
    with biogen.ops.use_backend("torch"):
        ref = loop()
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)
