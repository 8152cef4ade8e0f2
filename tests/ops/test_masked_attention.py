"""masked_gene_attention on every backend against the float64 reference (SPEC 1.1)."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from biogen.ops import BackendUnavailableError, masked_gene_attention, use_backend
from biogen.ops.masked_attention import OP, _fwd_op, _bwd_op
from biogen.ops.reference import masked_gene_attention_ref

from .helpers import ALL_BACKENDS, assert_close_2x, interpreted, max_err, require, run_with_cpu_capability


def make_inputs(B, H, L, D, *, dtype=torch.float32, device="cpu", pad_frac=0.3, known_frac=0.6, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, L, D, generator=g, dtype=torch.float64) for _ in range(3))
    # padding as in scGPT batches: cells padded to the longest, lengths vary per cell
    lengths = torch.randint(max(1, int(L * (1 - pad_frac))), L + 1, (B,), generator=g)
    pad = torch.arange(L)[None, :] >= lengths[:, None]
    known = torch.rand(B, L, generator=g) < known_frac
    known[:, 0] = True  # <cls>
    conv = lambda t: t.to(dtype=dtype, device=device)  # noqa: E731
    return conv(q), conv(k), conv(v), pad.to(device), known.to(device)


def truth(q, k, v, pad, known, scale=None):
    """float64 numpy, one query row at a time, from scGPT's rule (independent of biogen's reference):
    query i of a cell attends key j iff j is not padding and (j is known or j == i); padded queries
    give zeros and lse -inf. Returns (out, lse) as torch float64."""
    q, k, v = (t.detach().double().cpu().numpy() for t in (q, k, v))
    B, H, L, D = q.shape
    scale = 1 / np.sqrt(D) if scale is None else scale
    valid = np.ones((B, L), bool) if pad is None else ~pad.cpu().numpy()
    kn = np.ones((B, L), bool) if known is None else known.cpu().numpy()
    out = np.zeros((B, H, L, D))
    lse = np.full((B, H, L), -np.inf)
    for b in range(B):
        for i in np.flatnonzero(valid[b]):
            keys = np.flatnonzero(valid[b] & (kn[b] | (np.arange(L) == i)))
            s = np.einsum("hd,hjd->hj", q[b, :, i], k[b][:, keys]) * scale
            top = s.max(axis=1, keepdims=True)
            e = np.exp(s - top)
            out[b, :, i] = np.einsum("hj,hjd->hd", e, v[b][:, keys]) / e.sum(axis=1, keepdims=True)
            lse[b, :, i] = top[:, 0] + np.log(e.sum(axis=1))
    return torch.from_numpy(out), torch.from_numpy(lse)


@pytest.mark.parametrize("masks", ["none", "padding", "generative"])
def test_reference_equals_per_row_truth(masks):
    """The torch backend is biogen's reference: it must equal the independent truth in float64."""
    q, k, v, pad, known = make_inputs(2, 3, 23, 8, dtype=torch.float64, pad_frac=0.4)
    pad = None if masks == "none" else pad
    known = known if masks == "generative" else None
    out, lse = masked_gene_attention_ref(q, k, v, pad, known)
    want, want_lse = truth(q, k, v, pad, known)
    assert max_err(out, want) < 1e-12
    assert torch.equal(torch.isneginf(lse), torch.isneginf(want_lse))
    fin = torch.isfinite(want_lse)
    assert max_err(lse[fin], want_lse[fin]) < 1e-12


def shapes_for(backend):
    if interpreted(backend):
        return [(1, 1, 1, 16), (2, 2, 17, 16), (1, 2, 33, 40)]
    return [(1, 1, 1, 64), (2, 3, 97, 64), (2, 2, 97, 40), (1, 2, 1025, 64), (2, 1, 130, 128)]


def _params():
    for b in ALL_BACKENDS:
        for shape in shapes_for(b):
            yield pytest.param(b, shape, id=f"{b}-{'x'.join(map(str, shape))}")


