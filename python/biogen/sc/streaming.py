"""Out-of-core scGPT data: stream cells from a backed ``.h5ad`` (or a folder of shards) without loading X.

:class:`StreamingScGPTDataset` is a torch ``IterableDataset`` yielding the same items as
:class:`biogen.sc.data.ScGPTDataset` (same tokeniser, same masking, same ``collate``), read in chunks:

1. the cells are cut into chunks of ``chunk_size`` consecutive rows (a chunk never spans two shards);
2. every epoch, the chunk order is shuffled with a seed drawn from ``(seed, epoch)``, identically on
   every rank; rank ``r`` of ``W`` takes chunks ``r, r + W, ...`` of that order and DataLoader worker
   ``w`` of ``K`` takes every ``K``-th of those, so each cell is read exactly once per epoch across all
   ranks and workers;
3. each worker reads its chunks as CSR row ranges straight from HDF5 (``indptr`` slice, then the
   matching ``indices`` / ``data`` slices), tokenises a chunk at a time, fills a buffer of about
   ``buffer_size`` cells, shuffles the buffer and yields it.

Memory is bounded by the buffer (at most ``buffer_size + chunk_size - 1`` tokenised cells) and one
chunk of raw CSR rows, whatever the number of cells; nothing of size n_cells is kept except the chunk
list (3 integers per chunk). Items depend only on ``(seed, epoch, global cell index)``: a cell streams
to the same tokens and masks as ``ScGPTDataset(adata)[i]`` would give (for shards: the concatenation
of the shards in file-name order).

With DDP, ranks must run the same number of steps: pass ``even=True`` to trim every rank to the
smallest rank's cell count for that epoch (at most ``chunk_size`` cells per rank dropped, different
cells each epoch), and use the same batch size on every rank.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp
from torch.utils.data import IterableDataset, get_worker_info

from .data import IGNORE_LABEL, ScGPTDataset
from .preprocess import check_counts as _check_counts
from .vocab import GeneVocab

__all__ = ["StreamingScGPTDataset", "h5ad_shards"]

_CHUNK_STREAM = 0xC4C
_BUFFER_STREAM = 0xB0F


def h5ad_shards(source) -> list[Path]:
    """The ``.h5ad`` files of a source: one file, a folder (its ``*.h5ad``, sorted by name) or a list."""
    if isinstance(source, (str, os.PathLike)):
        p = Path(source)
        if p.is_dir():
            files = sorted(q for q in p.iterdir() if q.suffix == ".h5ad" and q.is_file())
            if not files:
                raise FileNotFoundError(f"folder {p} holds no .h5ad files")
            return files
        if not p.is_file():
            raise FileNotFoundError(f"{p} is neither an .h5ad file nor a folder of them")
        return [p]
    files = [Path(q) for q in source]
    if not files:
        raise ValueError("source is an empty list of .h5ad files")
    for q in files:
        if not q.is_file():
            raise FileNotFoundError(f"{q} does not exist")
    return files


@dataclass
class _Shard:
    path: Path
    key: str  # HDF5 path of the matrix: "X" or "layers/<name>"
    n_obs: int
    n_vars: int
    offset: int  # global index of the shard's first cell
    cols: np.ndarray  # matrix columns in the vocabulary, and their token ids
    col_ids: np.ndarray
    code_maps: dict  # obs key -> (local category code -> global code)


def _str_attr(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _open_matrix(f, path: Path, layer: Optional[str]):
    key = "X" if layer is None else f"layers/{layer}"
    if key not in f:
        where = "X" if layer is None else f"layers[{layer!r}]"
        avail = list(f["layers"].keys()) if "layers" in f else []
        raise KeyError(f"{path}: no {where} in the file" + (f" (layers: {avail})" if layer else ""))
    g = f[key]
    enc = _str_attr(g.attrs.get("encoding-type", "array"))
    if enc != "csr_matrix":
        what = {"csc_matrix": "sparse CSC", "array": "a dense array"}.get(enc, enc)
        raise ValueError(f"{path}: {key} is stored as {what}; streaming reads row ranges and needs sparse "
                         f"CSR. Convert once: adata.{'X' if layer is None else f'layers[{layer!r}]'} = "
                         "scipy.sparse.csr_matrix(...), then write_h5ad")
    shape = tuple(int(v) for v in g.attrs["shape"])
    return key, shape


def _read_categorical(f, path: Path, key: str):
    if "obs" not in f or key not in f["obs"]:
        cols = list(f["obs"].keys()) if "obs" in f else []
        raise KeyError(f"{path}: {key!r} is not a column of obs (columns: {[c for c in cols if c != '_index']})")
    g = f["obs"][key]
    if _str_attr(g.attrs.get("encoding-type", "")) != "categorical":
        raise ValueError(f"{path}: obs[{key!r}] is not categorical; streaming reads category codes per chunk. "
                         f"Store it as a category (adata.obs[{key!r}] = adata.obs[{key!r}].astype('category'))")
    from anndata.io import read_elem

    return [str(c) for c in read_elem(g["categories"])]


class StreamingScGPTDataset(IterableDataset):
    """scGPT items streamed from backed ``.h5ad`` file(s), chunk by chunk; see the module docstring.

    Parameters
    ----------
    source: an ``.h5ad`` path, a folder of ``.h5ad`` shards, or a list of paths. The matrix
        (``X`` or ``layers[layer]``) must be sparse CSR; label / batch columns must be categorical.
    vocab: GeneVocab (shards may order their genes differently; each is mapped on its own).
    chunk_size: consecutive cells read (and tokenised) at a time.
    buffer_size: cells shuffled together before being yielded (memory bound, see above).
    shuffle: shuffle chunk order and cells within the buffer (False: file order, for prediction).
    seed: seeds chunk order, buffer shuffles, binning ties, subsampling and masks.
    rank, world_size: this process's share; default from :mod:`biogen.distributed` (torchrun env).
    even: trim every rank to the same number of cells per epoch (needed for DDP training).
    check_counts: check each chunk holds raw counts as it is read (NaN, negative or non-integer
        values raise, naming the file and rows); False for values that are not counts.
    layer, label_key, batch_key, label_categories, batch_categories, n_bins, max_seq_len, mask_ratio,
    input_style, pad_value, mask_value, include_zero_genes, min_overlap: as :class:`ScGPTDataset`.
    Default categories: the union of the shards' categories, in order of appearance.

    Attributes
    ----------
    n_cells: cells over all shards. ``n_chunks``: chunks per epoch. ``peak_buffered``: most cells held
    in the buffer by the last iteration run in this process (``num_workers=0``).
    """

    def __init__(self, source, vocab: GeneVocab, *, layer: Optional[str] = None, label_key: Optional[str] = None,
                 batch_key: Optional[str] = None, chunk_size: int = 1024, buffer_size: int = 16384,
                 shuffle: bool = True, seed: int = 0, rank: Optional[int] = None, world_size: Optional[int] = None,
                 even: bool = False, n_bins: int = 51, max_seq_len: int = 1200, mask_ratio: float | str = 0.0,
                 input_style: str = "binned", pad_value: float = -2, mask_value: float = -1,
                 include_zero_genes: bool = False, label_categories: Optional[Sequence] = None,
                 batch_categories: Optional[Sequence] = None, min_overlap: float | int = 0.5,
                 check_counts: bool = True):
        import anndata as ad
        import h5py

        for name, v in (("chunk_size", chunk_size), ("buffer_size", buffer_size)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        self.paths = h5ad_shards(source)
        self.layer, self.label_key, self.batch_key = layer, label_key, batch_key
        self.chunk_size, self.buffer_size = int(chunk_size), int(buffer_size)
        self.shuffle, self.even, self.check_counts = bool(shuffle), bool(even), bool(check_counts)
        self._rank, self._world = rank, world_size
        self.epoch = 0
        self.peak_buffered = 0
        obs_keys = [k for k in (label_key, batch_key) if k is not None]
        given = {label_key: label_categories, batch_key: batch_categories}
        cats: dict[str, list] = {k: (list(given[k]) if given[k] is not None else []) for k in obs_keys}
        infos = []
        for path in self.paths:
            with h5py.File(path, "r") as f:
                key, shape = _open_matrix(f, path, layer)
                from anndata.io import read_elem

                var_names = read_elem(f["var"]).index.astype(str)
                local = {k: _read_categorical(f, path, k) for k in obs_keys}
            if len(var_names) != shape[1]:
                raise ValueError(f"{path}: {key} has {shape[1]} columns but var has {len(var_names)} genes")
            for k in obs_keys:
                if given[k] is None:
                    cats[k] += [c for c in local[k] if c not in set(cats[k])]
            infos.append((path, key, shape, var_names, local))
        # The in-memory ScGPTDataset validates every tokenisation / masking argument with its own
        # messages, and its tokenizer and _mask produce the items (one implementation for both).
        first_vars = infos[0][3]
        header = ad.AnnData(X=sp.csr_matrix((1, len(first_vars)), dtype=np.float32),
                            var=pd.DataFrame(index=first_vars))
        self._template = ScGPTDataset(header, vocab, n_bins=n_bins, max_seq_len=max_seq_len, mask_ratio=mask_ratio,
                                      seed=seed, input_style=input_style, pad_value=pad_value,
                                      mask_value=mask_value, include_zero_genes=include_zero_genes,
                                      min_overlap=min_overlap)
        self.seed = self._template.seed
        self.vocab = vocab
        tok = self._template.tokenizer
        self.label_categories = cats.get(label_key) if label_key else None
        self.batch_categories = cats.get(batch_key) if batch_key else None
        self.shards: list[_Shard] = []
        offset = 0
        for path, key, shape, var_names, local in infos:
            cols, col_ids = tok.column_ids(var_names)
            maps = {}
            for k in obs_keys:
                index = {c: i for i, c in enumerate(cats[k])}
                maps[k] = np.array([index.get(c, IGNORE_LABEL) for c in local[k]], dtype=np.int64)
                if k == batch_key and (maps[k] < 0).any():
                    bad = [c for c, m in zip(local[k], maps[k]) if m < 0][:5]
                    raise ValueError(f"{path}: batch values not in batch_categories: {bad}")
            self.shards.append(_Shard(path, key, shape[0], shape[1], offset, cols, col_ids, maps))
            offset += shape[0]
        self.n_cells = offset
        if self.n_cells == 0:
            raise ValueError("the source holds no cells")
        # (shard, start, stop) with start / stop local to the shard: 3 ints per chunk, the only
        # bookkeeping that grows with the data.
        self._chunks = np.array([(s, a, min(a + self.chunk_size, sh.n_obs))
                                 for s, sh in enumerate(self.shards) for a in range(0, sh.n_obs, self.chunk_size)],
                                dtype=np.int64).reshape(-1, 3)
        self.n_chunks = len(self._chunks)
        self._check_world()

    # --- distribution ---------------------------------------------------------------------------
    def _rank_world(self) -> tuple[int, int]:
        from .. import distributed as bdist

        r = bdist.rank() if self._rank is None else int(self._rank)
        w = bdist.world_size() if self._world is None else int(self._world)
        return r, w

    def _check_world(self) -> tuple[int, int]:
        r, w = self._rank_world()
        if w < 1 or not 0 <= r < w:
            raise ValueError(f"rank {r} must be in 0..world_size-1 (world_size {w})")
        if w > self.n_chunks:
            raise ValueError(f"world size {w} is larger than the number of chunks ({self.n_chunks}: {self.n_cells} "
                             f"cells in chunks of {self.chunk_size}); some ranks would get no data. Use a "
                             f"chunk_size of at most {max(1, self.n_cells // w)} or fewer processes")
        return r, w

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle (chunks, buffers) and redraw masks / subsamples: call before each epoch's loop."""
        self.epoch = int(epoch)
        self._template.set_epoch(epoch)

    def _rank_chunks(self, r: int, w: int) -> np.ndarray:
        order = (np.random.default_rng([self.seed, _CHUNK_STREAM, self.epoch]).permutation(self.n_chunks)
                 if self.shuffle else np.arange(self.n_chunks))
        mine = self._chunks[order[r::w]].copy()
        if self.even:
            limit = min(int((self._chunks[order[q::w], 2] - self._chunks[order[q::w], 1]).sum()) for q in range(w))
            sizes = mine[:, 2] - mine[:, 1]
            excess = int(sizes.sum()) - limit
            for j in range(len(mine) - 1, -1, -1):  # trim from the tail of this epoch's chunk order
                if excess <= 0:
                    break
                cut = min(excess, int(sizes[j]))
                mine[j, 2] -= cut
                excess -= cut
            mine = mine[mine[:, 2] > mine[:, 1]]
        return mine

    def __len__(self) -> int:
        """Cells this rank yields in the current epoch (over all of its DataLoader workers)."""
        r, w = self._check_world()
        mine = self._rank_chunks(r, w)
        return int((mine[:, 2] - mine[:, 1]).sum())

    # --- reading --------------------------------------------------------------------------------
    def _read_chunk(self, files: dict, shard_i: int, start: int, stop: int) -> tuple[sp.csr_matrix, dict]:
        import h5py

        sh = self.shards[shard_i]
        f = files.get(shard_i)
        if f is None:
            f = files[shard_i] = h5py.File(sh.path, "r")
        g = f[sh.key]
        indptr = g["indptr"][start:stop + 1].astype(np.int64)
        lo, hi = int(indptr[0]), int(indptr[-1])
        block = sp.csr_matrix((g["data"][lo:hi], g["indices"][lo:hi], indptr - lo), shape=(stop - start, sh.n_vars))
        if self.check_counts:
            _check_counts(block, what=f"{sh.path} ({sh.key} rows {start}:{stop})")
        codes = {}
        for k, m in sh.code_maps.items():
            raw = f["obs"][k]["codes"][start:stop].astype(np.int64)
            codes[k] = np.where(raw < 0, IGNORE_LABEL, m[np.maximum(raw, 0)])  # code -1: missing value
        return block, codes

    def _items(self, files: dict, chunk) -> list[dict]:
        shard_i, start, stop = (int(v) for v in chunk)
        sh = self.shards[shard_i]
        block, codes = self._read_chunk(files, shard_i, start, stop)
        if not block.has_sorted_indices:
            block.sort_indices()
        first = sh.offset + start
        toks = self._template.tokenizer.tokenize_block(block, sh.cols, sh.col_ids, first, self.epoch)
        out = []
        for j, tok in enumerate(toks):
            item = self._template._mask(tok, first + j)
            if self.label_key is not None:
                item["label"] = int(codes[self.label_key][j])
            if self.batch_key is not None:
                item["batch_id"] = int(codes[self.batch_key][j])
            out.append(item)
        return out

    def __iter__(self) -> Iterator[dict]:
        r, w = self._check_world()
        mine = self._rank_chunks(r, w)
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        mine = mine[wid::nw]
        rng = np.random.default_rng([self.seed, _BUFFER_STREAM, self.epoch, r, wid])
        files: dict = {}
        buf: list[dict] = []
        self.peak_buffered = 0
        try:
            for chunk in mine:
                buf.extend(self._items(files, chunk))
                self.peak_buffered = max(self.peak_buffered, len(buf))
                if len(buf) >= self.buffer_size:
                    yield from self._drain(buf, rng)
                    buf = []
            yield from self._drain(buf, rng)
        finally:
            for f in files.values():
                f.close()

    def _drain(self, buf: list[dict], rng) -> Iterator[dict]:
        order = rng.permutation(len(buf)) if self.shuffle else range(len(buf))
        for i in order:
            yield buf[i]
