"""The AnnData-facing base of the single-cell models (the scvi-tools split).

A model family supplies its network (``module``: tensors in, tensors out) and what differs between
families: tokenisation, objectives, the forward pass of inference. :class:`SingleCellModel` holds
what they share: AnnData validation, label encoding, the vocabulary, prediction written back into
``obs`` / ``obsm`` / ``uns``, save / load. The training loop (validation split, early stopping,
checkpoints, DDP) is :func:`biogen.models.singlecell.training.fit_loop`.
"""

from __future__ import annotations

import copy as _copy
import json
import os
from dataclasses import replace
from typing import Optional, Union

import numpy as np
import pandas as pd
import torch

from ...utils import write_json
from .training import load_weights, save_weights

__all__ = ["SingleCellModel", "check_adata", "obs_column", "categories", "to_py"]


def check_adata(adata, layer: Optional[str], what: str = "adata") -> None:
    from biogen.sc.preprocess import check_counts

    if not hasattr(adata, "obs") or not hasattr(adata, "var_names"):
        raise TypeError(f"{what} must be an AnnData, got {type(adata).__name__}")
    check_counts(adata, layer=layer, what=f"{what}.X" if layer is None else f"{what}.layers[{layer!r}]")


def obs_column(adata, key: str, role: str, what: str = "adata"):
    if key not in adata.obs.columns:
        raise KeyError(f"{role} {key!r} is not a column of {what}.obs; available columns: "
                       f"{list(map(str, adata.obs.columns))}")
    return adata.obs[key]


def categories(series: pd.Series) -> list:
    if isinstance(series.dtype, pd.CategoricalDtype):
        used = set(series.dropna().unique().tolist())
        return [c for c in series.cat.categories if c in used]
    return sorted(series.dropna().unique().tolist())


def to_py(x):
    return x.item() if isinstance(x, np.generic) else x