@pytest.mark.parametrize("backend,shape", list(_params()))
@pytest.mark.parametrize("masks", ["none", "padding", "generative"])
def test_forward_fp32_matches_reference(backend, shape, masks):
    dev = require(OP, backend, dtype=torch.float32, head_dim=shape[-1])
    q, k, v, pad, known = make_inputs(*shape, device=dev)
    pad = None if masks == "none" else pad
    known = known if masks == "generative" else None
    out = masked_gene_attention(q, k, v, key_padding_mask=pad, known=known, backend=backend)
    ref, _ = truth(q, k, v, pad, known)
    assert out.dtype == torch.float32 and out.shape == q.shape
    assert max_err(out, ref) < 2e-5


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_forward_low_precision_2x_rule(backend, dtype):
    dev = require(OP, backend, dtype=dtype, head_dim=64)
    shape = (1, 2, 33, 32) if interpreted(backend) else (2, 2, 193, 64)
    q, k, v, pad, known = make_inputs(*shape, dtype=dtype, device=dev)
    out = masked_gene_attention(q, k, v, key_padding_mask=pad, known=known, backend=backend)
    ref, _ = truth(q, k, v, pad, known)
    lowp, _ = masked_gene_attention_ref(q.cpu(), k.cpu(), v.cpu(), pad.cpu(), known.cpu(), upcast=False)
    assert out.dtype == dtype
    assert_close_2x(out, lowp, ref)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_degenerate_rows(backend):
    """All-unknown cells attend only to themselves; all-padding cells give zeros; never NaN."""
    dev = require(OP, backend, dtype=torch.float32, head_dim=16)
    B, H, L, D = 3, 2, (9 if interpreted(backend) else 70), 16
    q, k, v, _, known = make_inputs(B, H, L, D, device=dev)
    pad = torch.zeros(B, L, dtype=torch.bool, device=dev)
    pad[1] = True  # a cell that is all padding
    known[0] = False  # a cell where every token is unknown
    out = masked_gene_attention(q, k, v, key_padding_mask=pad, known=known, backend=backend)
    assert torch.isfinite(out).all()
    assert torch.equal(out[1].cpu(), torch.zeros_like(out[1].cpu()))
    torch.testing.assert_close(out[0].cpu(), v[0].cpu(), atol=1e-6, rtol=1e-6)  # softmax over itself
    ref, _ = truth(q, k, v, pad, known)
    assert max_err(out, ref) < 2e-5


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_nan_in_padding_does_not_change_output(backend):
    dev = require(OP, backend, dtype=torch.float32, head_dim=32)
    shape = (2, 2, 17, 32) if interpreted(backend) else (2, 3, 150, 32)
    q, k, v, pad, known = make_inputs(*shape, device=dev, pad_frac=0.5)
    pad[0, -1] = True
    out = masked_gene_attention(q, k, v, key_padding_mask=pad, known=known, backend=backend)
    q2, k2, v2 = (t.clone() for t in (q, k, v))
    for t in (q2, k2, v2):
        t.masked_fill_(pad[:, None, :, None], float("nan"))
    out2 = masked_gene_attention(q2, k2, v2, key_padding_mask=pad, known=known, backend=backend)
    assert torch.equal(out, out2)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_non_contiguous_inputs(backend):
    dev = require(OP, backend, dtype=torch.float32, head_dim=32)
    B, L, H, D = (1, 17, 2, 32) if interpreted(backend) else (2, 101, 3, 32)
    qkv = torch.randn(B, L, 3, H, D, device=dev)  # a fused QKV projection, viewed per head
    q, k, v = qkv.unbind(2)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    assert not q.is_contiguous()
    _, _, _, pad, known = make_inputs(B, H, L, D, device=dev)
    out = masked_gene_attention(q, k, v, key_padding_mask=pad, known=known, backend=backend)
    ref, _ = truth(q, k, v, pad, known)
    assert max_err(out, ref) < 2e-5


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_deterministic(backend):
    dev = require(OP, backend, dtype=torch.float32, head_dim=32)
    shape = (1, 2, 17, 32) if interpreted(backend) else (2, 4, 300, 32)
    q, k, v, pad, known = (t.requires_grad_(t.is_floating_point()) for t in make_inputs(*shape, device=dev))
    runs = []
    for _ in range(2):
        out = masked_gene_attention(q, k, v, key_padding_mask=pad, known=known, backend=backend)
        runs.append((out, *torch.autograd.grad(out.square().sum(), (q, k, v))))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("masks", ["padding", "generative"])
