"""scGPT tokenisation: per cell, ``<cls>`` + the cell's non-zero genes (or all genes) with their values.

A tokenised cell is three aligned 1-D arrays of length ``1 + n_genes_kept`` (at most ``max_seq_len``):

- ``gene_ids`` int64: ``vocab.cls_id`` then the vocabulary ids of the kept genes (column order);
- ``values`` float32: 0 at ``<cls>`` then the cell's values as given (continuous input style);
- ``binned`` int64: 0 at ``<cls>`` then the scGPT bins (1..n_bins-1 for non-zeros, 0 for zeros).

Binning is done over all of the cell's genes that are in the vocabulary, before subsampling (as
scGPT bins in preprocessing and subsamples at tokenisation). Cells with more genes than fit are
subsampled uniformly without replacement to ``max_seq_len - 1`` genes (``<cls>`` always kept) with
a per-cell RNG seeded by ``(seed, epoch, cell index)``, so results do not depend on access order.
Padding and masking happen in :mod:`biogen.sc.data`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from .binning import _bin_csr_arrays, _check_values
from .vocab import GeneVocab

__all__ = ["ScGPTTokenizer", "TokenizedCells", "get_matrix"]

_SUBSAMPLE_STREAM = 0x5AB5A


@dataclass
class TokenizedCells:
    """Per-cell token arrays (lists of length n_cells; arrays of length 1 + kept genes)."""

    gene_ids: list
    values: list
    binned: list

    def __len__(self) -> int:
        return len(self.gene_ids)

    def __getitem__(self, i: int) -> dict:
        return {"gene_ids": self.gene_ids[i], "values": self.values[i], "binned": self.binned[i]}


def get_matrix(adata, layer: str | None = None):
    """``adata.X`` or ``adata.layers[layer]`` (works for backed AnnData), with a clear error."""
    if layer is None:
        if adata.X is None:
            raise ValueError("adata.X is None; pass layer= naming the layer with the values")
        return adata.X
    if layer not in adata.layers:
        raise KeyError(f"layer {layer!r} not in adata.layers (available: {list(adata.layers.keys())})")
    return adata.layers[layer]


def _rows_csr(m, start: int, stop: int) -> sp.csr_matrix:
    """Rows [start, stop) of an in-memory or backed matrix as CSR with sorted indices."""
    block = m[start:stop]
    if sp.issparse(block):
        block = sp.csr_matrix(block)  # csr_array rows would index to 1-D; keep 2-D matrix semantics
    elif hasattr(block, "to_memory"):
        block = block.to_memory()
        block = block.tocsr() if sp.issparse(block) else sp.csr_matrix(np.asarray(block))
    else:
        block = sp.csr_matrix(np.asarray(block))
    if not block.has_sorted_indices:
        block = block.copy()
        block.sort_indices()
    return block


class ScGPTTokenizer:
    """Turns cells into scGPT token sequences.

    Parameters
    ----------
    vocab: GeneVocab mapping gene names to ids.
    n_bins: bins including bin 0 for zeros (scGPT: 51).
    max_seq_len: maximum tokens per cell including ``<cls>`` (>= 2).
    pad_value, mask_value: input values used for padding / masked positions (read by
        :mod:`biogen.sc.data`; must differ from each other and be negative so they never collide
        with real values or bins).
    include_zero_genes: keep every vocabulary gene of the input (zeros too) instead of only non-zeros.
    seed: seeds binning ties and subsampling.
    min_overlap: minimum fraction / count of input genes that must be in the vocabulary.
    """

    def __init__(self, vocab: GeneVocab, n_bins: int = 51, max_seq_len: int = 1200, pad_value: float = -2,
                 mask_value: float = -1, include_zero_genes: bool = False, seed: int = 0,
                 min_overlap: float | int = 0.5):
        if not isinstance(vocab, GeneVocab):
            raise TypeError(f"vocab must be a GeneVocab, got {type(vocab).__name__}")
        if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 3:
            raise ValueError(f"n_bins must be an integer >= 3, got {n_bins!r}")
        if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, (int, np.integer)) or max_seq_len < 2:
            raise ValueError(f"max_seq_len must be an integer >= 2 (<cls> + one gene), got {max_seq_len!r}")
        if not (pad_value < 0 and mask_value < 0 and pad_value != mask_value):
            raise ValueError(f"pad_value ({pad_value}) and mask_value ({mask_value}) must be distinct negatives")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self.vocab = vocab
        self.n_bins = int(n_bins)
        self.max_seq_len = int(max_seq_len)
        self.pad_value = float(pad_value)
        self.mask_value = float(mask_value)
        self.include_zero_genes = bool(include_zero_genes)
        self.seed = int(seed)
        self.min_overlap = min_overlap
        self.last_mapping = None

    # --- gene mapping ----------------------------------------------------------------------------
    def column_ids(self, gene_names) -> tuple[np.ndarray, np.ndarray]:
        """Vocabulary mapping of a matrix's columns: (known column indices, their token ids).

        The full :class:`~biogen.sc.vocab.GeneMapping` (counts of known / missing genes) is kept in
        ``self.last_mapping``.
        """
        mapping = self.vocab.map_genes(gene_names, min_overlap=self.min_overlap)
        self.last_mapping = mapping
        cols = np.flatnonzero(mapping.known)
        return cols, mapping.ids[cols]

    # --- a block of cells ---------------------------------------------------------------------------
    def tokenize_block(self, block: sp.csr_matrix, cols: np.ndarray, col_ids: np.ndarray, first_cell: int,
                       epoch: int = 0) -> list[dict]:
        """Tokenise consecutive cells.

        Parameters
        ----------
        block: (n_cells, n_columns) CSR rows of the input (any index order).
        cols: (n_known,) sorted indices of the columns whose genes are in the vocabulary.
        col_ids: (n_known,) token ids of those columns.
        first_cell: global index of the block's first cell (seeds binning ties and subsampling).

        Returns
        -------
        one dict per cell: ``gene_ids`` (n,) int64, ``values`` (n,) float32, ``binned`` (n,) int64,
        n <= max_seq_len.
        """
        sub = block[:, cols] if cols.shape[0] != block.shape[1] else block
        sub = sp.csr_matrix(sub)
        if not sub.has_sorted_indices:
            sub = sub.copy()
            sub.sort_indices()
        _check_values(sub.data)
        bins = _bin_csr_arrays(sub.indptr, sub.data, self.n_bins, self.seed, first_cell)
        keep = self.max_seq_len - 1
        out = []
        for r in range(sub.shape[0]):
            lo, hi = sub.indptr[r], sub.indptr[r + 1]
            idx, data, b = sub.indices[lo:hi], sub.data[lo:hi], bins[lo:hi]
            if self.include_zero_genes:
                pos = np.arange(sub.shape[1])
                vals = np.zeros(sub.shape[1], dtype=np.float32)
                vals[idx] = data
                bb = np.zeros(sub.shape[1], dtype=np.int64)
                bb[idx] = b
            else:
                nz = data != 0
                pos, vals, bb = idx[nz], data[nz].astype(np.float32), b[nz].astype(np.int64)
            if pos.shape[0] > keep:
                rng = np.random.default_rng([self.seed, _SUBSAMPLE_STREAM, int(epoch), int(first_cell + r)])
                pick = np.sort(rng.choice(pos.shape[0], size=keep, replace=False))
                pos, vals, bb = pos[pick], vals[pick], bb[pick]
            n = pos.shape[0] + 1
            gene_ids = np.empty(n, dtype=np.int64)
            gene_ids[0] = self.vocab.cls_id
            gene_ids[1:] = col_ids[pos]
            values = np.zeros(n, dtype=np.float32)
            values[1:] = vals
            binned = np.zeros(n, dtype=np.int64)
            binned[1:] = bb
            out.append({"gene_ids": gene_ids, "values": values, "binned": binned})
        return out

    # --- many cells --------------------------------------------------------------------------------
    def tokenize(self, adata_or_matrix, *, layer: str | None = None, gene_names=None, epoch: int = 0,
                 cell_offset: int = 0, chunk_size: int = 4096) -> TokenizedCells:
        """Tokenise every cell of an AnnData (``X`` or ``layers[layer]``) or of a matrix.

        Parameters
        ----------
        adata_or_matrix: AnnData (in memory or backed), or a (cells, genes) array / sparse matrix.
        layer: AnnData layer holding the values (default ``X``).
        gene_names: column gene names for a matrix input; default ``vocab.genes`` (columns in
            vocabulary order).
        epoch: varies the subsampling of long cells between epochs.
        cell_offset: global index of the first row (binning uniforms / subsampling are per global cell).
        """
        if hasattr(adata_or_matrix, "var_names"):
            if gene_names is not None:
                raise ValueError("gene_names is only for matrix input; an AnnData uses its var_names")
            m = get_matrix(adata_or_matrix, layer)
            names = adata_or_matrix.var_names
        else:
            if layer is not None:
                raise ValueError("layer= needs an AnnData input")
            m = adata_or_matrix if sp.issparse(adata_or_matrix) else np.asarray(adata_or_matrix)
            if m.ndim != 2:
                raise ValueError(f"matrix input must be 2-D (cells, genes), got shape {m.shape}")
            names = self.vocab.genes if gene_names is None else list(gene_names)
            if len(names) != m.shape[1]:
                raise ValueError(f"matrix has {m.shape[1]} columns but {len(names)} gene names"
                                 + (" (vocabulary genes; pass gene_names=)" if gene_names is None else ""))
        cols, col_ids = self.column_ids(names)
        out = TokenizedCells([], [], [])
        n = m.shape[0]
        for start in range(0, n, chunk_size):
            block = _rows_csr(m, start, min(start + chunk_size, n))
            for t in self.tokenize_block(block, cols, col_ids, cell_offset + start, epoch):
                out.gene_ids.append(t["gene_ids"])
                out.values.append(t["values"])
                out.binned.append(t["binned"])
        return out
