"""Backend selection on a GPU, tested without one: fake devices through ``_cuda_device_status``.

The compatibility rules asserted here come from the CUDA documentation (SASS runs on the same major
version with an equal or higher minor one; PTX is JIT-compiled for any newer architecture; an
``a`` architecture runs only on itself), not from the code under test.
"""

from __future__ import annotations

import contextlib
import types

import pytest
import torch

from biogen import cli
from biogen.ops import _runtime, group_norm, masked_attention, performer, sampler
from biogen.ops._runtime import BackendUnavailableError, CudaStatus

CUDA0 = torch.device("cuda", 0)
OPS = {"masked": masked_attention.OP, "performer": performer.OP, "group_norm": group_norm.OP,
       "sampler": sampler.OP}
INPUTS = {"masked": dict(dtype=torch.bfloat16, head_dim=64),
          "performer": dict(dtype=torch.bfloat16, head_dim=64, causal=False, nb_features=266),
          "group_norm": dict(dtype=torch.bfloat16), "sampler": dict(dtype=torch.float32)}

H100 = CudaStatus(compiled=True, archs="80,90", runtime_version=13000, driver_version=13000, device_count=1,
                  capability=(9, 0))
T4 = CudaStatus(compiled=True, archs="80,90", runtime_version=13000, driver_version=13000, device_count=1,
                capability=(7, 5))
NO_DRIVER = CudaStatus(compiled=True, archs="80,90", runtime_version=13000, driver_version=0,
                       error="cudaErrorInsufficientDriver: CUDA driver version is insufficient for CUDA runtime "
                             "version")
OLD_DRIVER = CudaStatus(compiled=True, archs="80,90", runtime_version=13000, driver_version=12040,
                        error="cudaErrorInsufficientDriver: CUDA driver version is insufficient")
NO_DEVICE = CudaStatus(compiled=True, archs="80,90", runtime_version=13000, driver_version=13000,
                       device_count=0)


@pytest.fixture
def fake_gpu(monkeypatch):
    """Install a fake device status; every op gets a cuda and a triton implementation to choose from
    (the CPU-only extension has no CUDA objects, and Triton may be missing), as on a GPU build."""

    def install(status: CudaStatus, triton_module=None):
        monkeypatch.setattr(_runtime, "_cuda_device_status", lambda device: status)
        monkeypatch.setattr(_runtime, "_triton_installed", lambda: True)
        for op in OPS.values():
            monkeypatch.setitem(op.reasons, "cuda", op.reasons.get("cuda", lambda **_: []))
            monkeypatch.setitem(op.reasons, "triton", op.reasons.get("triton", lambda **_: []))
        fake_module = triton_module or types.SimpleNamespace()
        monkeypatch.setattr(_runtime, "triton_kernel", lambda name: fake_module)

    return install


# ----------------------------------------------------------------------------- compatibility rules


@pytest.mark.parametrize("archs,cap,ok", [
    ("80,90", (8, 0), True), ("80,90", (8, 6), True), ("80,90", (8, 9), True), ("80,90", (9, 0), True),
    ("80,90", (10, 0), True), ("80,90", (12, 0), True),  # PTX compute_90 JIT-compiles forward
    ("80,90", (7, 5), False), ("80,90", (7, 0), False),
    ("80-real,90-real", (10, 0), False), ("80-real,90-real", (8, 6), True),
    ("80-virtual", (8, 6), True), ("80-virtual", (7, 5), False),
    ("90a", (9, 0), True), ("90a", (10, 0), False), ("86-real", (8, 0), False),
])
def test_arch_supported_follows_cuda_compatibility(archs, cap, ok):
    assert _runtime.arch_supported(cap, archs) is ok


def test_arch_list_without_numbers_is_unknown_not_a_rejection():
    assert _runtime.arch_supported((7, 5), "native") is None
    assert _runtime.cuda_reasons(CudaStatus(**{**H100.__dict__, "archs": "all", "capability": (7, 5)}), 0) == []


# ----------------------------------------------------------------------------- reasons per condition


@pytest.mark.parametrize("status,words", [
    (T4, ["7.5", "sm_75", "sm_80"]),
    (NO_DRIVER, ["no NVIDIA driver", "13.0"]),
    (OLD_DRIVER, ["12.4", "13.0", "update the driver"]),
    (NO_DEVICE, ["no CUDA device"]),
    (CudaStatus(), ["without CUDA objects"]),
])
def test_cuda_backend_reasons_name_the_condition(fake_gpu, status, words):
    fake_gpu(status)
    reasons = "; ".join(_runtime.backend_reasons("cuda", CUDA0))
    for w in words:
        assert w in reasons, reasons


