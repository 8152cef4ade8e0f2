"""Gene vocabulary: gene symbols <-> token ids.

Special tokens have fixed ids: ``<pad>`` = 0, ``<cls>`` = 1, ``<mask>`` = 2; genes follow from id 3 in
the order they were added. The JSON file is ``{"format": "biogen.GeneVocab", "version": 1,
"special_tokens": [...], "genes": [...]}`` (ids are implied by position).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

__all__ = ["GeneVocab", "GeneMapping", "SPECIAL_TOKENS"]

SPECIAL_TOKENS = ("<pad>", "<cls>", "<mask>")
_FORMAT = "biogen.GeneVocab"


@dataclass(frozen=True)
class GeneMapping:
    """How a query's genes map onto a vocabulary.

    Attributes
    ----------
    ids: (n_query_genes,) int64 token id per query gene, -1 for genes not in the vocabulary
    n_known: number of query genes found in the vocabulary
    n_genes: number of query genes
    missing: the query genes not in the vocabulary, in query order
    """

    ids: np.ndarray
    n_known: int
    n_genes: int
    missing: tuple[str, ...]

    @property
    def known(self) -> np.ndarray:
        """(n_query_genes,) bool: gene is in the vocabulary."""
        return self.ids >= 0

    @property
    def fraction_known(self) -> float:
        return self.n_known / self.n_genes if self.n_genes else 0.0


def _gene_names(adata_or_names) -> list[str]:
    names = getattr(adata_or_names, "var_names", adata_or_names)
    if isinstance(names, str):
        raise TypeError("expected a sequence of gene names or an AnnData, got a single string")
    return [str(g) for g in names]


class GeneVocab:
    """Gene symbols <-> token ids with ``<pad>`` (0), ``<cls>`` (1) and ``<mask>`` (2).

    Parameters
    ----------
    genes: gene symbols, in id order (first gene gets id 3). Must be unique and must not use the
        special token names.
    """

    pad_token, cls_token, mask_token = SPECIAL_TOKENS
    pad_id, cls_id, mask_id = 0, 1, 2

    def __init__(self, genes: Iterable[str]):
        genes = [str(g) for g in genes]
        seen: dict[str, int] = {}
        dup = []
        for g in genes:
            if g in SPECIAL_TOKENS:
                raise ValueError(f"gene name {g!r} collides with a special token {SPECIAL_TOKENS}")
            if g in seen:
                dup.append(g)
            seen[g] = len(seen)
        if dup:
            raise ValueError(f"genes must be unique; duplicated: {sorted(set(dup))[:5]}")
        self._tokens: list[str] = list(SPECIAL_TOKENS) + genes
        self._index: dict[str, int] = {t: i for i, t in enumerate(self._tokens)}

    # --- construction -------------------------------------------------------------------------
    @classmethod
    def from_adata(cls, *adatas, sort: bool = False) -> "GeneVocab":
        """Vocabulary of the union of the genes (``var_names``) of one or more AnnData objects.

        Genes keep first-seen order (or alphabetical with ``sort=True``).
        """
        if not adatas:
            raise ValueError("from_adata needs at least one AnnData")
        genes: dict[str, None] = {}
        for a in adatas:
            for g in _gene_names(a):
                genes.setdefault(g, None)
        names = sorted(genes) if sort else list(genes)
        return cls(names)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "GeneVocab":
        """Read a vocabulary written by :meth:`save`."""
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
        if not isinstance(obj, dict) or obj.get("format") != _FORMAT:
            raise ValueError(f"{path}: not a biogen gene vocabulary (missing format={_FORMAT!r})")
        if tuple(obj.get("special_tokens", ())) != SPECIAL_TOKENS:
            raise ValueError(f"{path}: special tokens {obj.get('special_tokens')} != {list(SPECIAL_TOKENS)}")
        return cls(obj["genes"])

    def save(self, path: str | os.PathLike) -> None:
        """Write JSON atomically (temporary file in the same folder, then ``os.replace``)."""
        path = os.fspath(path)
        folder = os.path.dirname(os.path.abspath(path))
        obj = {"format": _FORMAT, "version": 1, "special_tokens": list(SPECIAL_TOKENS), "genes": self.genes}
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".vocab-", suffix=".json.tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(obj, f)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    # --- lookup ---------------------------------------------------------------------------------
    @property
    def genes(self) -> list[str]:
        """Gene symbols in id order (ids 3, 4, ...)."""
        return self._tokens[len(SPECIAL_TOKENS):]

    def __len__(self) -> int:
        return len(self._tokens)

    def __contains__(self, token) -> bool:
        return token in self._index

    def __getitem__(self, token: str) -> int:
        try:
            return self._index[token]
        except KeyError:
            raise KeyError(f"{token!r} is not in the vocabulary") from None

    def token(self, idx: int) -> str:
        """Token (gene symbol or special token) of an id."""
        return self._tokens[idx]

    def __eq__(self, other) -> bool:
        return isinstance(other, GeneVocab) and self._tokens == other._tokens

    def __repr__(self) -> str:
        return f"GeneVocab({len(self.genes)} genes + {len(SPECIAL_TOKENS)} special tokens)"

    def map_genes(self, genes_or_adata, *, min_overlap: float | int = 0.5, n_missing_shown: int = 10
                  ) -> GeneMapping:
        """Map a query's genes (names or an AnnData's ``var_names``) to ids.

        Parameters
        ----------
        genes_or_adata: sequence of gene names or AnnData.
        min_overlap: float in (0, 1]: minimum fraction of the query's genes that must be known;
            int >= 1: minimum number of known genes. 0 disables the check.

        Raises
        ------
        ValueError: duplicated query gene names, or fewer known genes than ``min_overlap`` (the message
            lists the first ``n_missing_shown`` missing genes).
        """
        names = _gene_names(genes_or_adata)
        if len(set(names)) != len(names):
            seen, dup = set(), []
            for g in names:
                if g in seen:
                    dup.append(g)
                seen.add(g)
            raise ValueError(f"query gene names must be unique (e.g. adata.var_names_make_unique()); "
                             f"duplicated: {sorted(set(dup))[:5]}")
        ids = np.array([self._index.get(g, -1) for g in names], dtype=np.int64)
        ids[(ids >= 0) & (ids < len(SPECIAL_TOKENS))] = -1  # "<pad>" etc. as a gene name is not a gene
        n_known = int((ids >= 0).sum())
        missing = tuple(g for g, i in zip(names, ids) if i < 0)
        need = _min_known(min_overlap, len(names))
        if n_known < need or (len(names) and n_known == 0):
            shown = ", ".join(missing[:n_missing_shown])
            raise ValueError(
                f"only {n_known} of {len(names)} query genes ({n_known / max(len(names), 1):.1%}) are in the "
                f"vocabulary, need at least {need} (min_overlap={min_overlap}); missing genes include: {shown}. "
                "Check gene identifiers (symbols vs Ensembl ids, species, case).")
        return GeneMapping(ids=ids, n_known=n_known, n_genes=len(names), missing=missing)

    def encode(self, genes: Sequence[str]) -> np.ndarray:
        """(n,) int64 ids of known gene names; raises KeyError naming the first unknown."""
        return np.array([self[g] for g in genes], dtype=np.int64)


def _min_known(min_overlap, n_genes: int) -> int:
    if isinstance(min_overlap, bool) or not isinstance(min_overlap, (int, float, np.integer, np.floating)):
        raise TypeError(f"min_overlap must be a fraction in [0, 1] or a gene count, got {min_overlap!r}")
    if isinstance(min_overlap, (int, np.integer)) and min_overlap >= 1:
        return int(min_overlap)
    if not 0 <= float(min_overlap) <= 1:
        raise ValueError(f"min_overlap must be a fraction in [0, 1] or an int count >= 1, got {min_overlap}")
    return int(np.ceil(float(min_overlap) * n_genes))
