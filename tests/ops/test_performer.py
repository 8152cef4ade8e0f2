"""performer_attention on every backend against the float64 reference (SPEC 1.2), the reference
against an independent per-token loop and performer-pytorch, random features and the layer."""

from __future__ import annotations

import math

import pytest
import torch

from biogen.nn import PerformerAttention
from biogen.ops import BackendUnavailableError, gaussian_orthogonal_random_matrix, performer_attention
from biogen.ops.performer import OP, TRITON_CAUSAL_MAX_FEATURES, _bwd_op, _fwd_op
from biogen.ops.reference import performer_attention_ref

from .helpers import ALL_BACKENDS, assert_close_2x, interpreted, max_err, require, run_with_cpu_capability

KERNELS = ["softmax", "relu"]


def make_inputs(B, H, L, D, m, *, dtype=torch.float32, device="cpu", pad_frac=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, L, D, generator=g, dtype=torch.float64) for _ in range(3))
    w = gaussian_orthogonal_random_matrix(m, D, generator=g, dtype=torch.float64)
    lengths = torch.randint(max(1, int(L * (1 - pad_frac))), L + 1, (B,), generator=g)
    lengths[0] = L  # one cell without padding
    pad = torch.arange(L)[None, :] >= lengths[:, None]
    conv = lambda t: t.to(dtype=dtype, device=device)  # noqa: E731
    return conv(q), conv(k), conv(v), w.to(device=device, dtype=torch.float32), pad.to(device)


def truth(q, k, v, w, pad, causal, kernel):
    out, _ = performer_attention_ref(q.double().cpu(), k.double().cpu(), v.double().cpu(), w.double().cpu(),
                                     None if pad is None else pad.cpu(), causal, kernel)
    return out


def shapes_for(backend):  # (B, H, L, D, m): odd lengths and head dims, m not a multiple of any tile
    if interpreted(backend):
        return [(1, 1, 1, 16, 7), (2, 2, 17, 20, 21)]
    return [(1, 1, 1, 64, 7), (2, 3, 97, 64, 70), (2, 2, 97, 20, 45), (1, 2, 1025, 64, 266)]


def _params():
    for b in ALL_BACKENDS:
        for shape in shapes_for(b):
            yield pytest.param(b, shape, id=f"{b}-{'x'.join(map(str, shape))}")


@pytest.mark.parametrize("backend,shape", list(_params()))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("kernel", KERNELS)
def test_forward_fp32_matches_reference(backend, shape, causal, kernel):
    dev = require(OP, backend, dtype=torch.float32, head_dim=shape[3], causal=causal)
    q, k, v, w, pad = make_inputs(*shape, device=dev)
    out = performer_attention(q, k, v, w, key_padding_mask=pad, causal=causal, kernel=kernel, backend=backend)
    ref = truth(q, k, v, w, pad, causal, kernel)
    assert out.dtype == torch.float32 and out.shape == q.shape
    assert max_err(out, ref) < 5e-5
    assert torch.equal(out[pad[:, None, :, None].expand_as(out)].cpu(), torch.zeros(int(pad.sum()) * shape[1] * shape[3]))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("kernel", KERNELS)
def test_forward_low_precision_2x_rule(backend, dtype, causal, kernel):
    dev = require(OP, backend, dtype=dtype, head_dim=64, causal=causal)
    shape = (1, 2, 17, 32, 21) if interpreted(backend) else (2, 2, 193, 64, 70)
    q, k, v, w, pad = make_inputs(*shape, dtype=dtype, device=dev)
    out = performer_attention(q, k, v, w, key_padding_mask=pad, causal=causal, kernel=kernel, backend=backend)
    ref = truth(q, k, v, w, pad, causal, kernel)
    lowp, _ = performer_attention_ref(q.cpu(), k.cpu(), v.cpu(), w.cpu(), pad.cpu(), causal, kernel, upcast=False)
    assert out.dtype == dtype
    assert_close_2x(out, lowp, ref)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("kernel", KERNELS)