class SingleCellModel:
    """Shared part of :class:`~biogen.models.scgpt.ScGPT` and :class:`~biogen.models.scbert.ScBERT`.

    Subclasses set ``_FORMAT`` (the ``format`` of ``config.json``, also the ``writer`` of
    ``uns[prefix]``), ``_CONFIG`` (their config dataclass) and implement ``_module_from_meta``,
    ``_restore`` (rebuild from ``config.json``), ``_meta`` and ``_run(adata, batch_size,
    min_gene_overlap, classify)`` (cell embeddings and logits or None, on the CPU in float32);
    ``_HEAD`` names the module's classifier attribute (None without a classifier).
    """

    _FORMAT: str
    _CONFIG: type
    _HEAD: str
    _PREDICT_BATCH: int = 64

    # ------------------------------------------------------------------ construction

    @classmethod
    def _make_config(cls, config, overrides: dict):
        if isinstance(config, str):
            return cls._CONFIG.preset(config, **overrides)
        if isinstance(config, cls._CONFIG):
            return replace(config, **overrides) if overrides else _copy.copy(config)
        raise TypeError(f"config must be a preset name or an {cls._CONFIG.__name__}, got {type(config).__name__}")

    @staticmethod
    def _label_categories(adata, label_key: Optional[str]) -> Optional[list]:
        """The classes of ``obs[label_key]`` (None without a label key); at least two."""
        if label_key is None:
            return None
        cats = categories(obs_column(adata, label_key, "label_key"))
        if len(cats) < 2:
            raise ValueError(f"label_key {label_key!r} has {len(cats)} class(es); a classifier needs at least 2")
        return cats

    @staticmethod
    def _vocab_for(adata, vocab):
        """``vocab`` (default: the genes of ``adata``), checked to cover the genes of ``adata``."""
        from biogen.sc import GeneVocab

        if vocab is None:
            vocab = GeneVocab.from_adata(adata)
        elif not isinstance(vocab, GeneVocab):
            raise TypeError(f"vocab must be a biogen.sc.GeneVocab, got {type(vocab).__name__}")
        vocab.map_genes(adata, min_overlap=0.5)  # raises naming missing genes
        return vocab

    def _setup_base(self, module, vocab, label_key, batch_key, layer, label_categories, device) -> None:
        self.device = torch.device(device) if device is not None else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        self.module = module.to(self.device)
        self.vocab = vocab
        self.label_key, self.batch_key, self.layer = label_key, batch_key, layer
        self.label_categories = None if label_categories is None else [to_py(c) for c in label_categories]
        self.history: list[dict] = []
        self.adata = None

    @property
    def config(self):
        return self.module.config

    # ------------------------------------------------------------------ inference

    def _check_query(self, adata, what="adata"):
        check_adata(adata, self.layer, what)

    def _default_adata(self, adata):
        if adata is None:
            if self.adata is None:
                raise ValueError("pass adata: this model was loaded without one")
            return self.adata
        return adata

    def get_latent_representation(self, adata=None, batch_size: Optional[int] = None, normalize: bool = True,
                                  min_gene_overlap: Union[float, int] = 0.5) -> np.ndarray:
        """Cell embeddings (n_cells, width) float32 (what a cell embedding is: see the subclass).

        ``normalize`` scales each embedding to unit L2 norm (as scGPT's ``embed_data``), which suits
        cosine kNN and UMAP. ``adata`` defaults to the training AnnData; ``min_gene_overlap``: the
        fraction (or count) of the query's genes that must be in the vocabulary. ``batch_size``
        defaults to the model's inference batch size.
        """
        adata = self._default_adata(adata)
        self._check_query(adata)
        emb, _ = self._run(adata, batch_size or self._PREDICT_BATCH, min_gene_overlap, classify=False)
        if normalize:
            emb = torch.nn.functional.normalize(emb, dim=1)
        return emb.numpy().astype(np.float32)

    def _prepare_predict(self, adata, prefix: str, overwrite: bool):
        """The query AnnData, checked, with the keys ``predict`` will write checked to be free."""
        if getattr(self.module, self._HEAD) is None:
            raise ValueError("this model has no classifier (constructed without label_key); use "
                             "get_latent_representation() for embeddings")
        adata = self._default_adata(adata)
        self._check_query(adata)
        keys = [("obs", f"{prefix}_pred"), ("obsm", f"{prefix}_proba"), ("obsm", f"X_{prefix}")]
        ours = isinstance(adata.uns.get(prefix), dict) and adata.uns[prefix].get("writer") == self._FORMAT
        clash = [f"{a}[{k!r}]" for a, k in keys if k in getattr(adata, a).keys()]
        if clash and not (ours or overwrite):
            raise ValueError(f"adata already has {clash}; pass overwrite=True or another prefix")
        return adata

    def _write_predictions(self, adata, prefix: str, copy: bool, emb: torch.Tensor, proba: np.ndarray,
                           codes: np.ndarray, cats: list, **uns_extra):
        target = adata.copy() if copy else adata
        target.obs[f"{prefix}_pred"] = pd.Categorical.from_codes(codes, categories=cats)
        target.obsm[f"{prefix}_proba"] = proba.astype(np.float32)
        target.obsm[f"X_{prefix}"] = torch.nn.functional.normalize(emb, dim=1).numpy().astype(np.float32)
        target.uns[prefix] = {"writer": self._FORMAT, "classes": [str(c) for c in self.label_categories],
                              "label_key": self.label_key or "", **uns_extra,
                              "config": {k: ("" if v is None else v) for k, v in self.config.to_dict().items()}}
        return target

    # ------------------------------------------------------------------ persistence

    def _write_meta(self, folder: str) -> None:
        write_json(os.path.join(folder, "config.json"), self._meta())
        self.vocab.save(os.path.join(folder, "vocab.json"))

    def save(self, path: str, overwrite: bool = False) -> None:
        """Write ``model.safetensors``, ``config.json`` (config, label / batch categories, keys) and
        ``vocab.json`` into folder ``path`` (each file atomically). An existing saved model there is
        replaced only with ``overwrite=True``."""
        if os.path.exists(os.path.join(path, "model.safetensors")) and not overwrite:
            raise FileExistsError(f"{path} already holds a saved model; pass overwrite=True to replace it")
        os.makedirs(path, exist_ok=True)
        save_weights(os.path.join(path, "model.safetensors"), self.module)
        self._write_meta(path)

    @classmethod
    def load(cls, path: str, adata=None, device: Optional[Union[str, torch.device]] = None):
        """Load a model written by :meth:`save` (or a checkpoint folder of :meth:`fit`).

        ``adata`` (optional) becomes the default data of :meth:`predict` and of further training.
        """
        from biogen.sc import GeneVocab

        cfg_path = os.path.join(path, "config.json")
        if not os.path.exists(cfg_path):
            raise FileNotFoundError(f"{path} holds no config.json; is it a folder written by {cls.__name__}.save()?")
        with open(cfg_path, encoding="utf-8") as f:
            meta = json.load(f)
        if meta.get("format") != cls._FORMAT:
            raise ValueError(f"{cfg_path} is not a {cls._FORMAT} config")
        vocab = GeneVocab.load(os.path.join(path, "vocab.json"))
        module = cls._module_from_meta(meta)
        module.load_state_dict(load_weights(os.path.join(path, "model.safetensors")))
        self = cls.__new__(cls)
        self._restore(module, vocab, meta, device)
        self.module.eval()
        if adata is not None:
            self._check_query(adata)
            self.adata = adata
        return self
