"""group_norm_silu on every backend against float64 F.group_norm + FiLM + F.silu (SPEC 1.3)."""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

from biogen.ops import BackendUnavailableError, group_norm_silu
from biogen.ops.group_norm import OP, _bwd_op, _fwd_op
from biogen.ops.reference import group_norm_silu_ref

from .helpers import ALL_BACKENDS, assert_close_2x, interpreted, max_err, require, run_with_cpu_capability


def to_channels_last(x: torch.Tensor) -> torch.Tensor:
    if x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x.transpose(1, 2).contiguous().transpose(1, 2)


def is_channels_last(x: torch.Tensor) -> bool:
    if x.dim() == 4:
        return x.is_contiguous(memory_format=torch.channels_last)
    return x.transpose(1, 2).is_contiguous()


def make_inputs(B, C, spatial, *, dtype=torch.float32, device="cpu", layout="nchw", film="both", seed=0):
    g = torch.Generator().manual_seed(seed)
    # an offset mean and a non-unit spread, as UNet activations have
    x = torch.randn(B, C, *spatial, generator=g, dtype=torch.float64) * 2.0 + 0.7
    w = 1 + 0.3 * torch.randn(C, generator=g, dtype=torch.float64)
    b = 0.3 * torch.randn(C, generator=g, dtype=torch.float64)
    sc = 0.4 * torch.randn(B, C, generator=g, dtype=torch.float64) if film in ("both", "scale") else None
    sh = 0.4 * torch.randn(B, C, generator=g, dtype=torch.float64) if film in ("both", "shift") else None
    x = x.to(dtype=dtype, device=device)
    if layout == "channels_last":
        x = to_channels_last(x)
    conv = lambda t: None if t is None else t.to(dtype=torch.float32, device=device)  # noqa: E731
    return x, conv(w), conv(b), conv(sc), conv(sh)


def truth_fn(x, G, w, b, sc, sh, act="silu"):
    """The unfused PyTorch chain this op replaces."""
    ex = (None,) * (x.dim() - 2)
    y = F.group_norm(x, G, w, b, eps=1e-5)
    if sc is not None:
        y = y * (1 + sc[(..., *ex)])
    if sh is not None:
        y = y + sh[(..., *ex)]
    return F.silu(y) if act == "silu" else y


def truth(x, G, w, b, sc, sh, act="silu", grad_out=None):
    """float64 CPU output and, if grad_out is given, the gradients of (x, w, b, sc, sh) by autograd."""
    args = [None if t is None else t.detach().double().cpu().requires_grad_(True) for t in (x, w, b, sc, sh)]
    out = truth_fn(args[0], G, *args[1:], act=act)
    if grad_out is None:
        return out.detach(), None
    need = [a for a in args if a is not None]
    grads = iter(torch.autograd.grad(out, need, grad_out.double().cpu()))
    return out.detach(), [None if a is None else next(grads) for a in args]


# (B, C, G, spatial): odd channel and group counts on purpose; C=96, G=32 is a UNet block
def cases_for(backend):
    if interpreted(backend):
        return [(2, 6, 3, (3, 5)), (1, 5, 5, (7,)), (2, 16, 4, (4, 4))]
    return [(2, 6, 3, (5, 7)), (2, 96, 32, (9, 9)), (3, 5, 5, (17,)), (2, 32, 8, (33, 33)), (1, 64, 32, (1, 1))]


def _params():
    for b in ALL_BACKENDS:
        for case in cases_for(b):
            yield pytest.param(b, case, id=f"{b}-B{case[0]}C{case[1]}G{case[2]}-{'x'.join(map(str, case[3]))}")