def test_gradients_match_reference(backend, masks):
    dev = require(OP, backend, dtype=torch.float32, head_dim=40)
    shape = (1, 2, 17, 40) if interpreted(backend) else (2, 2, 97, 40)
    q, k, v, pad, known = make_inputs(*shape, device=dev)
    known = known if masks == "generative" else None
    args = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = masked_gene_attention(*args, key_padding_mask=pad, known=known, backend=backend)
    gout = torch.randn_like(out)
    grads = torch.autograd.grad(out, args, gout)
    ref_args = [t.detach().double().cpu().requires_grad_(True) for t in (q, k, v)]
    ref, _ = masked_gene_attention_ref(*ref_args, pad.cpu(), None if known is None else known.cpu())
    ref_grads = torch.autograd.grad(ref, ref_args, gout.double().cpu())
    for name, g_, r in zip("qkv", grads, ref_grads):
        assert torch.isfinite(g_).all()
        assert max_err(g_, r) < 5e-5, f"d{name}"


def test_gradcheck_float64_reference_backward():
    """The hand-written reference backward (the torch backend's) against numerical gradients."""
    q, k, v, pad, known = make_inputs(1, 2, 7, 4, dtype=torch.float64)
    args = [t.requires_grad_(True) for t in (q, k, v)]
    fn = lambda q, k, v: masked_gene_attention(q, k, v, key_padding_mask=pad, known=known, backend="torch")  # noqa
    assert torch.autograd.gradcheck(fn, args)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_opcheck(backend):
    require(OP, backend, dtype=torch.float32, head_dim=16)
    q, k, v, pad, known = make_inputs(2, 2, 11, 16)
    q.requires_grad_(True), k.requires_grad_(True), v.requires_grad_(True)
    torch.library.opcheck(_fwd_op, (q, k, v, pad, known, 0.25, backend))
    torch.library.opcheck(_fwd_op, (q, k, v, None, None, 0.25, backend))
    out, lse = _fwd_op(q.detach(), k.detach(), v.detach(), pad, known, 0.25, backend)
    torch.library.opcheck(_bwd_op, (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, lse,
                                    pad, known, 0.25, backend))


def test_torch_compile_fullgraph():
    q, k, v, pad, known = make_inputs(2, 2, 19, 16)

    def f(q, k, v):
        return masked_gene_attention(q, k, v, key_padding_mask=pad, known=known).relu().sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    args = [t.clone().requires_grad_(True) for t in (q, k, v)]
    val = compiled(*args)
    val.backward()
    ref = f(q, k, v)
    torch.testing.assert_close(val, ref)
    assert all(a.grad is not None and torch.isfinite(a.grad).all() for a in args)


def test_generative_mask_semantics_changing_unknown_value_touches_only_itself():
    """Changing an unknown token's key/value changes no other query's output."""
    q, k, v, pad, known = make_inputs(1, 2, 40, 16, pad_frac=0.0)
    unk = int((~known[0]).nonzero()[0])
    out = masked_gene_attention(q, k, v, known=known)
    k2, v2 = k.clone(), v.clone()
    k2[0, :, unk] += 3.0
    v2[0, :, unk] -= 5.0
    out2 = masked_gene_attention(q, k2, v2, known=known)
    others = torch.ones(40, dtype=torch.bool)
    others[unk] = False
    assert torch.equal(out[:, :, others], out2[:, :, others])
    assert not torch.equal(out[:, :, unk], out2[:, :, unk])


# ------------------------------------------------------------------------------ backend selection


