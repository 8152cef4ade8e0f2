"""torch Dataset and collate for scGPT-style training and inference.

Batch contract (``collate`` output, B cells, L = longest sequence in the batch):

=================  ===========  ===========================================================================
key                dtype        meaning
=================  ===========  ===========================================================================
gene_ids           long (B, L)  token ids; position 0 is ``<cls>``; ``vocab.pad_id`` where padded
values             float (B,L)  input values (bins as floats, or continuous values); 0 at ``<cls>``;
                                ``pad_value`` where padded; ``mask_value`` where ``mlm_mask``
target_values      float (B,L)  the same values before masking (``pad_value`` where padded)
padding_mask       bool (B, L)  True = padding
mlm_mask           bool (B, L)  True = masked position to predict (never ``<cls>`` or padding)
known              bool (B, L)  generative split: ``<cls>`` and given genes True, genes to generate False;
                                all True when not generative (padding is True: it is excluded by
                                ``padding_mask``)
labels             long (B,)    only with ``label_key``: class index, -100 for labels outside
                                ``label_categories``
batch_ids          long (B,)    only with ``batch_key``: batch index
cell_index         long (B,)    row of the cell in the AnnData (to write predictions back)
=================  ===========  ===========================================================================

Masking: with ``mask_ratio = r`` a cell with ``n`` gene tokens (after subsampling) gets exactly
``floor(r * n + 0.5)`` masked genes chosen uniformly; with ``mask_ratio="generative"`` each cell draws
``r`` from {0.25, 0.5, 0.75} and that many genes become unknown (``known`` False) and masked. All
randomness is per item from ``(seed, epoch, cell index)``; call :meth:`ScGPTDataset.set_epoch` to
draw new masks / subsamples each epoch.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from .tokenize import ScGPTTokenizer, _rows_csr, get_matrix
from .vocab import GeneVocab

__all__ = ["ScGPTDataset", "collate", "GENERATIVE_MASK_RATIOS", "n_masked"]

GENERATIVE_MASK_RATIOS = (0.25, 0.5, 0.75)
_MASK_STREAM = 0x3A5C
IGNORE_LABEL = -100


def n_masked(mask_ratio: float, n_genes: int) -> int:
    """Masked genes in a cell of ``n_genes`` gene tokens: round half up of ``mask_ratio * n_genes``."""
    return int(math.floor(mask_ratio * n_genes + 0.5))


def _categories(series: pd.Series, given, key: str):
    if given is not None:
        cats = list(given)
        if len(set(cats)) != len(cats):
            raise ValueError(f"categories for {key!r} must be unique")
    elif isinstance(series.dtype, pd.CategoricalDtype):
        cats = list(series.cat.categories)
    else:
        cats = sorted(series.dropna().unique().tolist())
    index = {c: i for i, c in enumerate(cats)}
    codes = np.array([index.get(v, IGNORE_LABEL) for v in series.tolist()], dtype=np.int64)
    return cats, codes


class ScGPTDataset(Dataset):
    """One item per cell of an AnnData (in memory or backed ``.h5ad``), tokenised the scGPT way.

    Parameters
    ----------
    adata: AnnData; values from ``adata.X`` or ``adata.layers[layer]`` (e.g. log1p-normalised values
        from :func:`biogen.sc.preprocess.preprocess`; binning only depends on each cell's ranks).
    vocab: GeneVocab; genes of ``adata`` not in it are dropped (error if fewer than ``min_overlap``).
    layer: layer with the values (default ``X``).
    label_key, batch_key: ``adata.obs`` columns turned into ``labels`` / ``batch_ids``.
    label_categories, batch_categories: fixed category order (e.g. the training set's), default: the
        column's categories (categorical) or sorted unique values.
    n_bins, max_seq_len, pad_value, mask_value, include_zero_genes, seed: see ScGPTTokenizer.
    mask_ratio: 0.0 (no masking), a float in (0, 1], or ``"generative"``.
    input_style: ``"binned"`` (values = bins as float, scGPT default) or ``"continuous"`` (the values).
    min_overlap: minimum fraction / count of ``adata``'s genes that must be in ``vocab``.

    Attributes
    ----------
    gene_mapping: GeneMapping of ``adata.var_names`` onto ``vocab`` (``n_known``, ``missing``).
    label_categories, batch_categories: category order behind ``labels`` / ``batch_ids``.
    """

    def __init__(self, adata, vocab: GeneVocab, *, layer: str | None = None, label_key: str | None = None,
                 batch_key: str | None = None, n_bins: int = 51, max_seq_len: int = 1200,
                 mask_ratio: float | str = 0.0, seed: int = 0, input_style: str = "binned",
                 pad_value: float = -2, mask_value: float = -1, include_zero_genes: bool = False,
                 label_categories=None, batch_categories=None, min_overlap: float | int = 0.5):
        if isinstance(mask_ratio, str):
            if mask_ratio != "generative":
                raise ValueError(f"mask_ratio must be a float in [0, 1] or 'generative', got {mask_ratio!r}")
        elif isinstance(mask_ratio, bool) or not isinstance(mask_ratio, (int, float)) or not 0 <= mask_ratio <= 1:
            raise ValueError(f"mask_ratio must be a float in [0, 1] or 'generative', got {mask_ratio!r}")
        if input_style not in ("binned", "continuous"):
            raise ValueError(f"input_style must be 'binned' or 'continuous', got {input_style!r}")
        self.tokenizer = ScGPTTokenizer(vocab, n_bins=n_bins, max_seq_len=max_seq_len, pad_value=pad_value,
                                        mask_value=mask_value, include_zero_genes=include_zero_genes,
                                        seed=seed, min_overlap=min_overlap)
        self.adata = adata
        self.vocab = vocab
        self.layer = layer
        self.matrix = get_matrix(adata, layer)
        self.mask_ratio = mask_ratio
        self.input_style = input_style
        self.seed = int(seed)
        self.epoch = 0
        self.cols, self.col_ids = self.tokenizer.column_ids(adata.var_names)
        #: GeneMapping of adata's genes onto the vocabulary (n_known, missing genes, ...)
        self.gene_mapping = self.tokenizer.last_mapping
        self.label_key, self.batch_key = label_key, batch_key
        self.label_categories = self.labels = None
        self.batch_categories = self.batch_ids = None
        for key in (label_key, batch_key):
            if key is not None and key not in adata.obs:
                raise KeyError(f"{key!r} is not a column of adata.obs (columns: {list(adata.obs.columns)})")
        if label_key is not None:
            self.label_categories, self.labels = _categories(adata.obs[label_key], label_categories, label_key)
        if batch_key is not None:
            self.batch_categories, self.batch_ids = _categories(adata.obs[batch_key], batch_categories, batch_key)
            if (self.batch_ids < 0).any():
                bad = adata.obs[batch_key][self.batch_ids < 0].unique()[:5].tolist()
                raise ValueError(f"batch values not in batch_categories: {bad}")

    def set_epoch(self, epoch: int) -> None:
        """New masks and subsamples: items depend on (seed, epoch, cell index)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.adata.n_obs

    def __getitem__(self, i: int) -> dict:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"cell index {i} out of range for {n} cells")
        i = int(i) % n
        row = _rows_csr(self.matrix, i, i + 1)
        tok = self.tokenizer.tokenize_block(row, self.cols, self.col_ids, i, self.epoch)[0]
        return self._mask(tok, i)

    def _mask(self, tok: dict, i: int) -> dict:
        t = self.tokenizer
        target = (tok["binned"].astype(np.float32) if self.input_style == "binned" else tok["values"])
        L = target.shape[0]
        n_genes = L - 1
        mlm = np.zeros(L, dtype=bool)
        known = np.ones(L, dtype=bool)
        rng = np.random.default_rng([self.seed, _MASK_STREAM, self.epoch, i])
        if self.mask_ratio == "generative":
            ratio = GENERATIVE_MASK_RATIOS[int(rng.integers(len(GENERATIVE_MASK_RATIOS)))]
        else:
            ratio = float(self.mask_ratio)
        k = n_masked(ratio, n_genes)
        if k:
            pick = 1 + rng.choice(n_genes, size=k, replace=False)
            mlm[pick] = True
            if self.mask_ratio == "generative":
                known[pick] = False
        values = target.copy()
        values[mlm] = t.mask_value
        item = {"gene_ids": tok["gene_ids"], "values": values, "target_values": target.copy(), "mlm_mask": mlm,
                "known": known, "cell_index": i, "pad_id": self.vocab.pad_id, "pad_value": t.pad_value}
        if self.labels is not None:
            item["label"] = int(self.labels[i])
        if self.batch_ids is not None:
            item["batch_id"] = int(self.batch_ids[i])
        return item


def collate(items: list[dict]) -> dict[str, torch.Tensor]:
    """Pad a list of :class:`ScGPTDataset` items to the longest; see the module docstring for keys."""
    if not items:
        raise ValueError("collate needs at least one item")
    B = len(items)
    L = max(len(it["gene_ids"]) for it in items)
    pad_id, pad_value = items[0]["pad_id"], items[0]["pad_value"]
    gene_ids = np.full((B, L), pad_id, dtype=np.int64)
    values = np.full((B, L), pad_value, dtype=np.float32)
    target = np.full((B, L), pad_value, dtype=np.float32)
    padding = np.ones((B, L), dtype=bool)
    mlm = np.zeros((B, L), dtype=bool)
    known = np.ones((B, L), dtype=bool)
    for b, it in enumerate(items):
        n = len(it["gene_ids"])
        gene_ids[b, :n] = it["gene_ids"]
        values[b, :n] = it["values"]
        target[b, :n] = it["target_values"]
        padding[b, :n] = False
        mlm[b, :n] = it["mlm_mask"]
        known[b, :n] = it["known"]
    out = {"gene_ids": torch.from_numpy(gene_ids), "values": torch.from_numpy(values),
           "target_values": torch.from_numpy(target), "padding_mask": torch.from_numpy(padding),
           "mlm_mask": torch.from_numpy(mlm), "known": torch.from_numpy(known),
           "cell_index": torch.tensor([it["cell_index"] for it in items], dtype=torch.long)}
    if "label" in items[0]:
        out["labels"] = torch.tensor([it["label"] for it in items], dtype=torch.long)
    if "batch_id" in items[0]:
        out["batch_ids"] = torch.tensor([it["batch_id"] for it in items], dtype=torch.long)
    return out
