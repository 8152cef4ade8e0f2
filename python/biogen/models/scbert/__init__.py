"""scBERT-style model: ``network`` (config + tensors-in/tensors-out Performer), ``model`` (the AnnData-facing
:class:`ScBERT`, tokenisation), ``checkpoint`` (performer-pytorch checkpoints) and ``annotator``."""

from .checkpoint import load_scbert_checkpoint, map_scbert_keys
from .model import ScBERT, ScBERTTokens, load_gene_vectors, scbert_tokens
from .network import MASK_TOKEN, N_BINS, ScBERTConfig, ScBERTModel, ScBERTOutput

__all__ = [
    "MASK_TOKEN", "N_BINS", "ScBERT", "ScBERTConfig", "ScBERTModel", "ScBERTOutput", "ScBERTTokens",
    "load_gene_vectors", "load_scbert_checkpoint", "map_scbert_keys", "scbert_tokens",
]