def test_gradients_match_reference(backend, causal, kernel):
    dev = require(OP, backend, dtype=torch.float32, head_dim=40, causal=causal)
    shape = (1, 2, 17, 20, 21) if interpreted(backend) else (2, 2, 97, 40, 45)
    q, k, v, w, pad = make_inputs(*shape, device=dev)
    args = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = performer_attention(*args, w, key_padding_mask=pad, causal=causal, kernel=kernel, backend=backend)
    gout = torch.randn_like(out)
    grads = torch.autograd.grad(out, args, gout)
    ref_args = [t.detach().double().cpu().requires_grad_(True) for t in (q, k, v)]
    ref, _ = performer_attention_ref(*ref_args, w.double().cpu(), pad.cpu(), causal, kernel)
    ref_grads = torch.autograd.grad(ref, ref_args, gout.double().cpu())
    for name, g_, r in zip("qkv", grads, ref_grads):
        assert torch.isfinite(g_).all()
        assert max_err(g_, r) < 5e-5, f"d{name}"
        padded = pad[:, None, :, None].expand_as(g_)
        assert torch.equal(g_[padded], torch.zeros_like(g_[padded])), f"d{name} on padding"


@pytest.mark.parametrize("causal,kernel", [(False, "softmax"), (False, "relu"), (True, "relu")])
def test_gradcheck_float64_reference_backward(causal, kernel):
    """The hand-written reference backward against numerical gradients. The stabilisers are constants
    in the backward (as in performer-pytorch); they cancel from the output exactly only when eps = 0
    (not with the causal 1e-6 term, so causal softmax is covered by the autograd test below)."""
    q, k, v, w, pad = make_inputs(1, 2, 7, 4, 6, dtype=torch.float64)
    args = [t.requires_grad_(True) for t in (q, k, v)]
    eps = 0.0 if kernel == "softmax" else 1e-3

    def fn(q, k, v):
        return performer_attention(q, k, v, w, key_padding_mask=pad, causal=causal, kernel=kernel, eps=eps,
                                   backend="torch")

    assert torch.autograd.gradcheck(fn, args)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("kernel", KERNELS)
def test_reference_backward_equals_autograd_of_reference(causal, kernel):
    """The hand-written backward (torch backend) against autograd through the materialised forward,
    whose stabilisers are detached exactly as in performer-pytorch."""
    q, k, v, w, pad = make_inputs(2, 2, 9, 6, 10, dtype=torch.float64)
    args = [t.clone().requires_grad_(True) for t in (q, k, v)]
    ref, _ = performer_attention_ref(*args, w.double(), pad, causal, kernel)
    gout = torch.randn_like(ref)
    expected = torch.autograd.grad(ref, args, gout)
    a2 = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = performer_attention(*a2, w.double(), key_padding_mask=pad, causal=causal, kernel=kernel, backend="torch")
    got = torch.autograd.grad(out, a2, gout)
    for g_, e in zip(got, expected):
        assert max_err(g_, e) < 1e-10


# ------------------------------------------------------------------ equivalence with performer-pytorch


