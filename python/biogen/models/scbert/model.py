"""scBERT-style model for single-cell RNA-seq (SPEC 2.3): the user-facing class that owns AnnData.

The network is :class:`~biogen.models.scbert.network.ScBERTModel`; this module adds the
tokeniser (SPEC 2.1 scBERT tokens on a fixed gene panel), gene-vector files (gene2vec), and the
scvi-tools-style wrapper :class:`ScBERT` with the same API as :class:`biogen.models.scgpt.ScGPT`
(pretraining, fine-tuning with validation / early stopping / resumable checkpoints, prediction
written back into AnnData, save / load).

Tokens: per cell, the counts of the panel genes (query genes mapped by name, missing panel genes
zero) are normalised to 1e4 (over the panel genes, as the original's preprocess.py, which builds
the panel matrix first), log2(1 + x), clipped at 5 and floored: tokens 0..5; one extra token 0 is
appended (sequence length n_genes + 1).

Example
-------
>>> from biogen.models.scbert import ScBERT
>>> model = ScBERT(adata, label_key="cell_type", layer="counts", config="small")
>>> model.fit(epochs=10)
>>> model.predict(query)        # query.obs["scbert_pred"], .obsm["scbert_proba"], .obsm["X_scbert"]
>>> model.save("my_model"); model = ScBERT.load("my_model")
"""

from __future__ import annotations

import os
from typing import Optional, Union

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from ..singlecell.base import SingleCellModel, check_adata, obs_column, to_py
from ..singlecell.training import check_train_args, fit_loop
from .checkpoint import load_scbert_checkpoint, map_scbert_keys
from .network import MASK_TOKEN, N_BINS, ScBERTConfig, ScBERTModel, ScBERTOutput

__all__ = [
    "MASK_TOKEN", "N_BINS", "ScBERT", "ScBERTConfig", "ScBERTModel", "ScBERTOutput", "ScBERTTokens",
    "load_gene_vectors", "load_scbert_checkpoint", "map_scbert_keys", "scbert_tokens",
]

UNASSIGNED = "Unassigned"


# ---------------------------------------------------------------------------- tokenisation


class ScBERTTokens:
    """Tokens of a set of cells on a gene panel (SPEC 2.1), computed block by block from the counts.

    In memory, all cells are tokenised once and kept sparse (int8 CSR, most genes are token 0). For a
    backed AnnData nothing is kept: :meth:`dense` reads and tokenises the requested rows from the file
    each time, so memory does not grow with the number of cells.

    Attributes
    ----------
    tokens : (n_cells, n_genes) CSR int8 with values 1..5 (zeros not stored), or None when backed.
    mapping : :class:`biogen.sc.vocab.GeneMapping` of the query's genes onto the vocabulary.
    """

    def __init__(self, matrix, mapping, n_panel: int, n_vocab: int, *, backed: bool, target_sum: float = 1e4,
                 chunk_size: int = 4096) -> None:
        self.mapping = mapping
        self._matrix, self._n_panel, self._target_sum = matrix, n_panel, target_sum
        self._cols = np.flatnonzero(mapping.known)
        self._pos = mapping.ids[self._cols] - (n_vocab - n_panel)  # panel position of each kept query column
        self._n = matrix.shape[0]
        self.tokens = None
        if not backed:
            n = self._n
            self.tokens = sp.vstack([self._block(s, min(s + chunk_size, n)) for s in range(0, n, chunk_size)],
                                    format="csr").astype(np.int8)
            self._matrix = None

    def __len__(self) -> int:
        return self._n

    def _tokenize(self, b: sp.csr_matrix) -> sp.csr_matrix:
        b = b[:, self._cols].tocsr()
        b.sort_indices()
        data = b.data.astype(np.float64)
        tot = np.add.reduceat(data, b.indptr[:-1]) if data.size else np.zeros(b.shape[0])
        tot[np.diff(b.indptr) == 0] = 0.0
        row_tot = np.repeat(tot, np.diff(b.indptr))
        with np.errstate(divide="ignore", invalid="ignore"):
            x = np.where(row_tot > 0, data * self._target_sum / row_tot, 0.0)
        tok = np.floor(np.minimum(np.log2(1.0 + x), N_BINS - 1)).astype(np.int8)
        out = sp.csr_matrix((tok, self._pos[b.indices], b.indptr), shape=(b.shape[0], self._n_panel))
        out.eliminate_zeros()
        out.sort_indices()
        return out

    def _block(self, start: int, stop: int) -> sp.csr_matrix:
        from biogen.sc.tokenize import _rows_csr

        return self._tokenize(_rows_csr(self._matrix, start, stop))

    def dense(self, rows) -> torch.Tensor:
        """(len(rows), n_genes + 1) int64 tokens, last column the extra token 0."""
        rows = np.asarray(rows)
        if self.tokens is not None:
            block = self.tokens[rows]
        else:
            block = sp.vstack([self._block(int(r), int(r) + 1) for r in rows], format="csr")
        block = block.toarray().astype(np.int64)
        return torch.from_numpy(np.concatenate([block, np.zeros((block.shape[0], 1), np.int64)], axis=1))


