"""The launches the Triton launchers make for a given call, recorded on ``meta`` tensors for a GPU
architecture (nothing runs): the kernels, their real arguments and the plans' configs."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from biogen.ops.triton import _common, masked_attention, performer

ARCHS = {"sm80": _common.SM80, "sm90": _common.SM90}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Case:
    op: str  # "masked" or "performer"
    dtype: str
    head_dim: int
    m: int = 0  # performer features
    causal: bool = False
    unknown: bool = False  # masked: with unknown genes (the self-term path)
    relu: bool = False

    @property
    def id(self) -> str:
        if self.op == "masked":
            return f"masked-{self.dtype}-d{self.head_dim}-{'unk' if self.unknown else 'known'}"
        return (f"performer-{self.dtype}-d{self.head_dim}-m{self.m}-{'causal' if self.causal else 'full'}"
                f"-{'relu' if self.relu else 'softmax'}")


def _meta(*shape, dtype):
    return torch.empty(*shape, dtype=dtype, device="meta")


def launches(case: Case, arch, B: int = 2, H: int = 4, L: int = 1200) -> list:
    """Forward and backward launches of ``case`` as the launchers plan them for ``arch``."""
    dt = DTYPES[case.dtype]
    D = case.head_dim
    q, k, v = (_meta(B, H, L, D, dtype=dt) for _ in range(3))
    kpm = _meta(B, L, dtype=torch.bool)
    with _common.recording(arch) as rec:
        if case.op == "masked":
            known = _meta(B, L, dtype=torch.bool) if case.unknown else None
            out, lse = masked_attention.forward(q, k, v, kpm, known, D ** -0.5)
            masked_attention.backward(torch.empty_like(out), q, k, v, out, lse, kpm, known, D ** -0.5)
        else:
            w = _meta(case.m, D, dtype=torch.float32)
            out, _ = performer.forward(q, k, v, w, kpm, case.causal, case.relu, 1e-4)
            performer.backward(torch.empty_like(out), q, k, v, w, out, kpm, case.causal, case.relu, 1e-4)
    return rec


def full_matrix() -> list[Case]:
    """Every variant the launchers can choose: dtype x head_dim 32/64/128 x (masked: with and
    without unknown genes; performer: m 128/256/266 x causal x softmax/relu)."""
    out = []
    for dt, d in itertools.product(DTYPES, (32, 64, 128)):
        out += [Case("masked", dt, d, unknown=u) for u in (False, True)]
        out += [Case("performer", dt, d, m, c, relu=r) for m, c, r in itertools.product((128, 256, 266), (False, True),
                                                                                       (False, True))]
    return out


def default_subset() -> list[Case]:
    """The CI subset: every kernel and every dtype at least once, the largest shapes (head_dim 128,
    m 256, the causal bf16 case that used not to fit), the fp32 (3xTF32) paths, relu only once."""
    return [
        Case("masked", "bf16", 128, unknown=True),
        Case("masked", "fp16", 64, unknown=False),
        Case("masked", "fp32", 128, unknown=True),
        Case("performer", "bf16", 128, 256, causal=False),
        Case("performer", "bf16", 128, 256, causal=True),
        Case("performer", "fp32", 64, 266, causal=True),
        Case("performer", "fp16", 64, 128, causal=False, relu=True),
    ]