def _loop_reference(q, k, v, w, causal, kernel, eps, pad=None):
    """performer-pytorch's maths written token by token in float64, no matrix ops beyond dot
    products: softmax_kernel / generalized_kernel, linear_attention and
    causal_linear_attention_noncuda. With ``pad`` (batch, length), padded keys are left out of every
    sum and of the key stabiliser, and padded queries give zero rows."""
    B, H, L, D = q.shape
    m = w.shape[0]
    s = D ** -0.25
    out = torch.zeros(B, H, L, D, dtype=torch.float64)
    for b in range(B):
        ok = [True] * L if pad is None else [not bool(pad[b, j]) for j in range(L)]
        for h in range(H):
            def proj(x):
                return [sum(s * float(x[d]) * float(w[f, d]) for d in range(D)) for f in range(m)]

            qd = [proj(q[b, h, i]) for i in range(L)]
            kd = [proj(k[b, h, j]) for j in range(L)]
            if kernel == "softmax":
                ck = max((max(r) for r, o in zip(kd, ok) if o), default=0.0)
                phq, phk = [], []
                for i in range(L):
                    dq = s * s * float((q[b, h, i] ** 2).sum()) / 2
                    dk = s * s * float((k[b, h, i] ** 2).sum()) / 2
                    phq.append([m ** -0.5 * (math.exp(a - dq - max(qd[i])) + eps) for a in qd[i]])
                    phk.append([m ** -0.5 * (math.exp(a - dk - ck) + eps) for a in kd[i]])
            else:
                phq = [[max(a, 0.0) + eps for a in r] for r in qd]
                phk = [[max(a, 0.0) + eps for a in r] for r in kd]
            for i in range(L):
                if not ok[i]:
                    continue
                js = [j for j in (range(i + 1) if causal else range(L)) if ok[j]]
                num = torch.zeros(D, dtype=torch.float64)
                den = 0.0
                for j in js:
                    a = sum(phq[i][f] * phk[j][f] for f in range(m))
                    num += a * v[b, h, j].double()
                    den += a
                if causal:
                    den += 1e-6 * sum(phq[i])
                out[b, h, i] = num / den
    return out


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("padded", [False, True], ids=["nopad", "pad"])
def test_reference_equals_per_token_loop(causal, kernel, padded):
    """Installs nothing: the reference (the torch backend, which the forward tests' float64 truth is
    too) computes performer-pytorch's function, with padding as documented."""
    q, k, v, w, pad = make_inputs(2, 2, 6, 5, 7, dtype=torch.float64, pad_frac=0.5)
    pad[1, 1] = True  # padding inside the cell too, not only at its end
    pad = pad if padded else None
    assert not padded or pad.any()
    eps = 1e-4 if kernel == "softmax" else 1e-3
    expected = _loop_reference(q, k, v, w.double(), causal, kernel, eps, pad)
    ref, _ = performer_attention_ref(q, k, v, w.double(), pad, causal, kernel)
    assert max_err(ref, expected) < 1e-12
    out = performer_attention(q.float(), k.float(), v.float(), w, key_padding_mask=pad, causal=causal, kernel=kernel)
    assert max_err(out, expected) < 1e-5


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_matches_performer_pytorch_fast_attention(causal, kernel, backend):
    pp = pytest.importorskip("performer_pytorch", reason="performer-pytorch not installed (optional)")
    require(OP, backend, dtype=torch.float32, head_dim=32)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fa = pp.FastAttention(32, nb_features=50, causal=causal, generalized_attention=kernel == "relu")
    q, k, v, w, _ = make_inputs(2, 3, 130, 32, 50)
    fa.projection_matrix.copy_(w)
    expected = fa(q.double(), k.double(), v.double())
    out = performer_attention(q, k, v, fa.projection_matrix, causal=causal, kernel=kernel, backend=backend)
    assert max_err(out, expected) < 5e-5


# ------------------------------------------------------------------ causal: chunk boundaries


def _check_fwd_bwd(backend, q, k, v, w, pad, kernel, tol=5e-5):
    """Forward and q, k, v gradients of one backend against autograd through the float64 reference."""
    args = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = performer_attention(*args, w, key_padding_mask=pad, causal=True, kernel=kernel, backend=backend)
    gout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = torch.autograd.grad(out, args, gout.to(out))
    ref_args = [t.detach().double().cpu().requires_grad_(True) for t in (q, k, v)]
    ref, _ = performer_attention_ref(*ref_args, w.double().cpu(), None if pad is None else pad.cpu(), True, kernel)
    ref_grads = torch.autograd.grad(ref, ref_args, gout)
    assert max_err(out, ref) < tol, "out"
    for name, g_, r in zip("qkv", grads, ref_grads):
        assert max_err(g_, r) < tol, f"d{name}"
    if pad is not None:
        rows = pad[:, None, :, None].expand_as(out)
        assert not out[rows].any() and not any(g_[rows].any() for g_ in grads)


@pytest.mark.parametrize("backend", ["cpu", "cuda"])
@pytest.mark.parametrize("L", [1, 63, 64, 65, 97, 1025])
@pytest.mark.parametrize("kernel", KERNELS)
def test_causal_chunk_boundaries_match_reference(backend, L, kernel):
    """Lengths around the CPU chunk (64 positions; CUDA's is 16 or less): the chunk's own masked
    scores and the carried prefix state must add up to the token-by-token prefix sums. m = 45 and
    266 are no multiple of 16; padding sits in the second cell's tail."""
    B, H, D, m = (2, 1, 64, 266) if L == 1025 else (2, 2, 24, 45)
    dev = require(OP, backend, dtype=torch.float32, head_dim=D, causal=True, nb_features=m)
    q, k, v, w, pad = make_inputs(B, H, L, D, m, device=dev)
    _check_fwd_bwd(backend, q, k, v, w, pad, kernel)