@pytest.mark.parametrize("backend,case", list(_params()))
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("film,act", [("both", "silu"), ("none", "silu"), ("scale", "none"), ("shift", "silu")])
def test_forward_fp32_matches_truth(backend, case, layout, film, act):
    dev = require(OP, backend, dtype=torch.float32)
    B, C, G, sp = case
    x, w, b, sc, sh = make_inputs(B, C, sp, device=dev, layout=layout, film=film)
    y = group_norm_silu(x, G, w, b, scale=sc, shift=sh, act=act, backend=backend)
    ref, _ = truth(x, G, w, b, sc, sh, act)
    assert y.shape == x.shape and y.dtype == x.dtype and y.device == x.device
    if x.shape[2:].numel() > 1:  # with one position both layouts are the same memory
        assert is_channels_last(y) == (layout == "channels_last")
    assert max_err(y, ref) < 2e-5


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_forward_low_precision_2x_rule(backend, dtype, layout):
    dev = require(OP, backend, dtype=dtype)
    B, C, G, sp = (2, 16, 4, (5, 5)) if interpreted(backend) else (2, 64, 32, (19, 19))
    x, w, b, sc, sh = make_inputs(B, C, sp, dtype=dtype, device=dev, layout=layout)
    y = group_norm_silu(x, G, w, b, scale=sc, shift=sh, backend=backend)
    ref, _ = truth(x, G, w, b, sc, sh)
    cpu = lambda t: t.cpu().to(dtype)  # noqa: E731
    lowp, _, _ = group_norm_silu_ref(cpu(x), G, cpu(w), cpu(b), cpu(sc), cpu(sh), upcast=False)
    assert y.dtype == dtype
    assert_close_2x(y, lowp, ref, atol=1e-3)


@pytest.mark.parametrize("backend,case", list(_params()))
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("film,act", [("both", "silu"), ("none", "none")])
def test_gradients_match_autograd_truth(backend, case, layout, film, act):
    dev = require(OP, backend, dtype=torch.float32)
    B, C, G, sp = case
    x, w, b, sc, sh = make_inputs(B, C, sp, device=dev, layout=layout, film=film)
    args = [None if t is None else t.clone().requires_grad_(True) for t in (x, w, b, sc, sh)]
    y = group_norm_silu(args[0], G, args[1], args[2], scale=args[3], shift=args[4], act=act, backend=backend)
    gout = torch.randn(y.shape, dtype=torch.float64).to(dtype=y.dtype, device=dev)
    need = [a for a in args if a is not None]
    grads = torch.autograd.grad(y, need, gout)
    _, ref_grads = truth(x, G, w, b, sc, sh, act, grad_out=gout)
    assert is_channels_last(grads[0]) == is_channels_last(y) or x.shape[2:].numel() == 1
    # PyTorch's own float32 autograd of the unfused chain: how well float32 can do at all (a group of
    # two values, the 1x1 case, makes dx a cancellation of O(rstd) terms)
    f32 = [None if t is None else t.detach().float().cpu().requires_grad_(True) for t in (x, w, b, sc, sh)]
    f32_grads = torch.autograd.grad(truth_fn(f32[0], G, *f32[1:], act=act), [a for a in f32 if a is not None],
                                    gout.float().cpu())
    for name, g_, r, t32 in zip(["x", "weight", "bias", "scale", "shift"], grads,
                                [r for r in ref_grads if r is not None], f32_grads):
        assert g_.dtype == torch.float32 and g_.shape == r.shape
        # parameter grads are sums over batch x spatial: judge relative to their size
        tol = 2e-5 * (1 + float(r.abs().max())) + 2 * max_err(t32, r)
        assert max_err(g_, r) < tol, f"d{name}"


