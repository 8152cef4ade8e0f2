"""sampler_step on every backend against float64 re-computations written here (SPEC 1.3).

The oracle is numpy float64 code written from the definitions (not biogen's reference), plus the
textbook DDPM / DDIM / DPM-Solver++(2M) updates to check the coefficient mappings of the docstring.
"""

from __future__ import annotations


import numpy as np
import pytest
import torch

from biogen.ops import BackendUnavailableError, sampler_step
from biogen.ops.reference import sampler_step_ref
from biogen.ops.sampler import OP, _fwd_op

from .helpers import ALL_BACKENDS, assert_close_2x, interpreted, max_err, require


def naive_step(x, m, a, s, cs, cx0, ceps=None, cn=None, pred="epsilon", mu=None, w=1.0, px0=None, cpx=None,
               noise=None, clip=None, ratio=None, max_value=1.0, clipped_eps=False):
    """float64 numpy, one sample at a time. The c_eps term takes the network's eps (diffusers'
    DDIM), or with ``clipped_eps`` the eps re-derived from the clipped x0."""
    x, m = np.asarray(x, np.float64), np.asarray(m, np.float64)
    prev, x0s = np.empty_like(x), np.empty_like(x)
    for i in range(x.shape[0]):
        xi, mi = x[i], m[i]
        if mu is not None:
            mi = mu[i] + w * (mi - mu[i])
        if pred == "epsilon":
            x0 = (xi - s[i] * mi) / a[i]
        elif pred == "sample":
            x0 = mi.copy()
        else:
            x0 = a[i] * xi - s[i] * mi
        eps = (xi - a[i] * x0) / s[i]  # x = a x0 + s eps, before any clipping
        if ratio is not None:
            t = float(np.quantile(np.abs(x0).ravel(), ratio))  # numpy's default is linear interpolation
            t = min(max(t, 1.0), max_value)
            x0 = np.clip(x0, -t, t) / t
        elif clip is not None:
            x0 = np.clip(x0, -clip, clip)
        out = cs[i] * xi + cx0[i] * x0
        if ceps is not None:
            out = out + ceps[i] * ((xi - a[i] * x0) / s[i] if clipped_eps else eps)
        if px0 is not None:
            out = out + cpx[i] * px0[i]
        if noise is not None:
            out = out + cn[i] * noise[i]
        prev[i], x0s[i] = out, x0
    return torch.from_numpy(prev), torch.from_numpy(x0s)