@pytest.mark.parametrize("backend", ["cpu", "cuda"])
@pytest.mark.parametrize("kernel", KERNELS)
def test_causal_scattered_padding_across_chunks(backend, kernel):
    """Padding anywhere (not only a tail), including whole chunks and chunk edges."""
    dev = require(OP, backend, dtype=torch.float32, head_dim=20, causal=True, nb_features=21)
    q, k, v, w, _ = make_inputs(2, 2, 200, 20, 21, device=dev)
    g = torch.Generator().manual_seed(5)
    pad = torch.rand(2, 200, generator=g) < 0.3
    pad[0, 64:128] = True
    pad[1, [0, 63, 64, 127, 128, 199]] = True
    _check_fwd_bwd(backend, q, k, v, w, pad.to(dev), kernel)


@pytest.mark.parametrize("L", [1, 17, 33])
@pytest.mark.parametrize("kernel", KERNELS)
def test_triton_causal_tiny_matches_reference(L, kernel):
    """The Triton sweep (chunks of 16) on shapes its interpreter runs fast: one chunk, a partial second
    and a partial third; head_dim 20 and m = 24 are padded to power-of-two blocks."""
    dev = require(OP, "triton", dtype=torch.float32, head_dim=20, causal=True, nb_features=24)
    q, k, v, w, pad = make_inputs(2, 2, L, 20, 24, device=dev)
    _check_fwd_bwd("triton", q, k, v, w, pad, kernel)


def test_causal_is_causal_on_every_backend():
    """Changing position j's key and value changes no output before j (and does change j's)."""
    for backend in ALL_BACKENDS:
        if OP.not_supported_reasons(backend, torch.device("cpu"), dtype=torch.float32, head_dim=16, causal=True,
                                    nb_features=19) or (backend in ("cuda",) and not torch.cuda.is_available()):
            continue
        dev = torch.device("cuda") if backend == "cuda" else torch.device("cpu")
        L = 33 if interpreted(backend) else 150
        q, k, v, w, _ = make_inputs(1, 2, L, 16, 19, device=dev)
        # The key stabiliser is a max over all keys (as in performer-pytorch): keep it unchanged by
        # editing a key that is not the argmax, into one whose projections (0) are below the max.
        argmax = set((k.cpu() @ w.cpu().t()).amax(-1).argmax(-1).flatten().tolist())
        j = next(i for i in range(L - 5, 0, -1) if i not in argmax)
        k2, v2 = k.clone(), v.clone()
        k2[..., j, :] = 0
        v2[..., j, :] *= -3
        a = performer_attention(q, k, v, w, causal=True, backend=backend)
        b = performer_attention(q, k2, v2, w, causal=True, backend=backend)
        assert max_err(a[..., :j, :], b[..., :j, :]) < 1e-6, backend
        assert max_err(a[..., j, :], b[..., j, :]) > 1e-2, backend