def lowp_backward_errors(backend, dtype, B, C, G, sp, layout, dev):
    """The 2x rule for the backward: (kernel error, same-precision reference error) against the float64
    autograd truth, for each of dx, dweight, dbias, dscale, dshift. The reference is the unfused
    chain (group_norm_silu_ref, upcast=False) autograd'ed in ``dtype`` from the same rounded inputs."""
    x, w, b, sc, sh = make_inputs(B, C, sp, dtype=dtype, device=dev, layout=layout, seed=3)
    args = [t.clone().requires_grad_(True) for t in (x, w, b, sc, sh)]
    y = group_norm_silu(args[0], G, *args[1:3], scale=args[3], shift=args[4], backend=backend)
    # an upstream gradient correlated with the output (as from a loss on y), so that the statistics'
    # terms of dx (through mean and rstd) are large, not averaged away as for pure noise
    ref_y, _ = truth(x, G, w, b, sc, sh)
    noise = torch.randn(y.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    gout = (ref_y + 0.5 + 0.3 * noise).to(dtype)
    grads = torch.autograd.grad(y, args, gout.to(dev))
    _, truth_grads = truth(x, G, w, b, sc, sh, grad_out=gout)
    lp = [t.detach().cpu().to(dtype).requires_grad_(True) for t in (x, w, b, sc, sh)]
    lp_y, _, _ = group_norm_silu_ref(lp[0], G, *lp[1:3], lp[3], lp[4], upcast=False)
    lp_grads = torch.autograd.grad(lp_y, lp, gout)
    assert grads[0].dtype == dtype
    return {n: (max_err(g_, t_), max_err(l_, t_), float(t_.abs().max()))
            for n, g_, l_, t_ in zip(["dx", "dweight", "dbias", "dscale", "dshift"], grads, lp_grads, truth_grads)}


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_backward_low_precision_2x_rule(backend, dtype, layout):
    """Every gradient within twice the error of the same chain computed in that precision (plus a
    floor of 5 % of an ulp of the gradient's size): a dx that treats rstd as a constant exceeds it."""
    dev = require(OP, backend, dtype=dtype)
    B, C, G, sp = (2, 16, 4, (5, 5)) if interpreted(backend) else (2, 64, 32, (19, 19))
    ulp = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}[dtype]
    for name, (err, ref_err, size) in lowp_backward_errors(backend, dtype, B, C, G, sp, layout, dev).items():
        assert err <= 2 * ref_err + 0.05 * ulp * size, f"{name}: kernel {err:.3e}, {dtype} reference {ref_err:.3e}"


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_gradcheck_float64_reference_backward(layout):
    """The hand-written reference backward (the torch backend's) against numerical gradients."""
    x, w, b, sc, sh = make_inputs(2, 6, (3, 4), layout=layout)
    args = [t.double().requires_grad_(True) for t in (x, w, b, sc, sh)]
    if layout == "channels_last":
        args[0] = to_channels_last(args[0].detach()).requires_grad_(True)
    fn = lambda x, w, b, sc, sh: group_norm_silu(x, 3, w, b, scale=sc, shift=sh, backend="torch")  # noqa: E731
    assert torch.autograd.gradcheck(fn, args)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_deterministic(backend):
    dev = require(OP, backend, dtype=torch.float32)
    for layout in ("nchw", "channels_last"):
        x, w, b, sc, sh = (t.requires_grad_(True) for t in make_inputs(2, 16, (6, 6), device=dev, layout=layout))
        runs = []
        for _ in range(2):
            y = group_norm_silu(x, 4, w, b, scale=sc, shift=sh, backend=backend)
            runs.append((y, *torch.autograd.grad(y.square().sum(), (x, w, b, sc, sh))))
        for a, c in zip(*runs):
            assert torch.equal(a, c)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_non_dense_input_is_handled(backend):
    dev = require(OP, backend, dtype=torch.float32)
    x, w, b, sc, sh = make_inputs(2, 8, (6, 10), device=dev)
    xs = x[:, :, :, ::2]  # strided view: neither NCHW- nor channels-last-contiguous
    y = group_norm_silu(xs, 4, w, b, scale=sc, shift=sh, backend=backend)
    ref, _ = truth(xs, 4, w, b, sc, sh)
    assert max_err(y, ref) < 2e-5