def scbert_tokens(adata, vocab, *, layer: Optional[str] = None, min_overlap: Union[float, int] = 0.5,
                  target_sum: float = 1e4, chunk_size: int = 4096) -> ScBERTTokens:
    """scBERT tokens of ``adata``'s cells on the panel ``vocab.genes`` (SPEC 2.1).

    Parameters
    ----------
    adata : AnnData (in memory or backed) with counts in ``X`` or ``layers[layer]``; genes in any
        order, any subset.
    vocab : :class:`biogen.sc.GeneVocab`; panel position i is gene ``vocab.genes[i]``.
    min_overlap : passed to :meth:`GeneVocab.map_genes` (fraction or count of the query's genes that
        must be in the panel; raises naming missing genes otherwise).

    Returns
    -------
    :class:`ScBERTTokens` with (n_cells, n_genes) tokens floor(min(log2(1 + x), 5)), x the panel
    counts scaled to ``target_sum`` per cell (cells without panel counts: all 0).
    """
    from biogen.sc.tokenize import get_matrix

    mapping = vocab.map_genes(adata, min_overlap=min_overlap)
    return ScBERTTokens(get_matrix(adata, layer), mapping, len(vocab.genes), len(vocab),
                        backed=bool(getattr(adata, "isbacked", False)), target_sum=target_sum, chunk_size=chunk_size)