def test_explicit_backend_that_cannot_run_lists_reasons(monkeypatch):
    q, k, v, pad, known = make_inputs(1, 1, 5, 8)
    with pytest.raises(BackendUnavailableError, match=r"(?s)cuda.*cuda tensors.*torch: available"):
        masked_gene_attention(q, k, v, backend="cuda")
    with use_backend("cuda"), pytest.raises(BackendUnavailableError, match="use_backend"):
        masked_gene_attention(q, k, v)
    monkeypatch.setenv("BIOGEN_BACKEND", "cuda")
    with pytest.raises(BackendUnavailableError, match="BIOGEN_BACKEND"):
        masked_gene_attention(q, k, v)
    monkeypatch.setenv("BIOGEN_BACKEND", "torch")
    assert OP.select(None, q.device, dtype=q.dtype, head_dim=8) == "torch"
    with use_backend("auto"):  # the context manager outranks the environment
        assert OP.select(None, q.device, dtype=q.dtype, head_dim=8) != "torch" or "cpu" not in OP.reasons


def test_unknown_backend_name():
    q, k, v, _, _ = make_inputs(1, 1, 5, 8)
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        masked_gene_attention(q, k, v, backend="gpu")


def test_auto_prefers_cpu_kernel_on_cpu():
    if "cpu" not in OP.reasons:
        pytest.skip("C++ kernel not built")
    assert OP.select(None, torch.device("cpu"), dtype=torch.float32, head_dim=64) == "cpu"
    # beyond the kernel's limits the fallback is silent
    assert OP.select(None, torch.device("cpu"), dtype=torch.float64, head_dim=64) == "torch"


# ------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda a: a.update(q=a["q"][0]), r"q must have 4 dimensions"),
        (lambda a: a.update(k=a["k"][:, :, :-1]), r"k must have shape \(2, 2, 9, 8\)"),
        (lambda a: a.update(v=a["v"].double()), r"v must have dtype float32"),
        (lambda a: a.update(q=a["q"].int(), k=a["k"].int(), v=a["v"].int()), r"q must have dtype"),
        (lambda a: a.update(key_padding_mask=a["key_padding_mask"].float()), r"key_padding_mask must have dtype bool"),
        (lambda a: a.update(known=a["known"][:, :-1]), r"known must have shape \(2, 9\)"),
        (lambda a: a.update(key_padding_mask=a["key_padding_mask"][None]), r"key_padding_mask must have 2 dimensions"),
        (lambda a: a.update(q=torch.randn(2, 2, 9, 130), k=torch.randn(2, 2, 9, 130), v=torch.randn(2, 2, 9, 130)),
         r"head dimension at most 128"),
        (lambda a: a.update(v=a["v"].to("meta")), r"v is on meta but the other inputs are on cpu"),
    ],
)
def test_bad_input_names_the_argument(mutate, match):
    q, k, v, pad, known = make_inputs(2, 2, 9, 8)
    a = dict(q=q, k=k, v=v, key_padding_mask=pad, known=known)
    mutate(a)
    with pytest.raises((ValueError, TypeError), match=match):
        masked_gene_attention(a.pop("q"), a.pop("k"), a.pop("v"), **a)


# ------------------------------------------------------------------------------ SIMD paths


@pytest.mark.parametrize("cap", ["base", "avx2", "avx512"])
def test_every_compiled_simd_level_matches_reference(cap):
    """Each per-ISA build of the CPU kernel, forced with BIOGEN_CPU_CAPABILITY in a subprocess."""
    run_with_cpu_capability(OP, cap, (
        "from tests.ops.test_masked_attention import make_inputs, truth\n"
        "from biogen.ops import masked_gene_attention\n"
        "q,k,v,pad,known = make_inputs(2,2,150,40)\n"
        "args = [t.requires_grad_(True) for t in (q,k,v)]\n"
        "out = masked_gene_attention(*args, key_padding_mask=pad, known=known, backend='cpu')\n"
        "ref,_ = truth(q,k,v,pad,known)\n"
        "err = (out.double()-ref).abs().max().item(); assert err < 2e-5, err\n"
        "out.sum().backward(); assert all(torch.isfinite(a.grad).all() for a in args)\n"
    ))