def test_large_mean_does_not_cancel():
    """Shifted sums keep the variance accurate when |mean| >> std (E[x^2] - E[x]^2 would not)."""
    if "cpu" not in OP.reasons:
        pytest.skip("C++ kernel not built")
    x, w, b, sc, sh = make_inputs(2, 8, (32, 32))
    x = x * 0.01 + 300.0
    for layout in ("nchw", "channels_last"):
        xi = to_channels_last(x) if layout == "channels_last" else x
        y = group_norm_silu(xi, 4, w, b, scale=sc, shift=sh, backend="cpu")
        ref, _ = truth(xi, 4, w, b, sc, sh)
        # float32 rounding of x itself (300 * 2^-24) relative to the std 0.02 bounds what is possible
        assert max_err(y, ref) < 3e-3


def test_defaults_match_plain_group_norm_silu():
    x, *_ = make_inputs(2, 12, (5, 5))
    y = group_norm_silu(x, 4)
    ref = F.silu(F.group_norm(x.double(), 4))
    assert max_err(y, ref) < 2e-5


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_opcheck(backend, layout):
    require(OP, backend, dtype=torch.float32)
    x, w, b, sc, sh = make_inputs(2, 6, (3, 5), layout=layout)
    for t in (x, w, b, sc, sh):
        t.requires_grad_(True)
    torch.library.opcheck(_fwd_op, (x, w, b, sc, sh, 3, 1e-5, "silu", backend))
    torch.library.opcheck(_fwd_op, (x, w, b, None, None, 3, 1e-5, "none", backend))
    y, mean, rstd = _fwd_op(x.detach(), w.detach(), b.detach(), sc.detach(), sh.detach(), 3, 1e-5, "silu", backend)
    torch.library.opcheck(_bwd_op, (torch.randn_like(y), x.detach(), w.detach(), b.detach(), sc.detach(), sh.detach(),
                                    mean, rstd, 3, "silu", backend))


def test_torch_compile_fullgraph():
    x, w, b, sc, sh = make_inputs(2, 8, (6, 6))

    def f(x, w, b, sc, sh):
        return group_norm_silu(x, 4, w, b, scale=sc, shift=sh).square().sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    args = [t.clone().requires_grad_(True) for t in (x, w, b, sc, sh)]
    val = compiled(*args)
    val.backward()
    ref_args = [t.clone().requires_grad_(True) for t in (x, w, b, sc, sh)]
    ref = f(*ref_args)
    ref.backward()
    torch.testing.assert_close(val, ref)
    for a, r in zip(args, ref_args):
        torch.testing.assert_close(a.grad, r.grad)


def test_auto_prefers_cpu_kernel_on_cpu():
    if "cpu" not in OP.reasons:
        pytest.skip("C++ kernel not built")
    assert OP.select(None, torch.device("cpu"), dtype=torch.float32) == "cpu"
    assert OP.select(None, torch.device("cpu"), dtype=torch.float64) == "torch"


def test_explicit_backend_that_cannot_run_lists_reasons():
    x, w, b, sc, sh = make_inputs(1, 4, (3, 3))
    with pytest.raises(BackendUnavailableError, match=r"(?s)cuda.*cuda tensors.*torch: available"):
        group_norm_silu(x, 2, w, b, backend="cuda")


# ------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda a: a.update(num_groups=4), r"channels \(6\) must be divisible by num_groups \(4\)"),
        (lambda a: a.update(num_groups=0), r"num_groups must be a positive int"),
        (lambda a: a.update(x=a["x"][0, 0]), r"x must be \(batch, channels, \*spatial\)"),
        (lambda a: a.update(weight=a["weight"][:-1]), r"weight must have shape \(6\)"),
        (lambda a: a.update(bias=a["bias"][None]), r"bias must have shape \(6\)"),
        (lambda a: a.update(scale=a["scale"][:, :-1]), r"scale must have shape \(2, 6\)"),
        (lambda a: a.update(shift=a["shift"][0]), r"shift must have shape \(2, 6\)"),
        (lambda a: a.update(x=a["x"].int()), r"x must have dtype"),
        (lambda a: a.update(weight=a["weight"].long()), r"weight must have dtype"),
        (lambda a: a.update(scale=a["scale"].to("meta")), r"scale is on meta but the other inputs are on cpu"),
        (lambda a: a.update(act="gelu"), r"unknown act 'gelu'"),
        (lambda a: a.update(eps=0.0), r"eps must be positive"),
    ],
)
def test_bad_input_names_the_argument(mutate, match):
    x, w, b, sc, sh = make_inputs(2, 6, (3, 3))
    a = dict(x=x, num_groups=3, weight=w, bias=b, scale=sc, shift=sh)
    mutate(a)
    with pytest.raises((ValueError, TypeError), match=match):
        group_norm_silu(a.pop("x"), a.pop("num_groups"), a.pop("weight"), a.pop("bias"), **a)