def load_gene_vectors(path: str) -> tuple[list[str], np.ndarray]:
    """Read gene vectors (e.g. gene2vec) from a text file or ``.npz``.

    Text: one gene per line, ``GENE v1 v2 ... vd`` separated by whitespace (word2vec text format;
    a first line ``n d`` is skipped). ``.npz``: arrays ``genes`` (n,) and ``vectors`` (n, d).
    Returns (genes, (n, d) float32 vectors).
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"gene vector file {path} does not exist")
    if str(path).endswith(".npz"):
        with np.load(path, allow_pickle=False) as z:
            if "genes" not in z or "vectors" not in z:
                raise ValueError(f"{path}: a .npz of gene vectors needs arrays 'genes' and 'vectors', has {list(z)}")
            genes, vec = [str(g) for g in z["genes"]], np.asarray(z["vectors"], dtype=np.float32)
    else:
        genes, rows = [], []
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f):
                parts = line.split()
                if not parts:
                    continue
                if i == 0 and len(parts) == 2 and all(p.isdigit() for p in parts):
                    continue
                genes.append(parts[0])
                try:
                    rows.append([float(v) for v in parts[1:]])
                except ValueError:
                    raise ValueError(f"{path}, line {i + 1}: expected 'GENE v1 ... vd' with numbers") from None
        if not rows or len({len(r) for r in rows}) != 1:
            raise ValueError(f"{path}: lines must all hold a gene name and the same number of values")
        vec = np.asarray(rows, dtype=np.float32)
    if vec.ndim != 2 or vec.shape[0] != len(genes):
        raise ValueError(f"{path}: vectors of shape {vec.shape} do not match {len(genes)} genes")
    return genes, vec


# ---------------------------------------------------------------------------- user class


class ScBERT(SingleCellModel):
    """scBERT-style model on an AnnData: MLM pretraining, cell-type fine-tuning, prediction, embeddings.

    Same API as :class:`biogen.models.scgpt.ScGPT`, so the two are interchangeable.

    Parameters
    ----------
    adata : AnnData with raw counts in ``X`` (or ``layers[layer]``): finite, non-negative integers.
    label_key : ``obs`` column with cell types; builds the classification head.
    batch_key : not supported (scBERT has no batch embedding): must be None.
    layer : layer with the counts (default ``X``).
    config : preset name (``"tiny"``, ``"small"``, ``"paper"``) or an :class:`ScBERTConfig`.
    vocab : :class:`biogen.sc.GeneVocab` whose genes are the panel; default: the genes of ``adata``.
    gene_vectors : path of a gene-vector file (see :func:`load_gene_vectors`) initialising the gene
        embedding (dimension must equal ``config.dim``; panel genes absent from the file keep a
        random initialisation). Freeze it with ``freeze_gene_emb=True``.
    device : torch device; default CUDA when available, else CPU.
    **config_overrides : fields of :class:`ScBERTConfig` replacing the preset's.
    """

    _FORMAT = "biogen.ScBERT"
    _CONFIG = ScBERTConfig
    _HEAD = "cls_head"
    _PREDICT_BATCH = 16

    def __init__(self, adata, label_key: Optional[str] = None, batch_key: Optional[str] = None,
                 layer: Optional[str] = None, config: Union[str, ScBERTConfig] = "small", vocab=None,
                 device: Optional[Union[str, torch.device]] = None, gene_vectors: Optional[str] = None,
                 **config_overrides):
        if batch_key is not None:
            raise ValueError("ScBERT has no batch embedding; batch_key must be None (scBERT ignores batches)")
        check_adata(adata, layer)
        cfg = self._make_config(config, config_overrides)
        label_categories = self._label_categories(adata, label_key)
        vocab = self._vocab_for(adata, vocab)
        module = ScBERTModel(cfg, len(vocab.genes), n_classes=len(label_categories or ()))
        if gene_vectors is not None:
            _init_gene_vectors(module, vocab, gene_vectors)
        self._setup(module, vocab, label_key, layer, label_categories, device)
        self.adata = adata

    def _setup(self, module, vocab, label_key, layer, label_categories, device):
        self._setup_base(module, vocab, label_key, None, layer, label_categories, device)

    def __repr__(self) -> str:
        c = self.config
        return (f"ScBERT(dim={c.dim}, depth={c.depth}, genes={len(self.vocab.genes)}, "
                f"classes={self.label_categories}, device={self.device})")

    # ------------------------------------------------------------------ data

    def _tokens(self, adata, min_overlap=0.5) -> ScBERTTokens:
        return scbert_tokens(adata, self.vocab, layer=self.layer, min_overlap=min_overlap)

    def _labels(self, adata) -> np.ndarray:
        col = obs_column(adata, self.label_key, "label_key")
        index = {c: i for i, c in enumerate(self.label_categories)}
        return np.array([index.get(to_py(v), -1) if not pd.isna(v) else -1 for v in col], dtype=np.int64)

    # ------------------------------------------------------------------ training

    def pretrain(self, epochs: int = 1, mode: str = "mlm", batch_size: int = 8, lr: float = 1e-4,
                 validation_fraction: float = 0.1, early_stopping_patience: Optional[int] = None,
                 checkpoint_dir: Optional[str] = None, resume: bool = False, progress: bool = True,
                 mixed_precision: bool = False, seed: int = 0) -> list[dict]:
        """Masked-token pretraining on ``self.adata`` (labels unused): ``config.mask_prob`` of each
        cell's non-zero genes are chosen, ``config.replace_prob`` of those replaced by the mask
        token, and the cross-entropy of their true tokens is minimised. ``mode`` must be ``"mlm"``
        (kept for API parity with ScGPT). Other arguments as in :meth:`fit`.
        """
        if mode != "mlm":
            raise ValueError(f"ScBERT pretrains with mode='mlm' only, got {mode!r}")
        return self._train("mlm", epochs=epochs, batch_size=batch_size, lr=lr,
                           validation_fraction=validation_fraction, early_stopping_patience=early_stopping_patience,
                           class_weights=False, checkpoint_dir=checkpoint_dir, resume=resume, progress=progress,
                           mixed_precision=mixed_precision, seed=seed)

    def fit(self, epochs: int = 10, batch_size: int = 8, lr: float = 1e-4, validation_fraction: float = 0.1,
            early_stopping_patience: Optional[int] = None, class_weights: bool = False,
            checkpoint_dir: Optional[str] = None, resume: bool = False, progress: bool = True,
            mixed_precision: bool = False, seed: int = 0) -> list[dict]:
        """Fine-tune for cell-type classification (cross-entropy, Adam); thesis: 10 epochs, batch 8,
        lr 1e-4. Layers are frozen per ``config.trainable_layers``.

        Parameters
        ----------
        epochs : total epochs (with ``resume``, training continues up to this count).
        validation_fraction : cells held out (stratified) for validation loss / accuracy; 0 disables.
        early_stopping_patience : stop after this many epochs without a lower validation loss and
            restore the best weights; None trains all epochs.
        class_weights : weight the loss by inverse class frequency (the original computed such
            weights and never used them).
        checkpoint_dir, resume : write weights, optimizer and trainer state after every epoch
            (atomically); continue from them. Shuffling, masks, dropout and projection redraws of an
            epoch depend only on (seed, epoch), so a resumed run repeats the uninterrupted one.
        mixed_precision : autocast to bfloat16 (CPU) / float16 (CUDA).
        seed : seeds the split, shuffling, masks and dropout (torch's global RNG is restored after).

        Returns the per-epoch history (epoch, step, train_loss, val_loss, val_accuracy).
        """
        if self.module.cls_head is None:
            raise ValueError("fit() trains the classifier: construct ScBERT with label_key=... "
                             "(use pretrain() for self-supervised training)")
        return self._train("classify", epochs=epochs, batch_size=batch_size, lr=lr,
                           validation_fraction=validation_fraction, early_stopping_patience=early_stopping_patience,
                           class_weights=class_weights, checkpoint_dir=checkpoint_dir, resume=resume,
                           progress=progress, mixed_precision=mixed_precision, seed=seed)

    @staticmethod
    def _loss(module, objective, tokens, labels, weights, gen):
        if objective == "mlm":
            return module.mlm_loss(tokens, generator=gen)
        logits = module(tokens).logits
        ok = labels >= 0
        if not bool(ok.any()):
            return logits.sum() * 0.0
        return torch.nn.functional.cross_entropy(logits[ok].float(), labels[ok], weight=weights)

    def _train(self, objective, *, epochs, batch_size, lr, validation_fraction, early_stopping_patience,
               class_weights, checkpoint_dir, resume, progress, mixed_precision, seed):
        check_train_args(epochs, batch_size, lr, validation_fraction, early_stopping_patience, checkpoint_dir, resume)
        if self.adata is None:
            raise ValueError("this model was loaded without an AnnData; pass adata= to ScBERT.load to train it")
        toks = self._tokens(self.adata)
        labels = self._labels(self.adata) if objective == "classify" else None
        # frozen before DDP wraps the module: DDP synchronises the parameters that train
        self.module.freeze_for_finetuning(self.config.trainable_layers if objective == "classify" else None)
        lab_t = None if labels is None else torch.from_numpy(labels)

        def get_batch(rows, gen):
            batch = {"tokens": toks.dense(rows).to(self.device)}
            if lab_t is not None:
                batch["labels"] = lab_t[rows].to(self.device)
            return batch

        def loss_fn(module, batch, weights, gen):
            return self._loss(module, objective, batch["tokens"], batch.get("labels"), weights, gen)

        def n_correct(module, batch):
            ok = batch["labels"] >= 0
            return int((module(batch["tokens"]).logits.argmax(1) == batch["labels"])[ok].sum()), int(ok.sum())

        return fit_loop(self, objective, n_cells=len(toks), labels=labels,
                        params=[p for p in self.module.parameters() if p.requires_grad], get_batch=get_batch,
                        loss_fn=loss_fn, n_correct=n_correct, epochs=epochs, batch_size=batch_size, lr=lr,
                        validation_fraction=validation_fraction, early_stopping_patience=early_stopping_patience,
                        class_weights=class_weights, checkpoint_dir=checkpoint_dir, resume=resume,
                        progress=progress, mixed_precision=mixed_precision, seed=seed, desc=f"scBERT {objective}")

    # ------------------------------------------------------------------ inference

    @torch.no_grad()
    def _run(self, adata, batch_size: int, min_gene_overlap, classify: bool):
        toks = self._tokens(adata, min_gene_overlap)
        self.module.eval()
        embs, logits = [], []
        for s in range(0, len(toks), batch_size):
            out = self.module(toks.dense(np.arange(s, min(s + batch_size, len(toks)))).to(self.device),
                              classify=classify)
            embs.append(out.cell_emb.float().cpu())
            if out.logits is not None:
                logits.append(out.logits.float().cpu())
        return torch.cat(embs), (torch.cat(logits) if logits else None)

    def predict(self, adata=None, prefix: str = "scbert", batch_size: int = 16, copy: bool = False,
                overwrite: bool = False, min_gene_overlap: Union[float, int] = 0.5,
                unassigned_threshold: Optional[float] = 0.5):
        """Predict cell types and write them, with probabilities and embeddings, into AnnData.

        Writes ``obs[f"{prefix}_pred"]`` (categorical: the training classes, plus ``"Unassigned"``
        for cells whose maximum probability is below ``unassigned_threshold`` — 0.5 as the
        original; None never assigns it), ``obsm[f"{prefix}_proba"]`` (n_cells, n_classes) softmax
        probabilities (columns as ``self.label_categories``, also in ``uns[prefix]["classes"]``),
        ``obsm[f"X_{prefix}"]`` (n_cells, dim) L2-normalised cell embeddings, metadata in
        ``uns[prefix]``. Copy / overwrite policy as :meth:`ScGPT.predict`.
        """
        if unassigned_threshold is not None and not 0 <= unassigned_threshold <= 1:
            raise ValueError(f"unassigned_threshold must be in [0, 1] or None, got {unassigned_threshold!r}")
        adata = self._prepare_predict(adata, prefix, overwrite)
        emb, logits = self._run(adata, batch_size, min_gene_overlap, classify=True)
        proba = torch.softmax(logits, dim=1).numpy()
        cats = list(self.label_categories)
        codes = proba.argmax(1)
        if unassigned_threshold is not None:
            if UNASSIGNED not in cats:
                cats = cats + [UNASSIGNED]
            codes = np.where(proba.max(1) < unassigned_threshold, cats.index(UNASSIGNED), codes)
        return self._write_predictions(
            adata, prefix, copy, emb, proba, codes, cats,
            unassigned_threshold=-1.0 if unassigned_threshold is None else float(unassigned_threshold))

    # ------------------------------------------------------------------ persistence

    def _meta(self) -> dict:
        return {"format": self._FORMAT, "version": 1, "config": self.config.to_dict(), "n_genes": self.module.n_genes,
                "n_classes": self.module.n_classes, "label_key": self.label_key, "layer": self.layer,
                "label_categories": self.label_categories}

    @staticmethod
    def _module_from_meta(meta: dict) -> ScBERTModel:
        return ScBERTModel(ScBERTConfig.from_dict(meta["config"]), meta["n_genes"], n_classes=meta["n_classes"])

    def _restore(self, module, vocab, meta: dict, device) -> None:
        self._setup(module, vocab, meta["label_key"], meta["layer"], meta["label_categories"], device)

    @classmethod
    def from_scbert_checkpoint(cls, path: str, adata, genes, label_key: Optional[str] = None,
                               layer: Optional[str] = None, heads: int = 10,
                               device: Optional[Union[str, torch.device]] = None, **config_overrides) -> "ScBERT":
        """Start from an original scBERT checkpoint (``panglao_pretrain.pth`` or a fine-tuned one;
        see :func:`load_scbert_checkpoint`). ``genes``: the checkpoint's panel in order (the
        original's 16,906 gene2vec genes, e.g. the first column of ``gene2vec_16906.txt``), or a
        path to a text file with one gene per line (further columns ignored). With ``label_key`` a
        fresh classification head for its categories replaces any stored head."""
        from biogen.sc import GeneVocab

        if isinstance(genes, (str, os.PathLike)):
            with open(genes, encoding="utf-8") as f:
                genes = [ln.split()[0] for ln in f if ln.strip()]
        module = load_scbert_checkpoint(path, heads=heads, **config_overrides)
        if len(genes) != module.n_genes:
            raise ValueError(f"the checkpoint has a panel of {module.n_genes} genes, but {len(genes)} gene names "
                             "were given")
        vocab = GeneVocab(genes)
        check_adata(adata, layer)
        vocab.map_genes(adata, min_overlap=0.5)
        label_categories = cls._label_categories(adata, label_key)
        if label_categories is not None:
            module.replace_classifier(len(label_categories))
        elif module.cls_head is not None:
            label_categories = [f"class_{i}" for i in range(module.n_classes)]
        self = cls.__new__(cls)
        self._setup(module, vocab, label_key, layer, label_categories, device)
        self.adata = adata
        return self


def _init_gene_vectors(module: ScBERTModel, vocab, path: str) -> None:
    genes, vec = load_gene_vectors(path)
    dim = module.config.dim
    if vec.shape[1] != dim:
        raise ValueError(f"gene vectors in {path} have dimension {vec.shape[1]}, but the model's dim is {dim}; "
                         "use a config with dim equal to the vector size")
    row = {g: i for i, g in enumerate(genes)}
    panel = vocab.genes
    known = np.array([g in row for g in panel])
    if not known.any():
        raise ValueError(f"none of the {len(panel)} panel genes (e.g. {panel[:3]}) is in {path} "
                         f"(e.g. {genes[:3]}); check gene identifiers")
    full = np.zeros((len(panel), dim), np.float32)
    idx = np.flatnonzero(known)
    full[idx] = vec[[row[panel[i]] for i in idx]]
    module.set_gene_vectors(torch.from_numpy(full), torch.from_numpy(known))

