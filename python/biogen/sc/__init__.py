"""Single-cell data layer: preprocessing, gene vocabulary, scGPT binning, tokenisation, datasets.

Modules
-------
preprocess  counts checks, normalize_total + log1p, HVG selection, filters (scanpy; copy semantics)
vocab       GeneVocab: gene symbols <-> token ids (``<pad>`` 0, ``<cls>`` 1, ``<mask>`` 2)
binning     scGPT per-cell quantile binning (C++ kernel with a numpy fallback, identical results)
tokenize    ScGPTTokenizer: non-zero genes + ``<cls>``, subsampling, binned / continuous values
data        ScGPTDataset (torch Dataset, in-memory or backed .h5ad) and ``collate``
datasets    pbmc68k() with recovered counts; synthetic() negative-binomial AnnData; synthetic_h5ad()
            writes a large synthetic .h5ad chunk by chunk
streaming   StreamingScGPTDataset: out-of-core IterableDataset over backed .h5ad file(s), per-rank shards
"""

from .binning import bin_values
from .data import ScGPTDataset, collate
from .datasets import pbmc68k, synthetic, synthetic_h5ad
from .preprocess import check_counts, preprocess
from .streaming import StreamingScGPTDataset
from .tokenize import ScGPTTokenizer
from .vocab import GeneVocab

__all__ = ["bin_values", "GeneVocab", "ScGPTTokenizer", "ScGPTDataset", "collate", "preprocess", "check_counts",
           "pbmc68k", "synthetic", "synthetic_h5ad", "StreamingScGPTDataset"]