# ------------------------------------------------------------------------------ SIMD paths


# The kernel's SiLU (a lean exp and a refined reciprocal estimate) against float64 silu of the
# kernel's own pre-activation (the act='none' output) from -120 to 120: within 1e-6 relative
# everywhere, also where the sigmoid is tiny (absolute 1e-30 below float resolution there).
SILU_ACCURACY = (
    "from tests.ops.test_group_norm import to_channels_last\n"
    "from biogen.ops import group_norm_silu\n"
    "x = torch.linspace(-1, 1, 4001).repeat(1, 2, 1)  # xhat spans +-1.73\n"
    "w, b = torch.tensor([70.0, 3.0]), torch.tensor([0.0, 0.5])\n"
    "for xl in (x, to_channels_last(x)):\n"
    "  z = group_norm_silu(xl, 1, w, b, act='none', backend='cpu').double()\n"
    "  y = group_norm_silu(xl, 1, w, b, backend='cpu').double()\n"
    "  assert z.min() < -110 and z.max() > 110, (z.min(), z.max())\n"
    "  ref = z * torch.sigmoid(z)\n"
    "  bad = (y - ref).abs() - 1e-6 * ref.abs() > 1e-30\n"
    "  assert not bad.any(), (z[bad][:5], y[bad][:5], ref[bad][:5])\n"
)


@pytest.mark.parametrize("cap", ["base", "avx2", "avx512"])
def test_every_compiled_simd_level_matches_truth(cap):
    """Each per-ISA build of the CPU kernel, forced with BIOGEN_CPU_CAPABILITY in a subprocess: outputs
    and gradients against float64 truth, and the SiLU's accuracy (SILU_ACCURACY)."""
    run_with_cpu_capability(OP, cap, SILU_ACCURACY + (
        "from tests.ops.test_group_norm import lowp_backward_errors, make_inputs, truth\n"
        "from biogen.ops import group_norm_silu\n"
        "for layout in ('nchw', 'channels_last'):\n"
        "  for dt in (torch.float32, torch.bfloat16):\n"
        "    x, w, b, sc, sh = make_inputs(2, 40, (9, 9), layout=layout, dtype=dt)\n"
        "    args = [t.requires_grad_(True) for t in (x, w, b, sc, sh)]\n"
        "    y = group_norm_silu(args[0], 8, *args[1:3], scale=args[3], shift=args[4], backend='cpu')\n"
        "    g = torch.randn(y.shape, dtype=torch.float64)\n"
        "    grads = torch.autograd.grad(y, args, g.to(dt))\n"
        "    ref, rg = truth(x, 8, w, b, sc, sh, grad_out=g.to(dt))\n"
        "    tol = 2e-5 if dt == torch.float32 else 5e-2\n"
        "    err = (y.double()-ref).abs().max().item(); assert err < tol, err\n"
        "    if dt == torch.float32:\n"
        "      for a, r in zip(grads, rg):\n"
        "        e = (a.double()-r).abs().max().item(); assert e < 2e-5 * (1 + r.abs().max().item()), e\n"
        "  for dt, ulp in ((torch.bfloat16, 2.0**-7), (torch.float16, 2.0**-10)):\n"
        "    for n, (e, r, size) in lowp_backward_errors('cpu', dt, 2, 40, 8, (9, 9), layout, 'cpu').items():\n"
        "      assert e <= 2 * r + 0.05 * ulp * size, (n, dt, e, r)\n"
    ))