# ------------------------------------------------------------------ masks, robustness


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_nan_in_padding_does_not_change_output(backend, causal):
    dev = require(OP, backend, dtype=torch.float32, head_dim=32, causal=causal)
    shape = (2, 2, 17, 32, 21) if interpreted(backend) else (2, 3, 150, 32, 45)
    q, k, v, w, pad = make_inputs(*shape, device=dev, pad_frac=0.5)
    pad[1, -1] = True
    out = performer_attention(q, k, v, w, key_padding_mask=pad, causal=causal, backend=backend)
    q2, k2, v2 = (t.clone() for t in (q, k, v))
    for t in (q2, k2, v2):
        t.masked_fill_(pad[:, None, :, None], float("nan"))
    out2 = performer_attention(q2, k2, v2, w, key_padding_mask=pad, causal=causal, backend=backend)
    assert torch.equal(out, out2)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_padded_keys_contribute_nothing(backend):
    """Padding a cell's tail gives the same outputs as cutting the cell short."""
    dev = require(OP, backend, dtype=torch.float32, head_dim=16)
    L, n = (12, 7) if interpreted(backend) else (60, 41)
    q, k, v, w, _ = make_inputs(1, 2, L, 16, 19, device=dev)
    pad = torch.zeros(1, L, dtype=torch.bool, device=dev)
    pad[0, n:] = True
    k2, v2 = k.clone(), v.clone()
    k2[..., n:, :] = 30.0  # would dominate the key stabiliser and the sums if it leaked
    out = performer_attention(q, k2, v2 * 7, w, key_padding_mask=pad, backend=backend)
    cut = performer_attention(q[..., :n, :].contiguous(), k[..., :n, :].contiguous(), (v2 * 7)[..., :n, :].contiguous(),
                              w, backend=backend)
    assert max_err(out[..., :n, :], cut) < 1e-5
    assert torch.equal(out[..., n:, :].cpu(), torch.zeros(1, 2, L - n, 16))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_all_padding_cell_gives_zeros(backend):
    dev = require(OP, backend, dtype=torch.float32, head_dim=16)
    q, k, v, w, _ = make_inputs(2, 2, 9, 16, 19, device=dev)
    pad = torch.zeros(2, 9, dtype=torch.bool, device=dev)
    pad[1] = True
    args = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = performer_attention(*args, w, key_padding_mask=pad, backend=backend)
    assert torch.equal(out[1].detach().cpu(), torch.zeros(2, 9, 16))
    grads = torch.autograd.grad(out.sum(), args)
    assert all(torch.isfinite(g_).all() and not g_[1].any() for g_ in grads)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_non_contiguous_inputs(backend, causal):
    dev = require(OP, backend, dtype=torch.float32, head_dim=32, causal=causal)
    B, L, H, D = (1, 17, 2, 32) if interpreted(backend) else (2, 101, 3, 32)
    qkv = torch.randn(B, L, 3, H, D, device=dev)
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
    assert not q.is_contiguous()
    _, _, _, w, pad = make_inputs(B, H, L, D, 37, device=dev)
    out = performer_attention(q, k, v, w, key_padding_mask=pad, causal=causal, backend=backend)
    assert max_err(out, truth(q, k, v, w, pad, causal, "softmax")) < 2e-5


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_deterministic(backend, causal):
    dev = require(OP, backend, dtype=torch.float32, head_dim=32, causal=causal)
    shape = (1, 2, 17, 32, 21) if interpreted(backend) else (1, 2, 300, 32, 45)
    q, k, v, w, pad = make_inputs(*shape, device=dev)
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    runs = []
    for _ in range(2):
        out = performer_attention(q, k, v, w, key_padding_mask=pad, causal=causal, backend=backend)
        runs.append((out, *torch.autograd.grad(out.square().sum(), (q, k, v))))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_key_stabiliser_is_per_batch_and_head_over_valid_keys(causal):
    q, k, v, w, pad = make_inputs(3, 3, 150, 8, 11)
    pad[2] = True  # a cell with no valid key: stabiliser 0
    dd = (k * 8 ** -0.25) @ w.t()
    expected = dd.masked_fill(pad[:, None, :, None], -math.inf).amax(dim=(-1, -2))
    expected = torch.where(torch.isfinite(expected), expected, 0)
    for backend in [b for b in ("torch", "cpu", "triton") if b in OP.reasons]:
        _, ck, _ = _fwd_op(q, k, v, w, pad, causal, False, 1e-4, backend)
        assert ck.shape == (3, 3)
        torch.testing.assert_close(ck, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_opcheck(backend):
    require(OP, backend, dtype=torch.float32, head_dim=16)
    q, k, v, w, pad = make_inputs(2, 2, 11, 16, 19)
    q.requires_grad_(True), k.requires_grad_(True), v.requires_grad_(True)
    torch.library.opcheck(_fwd_op, (q, k, v, w, pad, False, False, 1e-4, backend))
    torch.library.opcheck(_fwd_op, (q, k, v, w, None, True, True, 1e-3, backend))
    out, _, state = _fwd_op(q.detach(), k.detach(), v.detach(), w, pad, False, False, 1e-4, backend)
    torch.library.opcheck(_bwd_op, (torch.randn_like(out), q.detach(), k.detach(), v.detach(), w, out, state, pad,
                                    False, False, 1e-4, backend))


@pytest.mark.parametrize("relu", [False, True], ids=["softmax", "relu"])
def test_cpu_backward_from_saved_key_state_equals_recomputing_it(relu):
    """The C++ non-causal forward keeps C = phi(K)^T V, z and the stabiliser for its backward; the
    backward given no state recomputes them from k and v: both must give the same gradients."""
    require(OP, "cpu", dtype=torch.float32, head_dim=20)
    q, k, v, w, pad = make_inputs(2, 3, 97, 20, 45)
    out, _, state = _fwd_op(q, k, v, w, pad, False, relu, 1e-4, "cpu")
    assert state.shape[:2] == (2, 3) and state.numel() > 0
    g = torch.randn_like(out)
    saved = _bwd_op(g, q, k, v, w, out, state, pad, False, relu, 1e-4, "cpu")
    again = _bwd_op(g, q, k, v, w, out, torch.empty(0), pad, False, relu, 1e-4, "cpu")
    for a, b in zip(saved, again):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_torch_compile_fullgraph():
    q, k, v, w, pad = make_inputs(2, 2, 19, 16, 19)

    def f(q, k, v):
        return performer_attention(q, k, v, w, key_padding_mask=pad).relu().sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    args = [t.clone().requires_grad_(True) for t in (q, k, v)]
    val = compiled(*args)
    val.backward()
    torch.testing.assert_close(val, f(q, k, v))
    assert all(a.grad is not None and torch.isfinite(a.grad).all() for a in args)


def test_projection_gets_no_gradient():
    q, k, v, w, _ = make_inputs(1, 1, 5, 8, 9)
    w = w.clone().requires_grad_(True)
    out = performer_attention(q.requires_grad_(True), k, v, w)
    out.sum().backward()
    assert w.grad is None and q.grad is not None


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda a: a.update(projection=a["projection"][:, :-1]), r"projection must have shape \(\*, 8\)"),
        (lambda a: a.update(projection=a["projection"][None]), r"projection must have 2 dimensions"),
        (lambda a: a.update(q=a["q"][0]), r"q must have 4 dimensions"),
        (lambda a: a.update(k=a["k"][:, :, :-1]), r"k must have shape \(2, 2, 9, 8\)"),
        (lambda a: a.update(v=a["v"].double()), r"v must have dtype float32"),
        (lambda a: a.update(key_padding_mask=a["key_padding_mask"][:, :-1]), r"key_padding_mask must have shape"),
        (lambda a: a.update(kernel="cosine"), r"kernel must be one of"),
        (lambda a: a.update(eps=-1.0), r"eps must be a finite number"),
        (lambda a: a.update(q=torch.randn(2, 2, 9, 130), k=torch.randn(2, 2, 9, 130), v=torch.randn(2, 2, 9, 130),
                            projection=torch.randn(5, 130)), r"head dimension at most 128"),
    ],
)
def test_bad_input_names_the_argument(mutate, match):
    q, k, v, w, pad = make_inputs(2, 2, 9, 8, 10)
    a = dict(q=q, k=k, v=v, projection=w, key_padding_mask=pad)
    mutate(a)
    with pytest.raises((ValueError, TypeError), match=match):
        performer_attention(a.pop("q"), a.pop("k"), a.pop("v"), a.pop("projection"), **a)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("name", ["q", "k", "v", "projection"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_non_finite_input_is_refused(backend, name, bad, dtype):
    """Documented choice: NaN / inf outside the padding raises before the kernel runs."""
    require(OP, backend, dtype=dtype, head_dim=8)
    q, k, v, w, pad = make_inputs(2, 2, 9, 8, 10)
    a = dict(q=q.to(dtype), k=k.to(dtype), v=v.to(dtype), projection=w)
    a[name] = a[name].clone()
    a[name][(3, 5) if name == "projection" else (0, 0, 3, 5)] = bad  # cell 0 has no padding
    with pytest.raises(ValueError, match=f"{name} contains NaN or infinity"):
        performer_attention(a["q"], a["k"], a["v"], a["projection"], key_padding_mask=pad, backend=backend)


def test_explicit_backend_that_cannot_run_lists_reasons():
    q, k, v, w, _ = make_inputs(1, 1, 5, 8, 9)
    with pytest.raises(BackendUnavailableError, match=r"(?s)cuda.*torch: available"):
        performer_attention(q, k, v, w, backend="cuda")


def test_triton_causal_feature_limit_is_refused_with_the_reason():
    if "triton" not in OP.reasons:
        pytest.skip("triton not installed")
    q, k, v, _, _ = make_inputs(1, 1, 5, 16, 9)
    w = torch.randn(TRITON_CAUSAL_MAX_FEATURES + 1, 16)
    with pytest.raises(BackendUnavailableError, match=r"triton: supports causal=True with at most 256 random"):
        performer_attention(q, k, v, w, causal=True, backend="triton")
    assert not OP.not_supported_reasons("triton", torch.device("cpu"), dtype=torch.float32, head_dim=16, causal=True,
                                        nb_features=TRITON_CAUSAL_MAX_FEATURES)


def test_cuda_causal_feature_limit_reason():
    if "cuda" not in OP.reasons:
        pytest.skip("CUDA extension not built")
    fits = dict(dtype=torch.float32, head_dim=128, causal=True, nb_features=2750)
    assert not OP.reasons["cuda"](**fits)
    assert "random features" in " ".join(OP.reasons["cuda"](**dict(fits, nb_features=2751)))
    assert not OP.reasons["cuda"](**dict(fits, causal=False, nb_features=10000))


def test_auto_prefers_cpu_kernel_on_cpu():
    if "cpu" not in OP.reasons:
        pytest.skip("C++ kernel not built")
    assert OP.select(None, torch.device("cpu"), dtype=torch.float32, head_dim=64) == "cpu"
    assert OP.select(None, torch.device("cpu"), dtype=torch.float64, head_dim=64) == "torch"


@pytest.mark.parametrize("cap", ["base", "avx2", "avx512", "avx512_bf16"])
def test_every_compiled_simd_level_matches_reference(cap):
    run_with_cpu_capability(OP, cap, (
        "from tests.ops.test_performer import make_inputs, truth\n"
        "from biogen.ops import performer_attention\n"
        "q,k,v,w,pad = make_inputs(2,2,70,40,45)\n"
        "for causal in (False, True):\n"
        "    args = [t.clone().requires_grad_(True) for t in (q,k,v)]\n"
        "    out = performer_attention(*args, w, key_padding_mask=pad, causal=causal, backend='cpu')\n"
        "    err = (out.double()-truth(q,k,v,w,pad,causal,'softmax')).abs().max().item(); assert err < 5e-5, err\n"
        "    out.sum().backward(); assert all(torch.isfinite(a.grad).all() for a in args)\n"
    ))


def bf16_2x_rule(shape, kernel):
    """bfloat16 inputs: forward and gradients within twice the error of the reference computed in
    bfloat16 (FlashAttention's rule) against float64."""
    q, k, v, w, pad = make_inputs(*shape, dtype=torch.bfloat16)
    args = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = performer_attention(*args, w, key_padding_mask=pad, kernel=kernel, backend="cpu")
    gout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
    grads = torch.autograd.grad(out, args, gout)
    f64 = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    truth_out, _ = performer_attention_ref(*f64, w.double(), pad, False, kernel)
    truth_grads = torch.autograd.grad(truth_out, f64, gout.double())
    lowp_args = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    lowp_out, _ = performer_attention_ref(*lowp_args, w, pad, False, kernel, upcast=False)
    lowp_grads = torch.autograd.grad(lowp_out, lowp_args, gout)
    assert out.dtype == torch.bfloat16
    assert_close_2x(out, lowp_out, truth_out)
    for name, g_, lg, tg in zip("qkv", grads, lowp_grads, truth_grads):
        assert torch.isfinite(g_).all(), f"d{name}"
        assert_close_2x(g_, lg, tg)


@pytest.mark.parametrize("cap", ["avx512", "avx512_bf16"])
def test_bf16_inputs_on_each_avx512_level_follow_the_2x_rule(cap):
    """avx512_bf16 takes the products of bfloat16 inputs with AVX512-BF16 dot products (operands
    rounded to bf16, float32 sums), avx512 in float32: both within the low-precision rule, for odd
    head dims and feature counts (packing pads a pair) and tile-crossing, padded lengths."""
    run_with_cpu_capability(OP, cap, (
        "from tests.ops.test_performer import bf16_2x_rule\n"
        "for shape in [(2, 2, 97, 20, 45), (1, 2, 1025, 64, 266), (1, 1, 3, 64, 7)]:\n"
        "    for kernel in ('softmax', 'relu'):\n"
        "        bf16_2x_rule(shape, kernel)\n"
    ))


# ------------------------------------------------------------------ random features


@pytest.mark.parametrize("m,d", [(266, 64), (7, 16), (40, 16)])
def test_orthogonal_random_matrix_blocks_are_orthogonal(m, d):
    w = gaussian_orthogonal_random_matrix(m, d, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert w.shape == (m, d)
    for start in range(0, m, d):
        blk = w[start:start + d]
        unit = blk / blk.norm(dim=1, keepdim=True)
        torch.testing.assert_close(unit @ unit.t(), torch.eye(len(blk), dtype=torch.float64), atol=1e-10, rtol=0)


def test_orthogonal_random_matrix_row_norms_follow_scaling():
    w1 = gaussian_orthogonal_random_matrix(100, 16, scaling=1, dtype=torch.float64)
    torch.testing.assert_close(w1.norm(dim=1), torch.full((100,), 4.0, dtype=torch.float64))
    w0 = gaussian_orthogonal_random_matrix(4000, 16, scaling=0, generator=torch.Generator().manual_seed(0),
                                           dtype=torch.float64)
    sq = w0.norm(dim=1) ** 2  # chi-squared with 16 degrees of freedom: mean 16, variance 32
    assert abs(float(sq.mean()) - 16) < 4 * math.sqrt(32 / 4000)
    assert abs(float(sq.var()) - 32) < 0.25 * 32
    assert float(sq.std()) > 1.0  # not all sqrt(dim)


def test_orthogonal_random_matrix_seeded_generator_reproducible():
    a = gaussian_orthogonal_random_matrix(70, 16, generator=torch.Generator().manual_seed(3))
    b = gaussian_orthogonal_random_matrix(70, 16, generator=torch.Generator().manual_seed(3))
    c = gaussian_orthogonal_random_matrix(70, 16, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.dtype == torch.float32


def test_orthogonal_random_matrix_bad_arguments():
    with pytest.raises(ValueError, match="scaling must be 0 or 1"):
        gaussian_orthogonal_random_matrix(4, 4, scaling=2)
    with pytest.raises(ValueError, match="must be positive"):
        gaussian_orthogonal_random_matrix(0, 4)


# ------------------------------------------------------------------ the layer


def test_layer_redraws_at_the_interval_and_never_in_eval():
    torch.manual_seed(0)
    layer = PerformerAttention(16, heads=2, dim_head=8, redraw_interval=3)
    assert layer.projection.shape == (int(8 * math.log(8)), 8)
    x = torch.randn(2, 5, 16)
    seen = []
    for _ in range(7):
        layer(x)
        seen.append(layer.projection.clone())
    changed = [not torch.equal(seen[i], seen[i - 1]) for i in range(1, 7)]
    assert changed == [False, False, True, False, False, True]  # calls 4 and 7 draw anew
    layer.eval()
    before = layer.projection.clone()
    for _ in range(10):
        layer(x)
    assert torch.equal(layer.projection, before)


def test_layer_computes_the_kernel_on_its_projections():
    torch.manual_seed(0)
    layer = PerformerAttention(16, heads=2, dim_head=8, nb_features=11, redraw_interval=None).eval()
    x = torch.randn(2, 6, 16)
    pad = torch.tensor([[False] * 6, [False] * 4 + [True] * 2])
    y = layer(x, key_padding_mask=pad)
    q, k, v = (f(x).view(2, 6, 2, 8).transpose(1, 2).double() for f in (layer.to_q, layer.to_k, layer.to_v))
    ref, _ = performer_attention_ref(q, k, v, layer.projection.double(), pad)
    expected = layer.to_out.double()(ref.transpose(1, 2).reshape(2, 6, 16))
    assert max_err(y, expected) < 1e-5
    layer.float()


def test_layer_bad_arguments():
    with pytest.raises(ValueError, match="redraw_interval"):
        PerformerAttention(16, heads=2, dim_head=8, redraw_interval=0)
    with pytest.raises(ValueError, match="kernel"):
        PerformerAttention(16, kernel="cos")