def test_healthy_device_has_no_reasons(fake_gpu):
    fake_gpu(H100)
    assert _runtime.backend_reasons("cuda", CUDA0) == []
    assert _runtime.backend_reasons("triton", CUDA0) == []


def test_device_index_beyond_count_is_a_reason(fake_gpu):
    fake_gpu(H100)
    assert "cuda:3 does not exist" in "; ".join(_runtime.backend_reasons("cuda", torch.device("cuda", 3)))


def test_kernel_image_that_fails_to_load_is_a_reason(fake_gpu):
    fake_gpu(CudaStatus(**{**H100.__dict__, "image_error": "cudaErrorNoKernelImageForDevice: no kernel image"}))
    assert "NoKernelImage" in "; ".join(_runtime.backend_reasons("cuda", CUDA0))


def test_triton_needs_ampere(fake_gpu):
    fake_gpu(T4)
    assert "8.0 or newer" in "; ".join(_runtime.backend_reasons("triton", CUDA0))


# ----------------------------------------------------------------------------- the auto order on a GPU


def test_gpu_order_is_tensor_cores_first_for_attention_and_simt_first_for_memory_bound(fake_gpu):
    fake_gpu(H100)
    chosen = {name: op.select(None, CUDA0, **INPUTS[name]) for name, op in OPS.items()}
    assert chosen == {"masked": "triton", "performer": "triton", "group_norm": "cuda", "sampler": "cuda"}


@pytest.mark.parametrize("status", [T4, NO_DRIVER, OLD_DRIVER, NO_DEVICE])
def test_auto_falls_back_without_error_and_explicit_cuda_raises_with_the_reason(fake_gpu, status):
    fake_gpu(status)
    why = "; ".join(_runtime.cuda_reasons(status, 0))
    for name, op in OPS.items():
        chosen = op.select(None, CUDA0, **INPUTS[name])
        assert chosen in ("triton", "torch") and chosen != "cuda"
        with pytest.raises(BackendUnavailableError) as err:
            op.select("cuda", CUDA0, **INPUTS[name])
        assert why and why in str(err.value)


def test_triton_call_limits_send_auto_to_the_cuda_fallback(fake_gpu):
    """A Triton module that cannot fit a call (shared memory) declares it; auto takes the next backend."""
    seen = {}

    def unsupported_reasons(*, head_dim, device):  # takes a subset of the inputs: the rest are filtered
        seen.update(head_dim=head_dim, device=device)
        return ["needs 300 KB of shared memory, the device has 227 KB"] if head_dim == 128 else []

    fake_gpu(H100, types.SimpleNamespace(unsupported_reasons=unsupported_reasons))
    op = masked_attention.OP
    assert op.select(None, CUDA0, dtype=torch.bfloat16, head_dim=64) == "triton"
    assert seen == {"head_dim": 64, "device": CUDA0}
    assert op.select(None, CUDA0, dtype=torch.bfloat16, head_dim=128) == "cuda"
    with pytest.raises(BackendUnavailableError, match="300 KB"):
        op.select("triton", CUDA0, dtype=torch.bfloat16, head_dim=128)


def test_a_failing_triton_limits_function_is_a_reason_not_a_crash(fake_gpu):
    def unsupported_reasons(**_):
        raise RuntimeError("device query failed")

    fake_gpu(H100, types.SimpleNamespace(unsupported_reasons=unsupported_reasons))
    assert performer.OP.select(None, CUDA0, **INPUTS["performer"]) == "cuda"
    assert "device query failed" in "; ".join(performer.OP.not_supported_reasons("triton", CUDA0,
                                                                                  **INPUTS["performer"]))


def test_gpu_order_must_end_with_the_reference():
    with pytest.raises(ValueError, match="end with 'torch'"):
        _runtime.KernelOp("x", gpu_order=("triton", "cuda"))
    with pytest.raises(ValueError, match="must name backends"):
        _runtime.KernelOp("x", gpu_order=("tensorrt", "torch"))


# ----------------------------------------------------------------------------- biogen info


