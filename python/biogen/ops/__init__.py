"""Fast kernels with a pure-PyTorch reference as oracle and fallback.

Every op is a ``torch.library`` custom op (``biogen::<name>_fwd`` / ``_bwd``) with a fake
implementation and registered autograd, so it works under ``torch.compile`` and passes
``torch.library.opcheck``. Choose a backend per call (``backend=``), per block
(:func:`use_backend`) or per process (``BIOGEN_BACKEND``); see :mod:`biogen.ops._runtime`.
"""

from ._runtime import (
    BACKENDS,
    BackendUnavailableError,
    available_backends,
    build_info,
    use_backend,
)
from .group_norm import group_norm_silu
from .masked_attention import masked_gene_attention
from .sampler import sampler_step

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "available_backends",
    "build_info",
    "group_norm_silu",
    "masked_gene_attention",
    "sampler_step",
    "use_backend",
]
