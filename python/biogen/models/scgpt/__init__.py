"""scGPT-style model: ``network`` (config + tensors-in/tensors-out module), ``model`` (the AnnData-facing
:class:`ScGPT`), ``checkpoint`` (the reference code's checkpoints) and ``annotator`` (``biogen sc benchmark``)."""

from .checkpoint import load_scgpt_checkpoint, map_reference_keys
from .model import ScGPT
from .network import GenerationResult, ScGPTConfig, ScGPTModel, ScGPTOutput

__all__ = [
    "GenerationResult", "ScGPT", "ScGPTConfig", "ScGPTModel", "ScGPTOutput", "load_scgpt_checkpoint",
    "map_reference_keys",
]