def test_info_says_why_cuda_is_unavailable_on_a_fake_sm75(fake_gpu, capsys):
    fake_gpu(T4)
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    section = out[out.index("backends for cuda tensors:"):]
    cuda_line = next(line for line in section.splitlines() if line.strip().startswith("cuda "))
    assert "unavailable" in cuda_line and "sm_75" in cuda_line and "compute capability 7.5" in cuda_line
    assert "masked_gene_attention triton > cuda > torch" in out and "group_norm_silu cuda > triton > torch" in out


def test_info_says_why_cuda_is_unavailable_without_a_driver(fake_gpu, capsys):
    fake_gpu(NO_DRIVER)
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    section = out[out.index("backends for cuda tensors:"):]
    assert "no NVIDIA driver found" in section


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a usable GPU")
def test_info_on_this_cpu_machine_lists_cuda_with_a_reason(capsys):
    _runtime._CUDA_STATUS.clear()  # the real query, not a cached fake
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    section = out[out.index("backends for cuda tensors:"):]
    cuda_line = next(line for line in section.splitlines() if line.strip().startswith("cuda "))
    assert "unavailable: " in cuda_line and len(cuda_line.split("unavailable: ")[1]) > 10
    # and ops on CPU tensors still run by auto selection
    q = torch.randn(1, 1, 5, 8)
    assert masked_attention.masked_gene_attention(q, q, q).shape == q.shape


@pytest.mark.skipif(_runtime._C is None or not hasattr(_runtime._C, "cuda_status"),
                    reason="extension built without CUDA objects")
def test_real_cuda_status_query_never_raises():
    st = _runtime._query_cuda_status(0)
    assert st.compiled and st.runtime_version >= 12000
    if not torch.cuda.is_available():
        assert _runtime.cuda_reasons(st, 0)  # no GPU here: some reason, not an exception
    assert _runtime._query_cuda_status(7).capability is None or st.device_count > 7


# ----------------------------------------------------------------------------- launches on the tensors' device


def test_on_device_selects_the_tensors_device():
    guard = _runtime.on_device(types.SimpleNamespace(device=torch.device("cuda", 1)))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert isinstance(_runtime.on_device(torch.zeros(1)), contextlib.nullcontext)


def _run_op(name):
    g = torch.Generator().manual_seed(0)
    if name == "masked":
        q, k, v = (torch.randn(1, 2, 7, 8, generator=g, requires_grad=True) for _ in range(3))
        masked_attention.masked_gene_attention(q, k, v, backend="torch").sum().backward()
        return q
    if name == "performer":
        q, k, v = (torch.randn(1, 2, 7, 8, generator=g, requires_grad=True) for _ in range(3))
        w = performer.gaussian_orthogonal_random_matrix(12, 8, generator=g)
        performer.performer_attention(q, k, v, w, backend="torch").sum().backward()
        return q
    if name == "group_norm":
        x = torch.randn(2, 4, 3, 3, generator=g, requires_grad=True)
        group_norm.group_norm_silu(x, 2, backend="torch").sum().backward()
        return x
    x = torch.randn(2, 5, generator=g)
    sampler.sampler_step(x, x, alpha_t=0.9, sigma_t=0.3, c_sample=0.5, c_x0=0.5, backend="cpu")
    return x


@pytest.mark.parametrize("name", list(OPS))
def test_every_launch_runs_under_the_device_guard(monkeypatch, name):
    """Each op enters on_device(<its input>) around its kernels (forward and backward), so a CUDA
    launch goes to the tensors' device; recorded here on the CPU."""
    entered = []

    @contextlib.contextmanager
    def recording(t):
        entered.append(t.device)
        yield

    module = {"masked": masked_attention, "performer": performer, "group_norm": group_norm,
              "sampler": sampler}[name]
    monkeypatch.setattr(module, "on_device", recording)
    x = _run_op(name)
    expected = 1 if name == "sampler" else 2  # forward + backward
    if name == "sampler":
        assert entered == [x.device]
    else:
        assert entered == [x.device] * expected


def test_cuda_performer_declares_its_shared_memory_limit():
    """(2 x 128 + 2 m) floats of dynamic shared memory + ~2 KB static must fit 99 KB, the smallest
    per-block opt-in limit among sm_80+ GPUs."""
    ok = performer._reasons_cuda(dtype=torch.float32, head_dim=64, causal=False, nb_features=12288)
    too_many = performer._reasons_cuda(dtype=torch.float32, head_dim=64, causal=False, nb_features=12289)
    assert ok == [] and "99 KB" in "; ".join(too_many)