def make_inputs(shape, *, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    t = {k: torch.randn(shape, generator=g, dtype=torch.float64) for k in ("x", "m", "mu", "px0", "noise")}
    B = shape[0]
    abar = torch.rand(B, generator=g, dtype=torch.float64) * 0.9 + 0.05
    c = {
        "alpha_t": abar.sqrt(), "sigma_t": (1 - abar).sqrt(),
        "c_sample": torch.randn(B, generator=g, dtype=torch.float64) * 0.5,
        "c_x0": torch.randn(B, generator=g, dtype=torch.float64),
        "c_eps": torch.randn(B, generator=g, dtype=torch.float64) * 0.5,
        "c_noise": torch.rand(B, generator=g, dtype=torch.float64) * 0.3,
        "c_prev_x0": torch.randn(B, generator=g, dtype=torch.float64) * 0.3,
    }
    t = {k: v.to(dtype=dtype, device=device) for k, v in t.items()}
    c = {k: v.float().to(device) for k, v in c.items()}  # coefficients are float32 in the API
    return t, c


def call(backend, t, c, *, pred="epsilon", guidance=None, extras=(), clip=None, ratio=None, max_value=1.0,
         clipped_eps=False):
    kw = dict(alpha_t=c["alpha_t"], sigma_t=c["sigma_t"], c_sample=c["c_sample"], c_x0=c["c_x0"],
              prediction_type=pred, clip_sample=clip, dynamic_threshold=ratio, sample_max_value=max_value,
              use_clipped_model_output=clipped_eps)
    if guidance is not None:
        kw.update(model_output_uncond=t["mu"], guidance_scale=guidance)
    if "eps" in extras:
        kw["c_eps"] = c["c_eps"]
    if "noise" in extras:
        kw.update(noise=t["noise"], c_noise=c["c_noise"])
    if "prev_x0" in extras:
        kw.update(prev_x0=t["px0"], c_prev_x0=c["c_prev_x0"])
    return sampler_step(t["x"], t["m"], backend=backend, **kw)


def oracle(t, c, *, pred="epsilon", guidance=None, extras=(), clip=None, ratio=None, max_value=1.0,
           clipped_eps=False):
    n = {k: v.double().cpu().numpy() for k, v in {**t, **c}.items()}
    return naive_step(
        n["x"], n["m"], n["alpha_t"], n["sigma_t"], n["c_sample"], n["c_x0"],
        ceps=n["c_eps"] if "eps" in extras else None, cn=n["c_noise"], pred=pred,
        mu=n["mu"] if guidance is not None else None, w=guidance if guidance is not None else 1.0,
        px0=n["px0"] if "prev_x0" in extras else None, cpx=n["c_prev_x0"],
        noise=n["noise"] if "noise" in extras else None, clip=clip, ratio=ratio, max_value=max_value,
        clipped_eps=clipped_eps)


def shape_for(backend):
    return (2, 3, 4, 4) if interpreted(backend) else (3, 4, 17, 9)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("pred", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("guidance", [None, 3.5])
@pytest.mark.parametrize("limit", ["none", "clip", "dynamic"])
def test_matches_float64_oracle(backend, pred, guidance, limit):
    dev = require(OP, backend, dtype=torch.float32)
    t, c = make_inputs(shape_for(backend), device=dev)
    lim = {"none": {}, "clip": {"clip": 1.0}, "dynamic": {"ratio": 0.9, "max_value": 2.5}}[limit]
    extras = ("eps", "noise", "prev_x0")
    prev, x0 = call(backend, t, c, pred=pred, guidance=guidance, extras=extras, **lim)
    ref_prev, ref_x0 = oracle(t, c, pred=pred, guidance=guidance, extras=extras, **lim)
    assert prev.shape == t["x"].shape and prev.dtype == torch.float32 and x0.dtype == torch.float32
    scale = 1 + float(ref_prev.abs().max())
    assert max_err(x0, ref_x0) < 2e-5 * (1 + float(ref_x0.abs().max()))
    assert max_err(prev, ref_prev) < 2e-5 * scale
    if limit != "none":
        assert float(x0.abs().max()) <= 1.0 + 1e-6


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("pred", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("limit", ["clip", "dynamic"])
@pytest.mark.parametrize("clipped_eps", [False, True])
def test_eps_term_network_or_clipped(backend, pred, limit, clipped_eps):
    """diffusers' DDIM: the direction term uses the network's eps even where x0 was clipped;
    use_clipped_model_output re-derives it from the clipped x0. Clipping must bite here, else
    the two choices could not be told apart."""
    dev = require(OP, backend, dtype=torch.float32)
    t, c = make_inputs(shape_for(backend), device=dev, seed=5)
    t["m"] = t["m"] * 2.0  # |x0| well past the clip range and the dynamic threshold's floor
    lim = {"clip": {"clip": 0.7}, "dynamic": {"ratio": 0.8, "max_value": 1.6}}[limit]
    prev, x0 = call(backend, t, c, pred=pred, guidance=1.5, extras=("eps",), clipped_eps=clipped_eps, **lim)
    ref_prev, ref_x0 = oracle(t, c, pred=pred, guidance=1.5, extras=("eps",), clipped_eps=clipped_eps, **lim)
    other_prev, _ = oracle(t, c, pred=pred, guidance=1.5, extras=("eps",), clipped_eps=not clipped_eps, **lim)
    scale = 1 + float(ref_prev.abs().max())
    assert max_err(other_prev, ref_prev) > 0.05 * scale  # clipping bit: the choice matters
    assert max_err(x0, ref_x0) < 2e-5 * (1 + float(ref_x0.abs().max()))
    assert max_err(prev, ref_prev) < 2e-5 * scale


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("extras", [(), ("eps",), ("noise",), ("prev_x0",), ("eps", "noise")])
def test_optional_terms(backend, extras):
    dev = require(OP, backend, dtype=torch.float32)
    t, c = make_inputs(shape_for(backend), device=dev, seed=1)
    prev, x0 = call(backend, t, c, extras=extras)
    ref_prev, ref_x0 = oracle(t, c, extras=extras)
    assert max_err(prev, ref_prev) < 2e-5 * (1 + float(ref_prev.abs().max()))
    assert max_err(x0, ref_x0) < 2e-5 * (1 + float(ref_x0.abs().max()))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("limit", ["none", "dynamic"])
def test_low_precision_2x_rule(backend, dtype, limit):
    dev = require(OP, backend, dtype=dtype)
    t, c = make_inputs(shape_for(backend), dtype=dtype, device=dev)
    lim = {"none": {}, "dynamic": {"ratio": 0.95, "max_value": 3.0}}[limit]
    prev, x0 = call(backend, t, c, guidance=2.0, extras=("eps", "noise"), **lim)
    ref_prev, ref_x0 = oracle(t, c, guidance=2.0, extras=("eps", "noise"), **lim)
    cpu = {k: v.cpu() for k, v in t.items()}
    lp_prev, lp_x0 = sampler_step_ref(
        cpu["x"], cpu["m"], c["alpha_t"].cpu(), c["sigma_t"].cpu(), c["c_sample"].cpu(), c["c_x0"].cpu(),
        c["c_eps"].cpu(), c["c_noise"].cpu(), "epsilon", cpu["mu"], 2.0, None, None, cpu["noise"],
        None, lim.get("ratio"), lim.get("max_value", 1.0), upcast=False)
    assert prev.dtype == dtype and x0.dtype == dtype
    assert_close_2x(prev, lp_prev, ref_prev, atol=1e-3)
    assert_close_2x(x0, lp_x0, ref_x0, atol=1e-3)


# ---------------------------------------------------------------- the scheduler mappings of the docstring


def _abar(B, seed):
    g = torch.Generator().manual_seed(seed)
    abar_t = torch.rand(B, generator=g, dtype=torch.float64) * 0.5 + 0.2
    abar_s = abar_t + (1 - abar_t) * (torch.rand(B, generator=g, dtype=torch.float64) * 0.5 + 0.2)
    return abar_t, abar_s


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_ddpm_ancestral_mapping(backend):
    """Posterior mean mu~(x_t, x0) + sqrt(beta~) z (Ho et al. eq. 6-7), x0 clipped to [-1, 1]."""
    dev = require(OP, backend, dtype=torch.float32)
    t, _ = make_inputs(shape_for(backend), device=dev, seed=2)
    B = t["x"].shape[0]
    abar_t, abar_s = _abar(B, 2)
    beta = 1 - abar_t / abar_s
    x, eps, z = (t[k].double().cpu() for k in ("x", "m", "noise"))
    ex = (slice(None),) + (None,) * (x.dim() - 1)
    x0 = ((x - (1 - abar_t)[ex].sqrt() * eps) / abar_t[ex].sqrt()).clamp(-1, 1)
    mean = (abar_s.sqrt() * beta / (1 - abar_t))[ex] * x0 + ((1 - beta).sqrt() * (1 - abar_s) / (1 - abar_t))[ex] * x
    var = (1 - abar_s) / (1 - abar_t) * beta
    want = mean + var.sqrt()[ex] * z
    f = lambda v: v.float().to(dev)  # noqa: E731
    prev, _ = sampler_step(
        t["x"], t["m"], alpha_t=f(abar_t.sqrt()), sigma_t=f((1 - abar_t).sqrt()),
        c_sample=f((1 - beta).sqrt() * (1 - abar_s) / (1 - abar_t)), c_x0=f(abar_s.sqrt() * beta / (1 - abar_t)),
        c_noise=f(var.sqrt()), noise=t["noise"], clip_sample=1.0, backend=backend)
    assert max_err(prev, want) < 2e-5 * (1 + float(want.abs().max()))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_mapping(backend, eta):
    """Song et al. eq. 12: sqrt(abar_s) x0 + sqrt(1 - abar_s - std^2) eps + std z, v-prediction model."""
    dev = require(OP, backend, dtype=torch.float32)
    t, _ = make_inputs(shape_for(backend), device=dev, seed=3)
    B = t["x"].shape[0]
    abar_t, abar_s = _abar(B, 3)
    x, v, z = (t[k].double().cpu() for k in ("x", "m", "noise"))
    ex = (slice(None),) + (None,) * (x.dim() - 1)
    a, s = abar_t.sqrt()[ex], (1 - abar_t).sqrt()[ex]
    x0 = a * x - s * v
    eps = a * v + s * x  # the v-parameterisation's noise
    std = eta * ((1 - abar_s) / (1 - abar_t)).sqrt() * (1 - abar_t / abar_s).sqrt()
    want = abar_s.sqrt()[ex] * x0 + (1 - abar_s - std**2).sqrt()[ex] * eps + std[ex] * z
    f = lambda u: u.float().to(dev)  # noqa: E731
    prev, got_x0 = sampler_step(
        t["x"], t["m"], alpha_t=f(abar_t.sqrt()), sigma_t=f((1 - abar_t).sqrt()), c_sample=0.0,
        c_x0=f(abar_s.sqrt()), c_eps=f((1 - abar_s - std**2).sqrt()), c_noise=f(std), noise=t["noise"],
        prediction_type="v_prediction", backend=backend)
    assert max_err(got_x0, x0) < 2e-5 * (1 + float(x0.abs().max()))
    assert max_err(prev, want) < 3e-5 * (1 + float(want.abs().max()))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_dpm_solver_pp_2m_mapping(backend):
    """Lu et al. 2022 Alg. 2 (DPM-Solver++(2M)) second-order step in its own form."""
    dev = require(OP, backend, dtype=torch.float32)
    t, _ = make_inputs(shape_for(backend), device=dev, seed=4)
    B = t["x"].shape[0]
    abar_t, abar_s = _abar(B, 4)
    abar_prev = abar_t * 0.7  # the step before t was noisier
    lam = lambda ab: 0.5 * torch.log(ab / (1 - ab))  # noqa: E731  log(alpha / sigma)
    h, h_prev = lam(abar_s) - lam(abar_t), lam(abar_t) - lam(abar_prev)
    r = h_prev / h
    x, eps, m_prev = (t[k].double().cpu() for k in ("x", "m", "px0"))
    ex = (slice(None),) + (None,) * (x.dim() - 1)
    x0 = (x - (1 - abar_t)[ex].sqrt() * eps) / abar_t[ex].sqrt()
    D = (1 + 1 / (2 * r))[ex] * x0 - (1 / (2 * r))[ex] * m_prev
    sig_t, sig_s, al_s = (1 - abar_t).sqrt(), (1 - abar_s).sqrt(), abar_s.sqrt()
    want = (sig_s / sig_t)[ex] * x - (al_s * (torch.exp(-h) - 1))[ex] * D
    f = lambda u: u.float().to(dev)  # noqa: E731
    em = torch.expm1(-h)
    prev, _ = sampler_step(
        t["x"], t["m"], alpha_t=f(abar_t.sqrt()), sigma_t=f(sig_t), c_sample=f(sig_s / sig_t),
        c_x0=f(-al_s * em * (1 + 1 / (2 * r))), prev_x0=t["px0"], c_prev_x0=f(al_s * em / (2 * r)), backend=backend)
    assert max_err(prev, want) < 3e-5 * (1 + float(want.abs().max()))


# ------------------------------------------------------------------------------ registration


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_opcheck(backend):
    require(OP, backend, dtype=torch.float32)
    t, c = make_inputs((2, 3, 5))
    torch.library.opcheck(_fwd_op, (t["x"], t["m"], c["alpha_t"], c["sigma_t"], c["c_sample"], c["c_x0"], c["c_eps"],
                                    c["c_noise"], "epsilon", t["mu"], 2.0, t["px0"], c["c_prev_x0"], t["noise"],
                                    None, 0.9, 2.0, backend, True))
    torch.library.opcheck(_fwd_op, (t["x"], t["m"], c["alpha_t"], c["sigma_t"], c["c_sample"], c["c_x0"], None,
                                    None, "v_prediction", None, 1.0, None, None, None, 1.0, None, 1.0, backend))


def test_torch_compile_fullgraph():
    t, c = make_inputs((2, 3, 6, 6))

    def f(x, m, noise):
        prev, x0 = sampler_step(x, m, alpha_t=c["alpha_t"], sigma_t=c["sigma_t"], c_sample=c["c_sample"],
                                c_x0=c["c_x0"], c_eps=c["c_eps"], c_noise=c["c_noise"], noise=noise,
                                clip_sample=1.0)
        return prev * 2, x0

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    for a, b in zip(compiled(t["x"], t["m"], t["noise"]), f(t["x"], t["m"], t["noise"])):
        torch.testing.assert_close(a, b)


def test_python_float_coefficients_broadcast():
    t, c = make_inputs((3, 2, 5))
    p1, _ = sampler_step(t["x"], t["m"], alpha_t=0.8, sigma_t=0.6, c_sample=0.5, c_x0=0.7, c_eps=0.1)
    full = lambda v: torch.full((3,), v)  # noqa: E731
    p2, _ = sampler_step(t["x"], t["m"], alpha_t=full(0.8), sigma_t=full(0.6), c_sample=full(0.5), c_x0=full(0.7),
                         c_eps=full(0.1), backend="torch")
    torch.testing.assert_close(p1, p2)


def test_auto_prefers_cpu_kernel_on_cpu():
    if "cpu" not in OP.reasons:
        pytest.skip("C++ kernel not built")
    assert OP.select(None, torch.device("cpu"), dtype=torch.float32) == "cpu"


def test_explicit_backend_that_cannot_run_lists_reasons():
    t, c = make_inputs((1, 4))
    with pytest.raises(BackendUnavailableError, match=r"(?s)cuda.*torch: available"):
        call("cuda", t, c)


# ------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda a: a.update(model_output=a["model_output"][:, :-1]), r"model_output must have shape \(2, 3, 4\)"),
        (lambda a: a.update(model_output=a["model_output"].double()), r"model_output must have dtype float32"),
        (lambda a: a.update(sample=a["sample"].int()), r"sample must have dtype"),
        (lambda a: a.update(noise=a["noise"].to("meta")), r"noise is on meta but the other inputs are on cpu"),
        (lambda a: a.update(alpha_t=a["alpha_t"][:1]), r"alpha_t must have shape \(2\)"),
        (lambda a: a.update(c_x0=a["c_x0"].double()), r"c_x0 must have dtype float32"),
        (lambda a: a.update(prediction_type="x0"), r"unknown prediction_type 'x0'"),
        (lambda a: a.update(dynamic_threshold=1.5), r"dynamic_threshold must be a quantile ratio"),
        (lambda a: a.update(dynamic_threshold=0.9, sample_max_value=0.5), r"sample_max_value must be >= 1"),
        (lambda a: a.update(clip_sample=0.0), r"clip_sample must be positive"),
        (lambda a: a.update(c_noise=None), r"noise and c_noise must be given together"),
        (lambda a: a.update(c_prev_x0=a["c_x0"]), r"prev_x0 and c_prev_x0 must be given together"),
        (lambda a: a.update(model_output_uncond=a["model_output"][0]), r"model_output_uncond must have shape"),
    ],
)
def test_bad_input_names_the_argument(mutate, match):
    t, c = make_inputs((2, 3, 4))
    a = dict(sample=t["x"], model_output=t["m"], alpha_t=c["alpha_t"], sigma_t=c["sigma_t"], c_sample=c["c_sample"],
             c_x0=c["c_x0"], noise=t["noise"], c_noise=c["c_noise"])
    mutate(a)
    with pytest.raises((ValueError, TypeError), match=match):
        sampler_step(a.pop("sample"), a.pop("model_output"), **a)
