"""Original scBERT checkpoints -> :class:`~biogen.models.scbert.network.ScBERTModel`.

The original (TencentAILabHealthcare/scBERT) saves ``torch.save({"model_state_dict": ..., ...})`` of
its vendored performer-pytorch ``PerformerLM`` (gene2vec positional embedding ``pos_emb.emb``,
pre-LayerNorm layers ``performer.net.layers.N.{0,1}``); the fine-tuned checkpoints replace
``to_out`` by the classification head (``to_out.conv1`` / ``fc1`` / ``fc2`` / ``fc3``). The key map
below also accepts the layout of upstream performer-pytorch 1.1 (``proj_updater`` buffer, an extra
``fn.`` wrapper level) and a ``module.`` prefix left by DistributedDataParallel.
"""

from __future__ import annotations

import re
from typing import Optional, Union

import torch

from .network import ScBERTConfig, ScBERTModel

__all__ = ["load_scbert_checkpoint", "map_scbert_keys"]

_LAYER = re.compile(r"^performer\.net\.layers\.(\d+)\.([01])\.(.+)$")
_ATTN = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out"}
_COUNTERS = ("performer.calls_since_last_redraw", "performer.proj_updater.calls_since_last_redraw")


def _strip(key: str) -> str:
    return key[len("module."):] if key.startswith("module.") else key


def _map_one(key: str) -> Optional[str]:
    """biogen key of one original key; '' for keys deliberately dropped; None if unknown."""
    k = _strip(key)
    simple = {"token_emb.weight": "token_emb.weight", "pos_emb.emb.weight": "gene_emb.weight",
              "norm.weight": "norm.weight", "norm.bias": "norm.bias",
              "to_out.weight": "mlm_head.weight", "to_out.bias": "mlm_head.bias"}
    if k in simple:
        return simple[k]
    if k in _COUNTERS:
        return ""  # redraw counter: per layer in biogen, set separately
    if k.startswith("performer.proj_updater.instance."):
        return ""  # upstream performer-pytorch registers the layers twice (alias of performer.net)
    m = re.match(r"^to_out\.(conv1|fc1|fc2|fc3)\.(weight|bias)$", k)
    if m:
        return f"cls_head.{m.group(1)}.{m.group(2)}"
    m = _LAYER.match(k)
    if not m:
        return None
    i, sub, rest = m.group(1), m.group(2), m.group(3)
    if rest in ("norm.weight", "norm.bias"):
        return f"layers.{i}.{'attn_norm' if sub == '0' else 'ff_norm'}.{rest.split('.')[1]}"
    rest = re.sub(r"^(fn\.)+", "", rest)  # PreLayerNorm / Chunk / PreShiftTokens wrappers
    if sub == "0":
        if rest == "fast_attention.projection_matrix":
            return f"layers.{i}.attn.projection"
        m2 = re.match(r"^(to_q|to_k|to_v|to_out)\.(weight|bias)$", rest)
        if m2:
            return f"layers.{i}.attn.{_ATTN[m2.group(1)]}.{m2.group(2)}"
        return None
    m2 = re.match(r"^(w1|w2)\.(weight|bias)$", rest)
    return f"layers.{i}.ff.{m2.group(1)}.{m2.group(2)}" if m2 else None


def map_scbert_keys(keys) -> dict:
    """Map original scBERT / performer-pytorch ``PerformerLM`` state-dict keys to biogen keys.

    Parameters
    ----------
    keys : iterable of key names (or a state dict).

    Returns
    -------
    dict original key -> biogen key, or '' for keys not loaded (the redraw counter, which biogen keeps
    per layer; upstream's aliased ``proj_updater.instance`` copies).

    Raises
    ------
    ValueError : keys of unsupported features (local attention heads, q/k/v biases, ...), listed.
    """
    out, unknown = {}, []
    for key in keys:
        new = _map_one(key)
        if new is None or new.endswith(("to_q.bias", "to_k.bias", "to_v.bias")):
            unknown.append(key)
        else:
            out[key] = new
    if unknown:
        raise ValueError(f"unsupported scBERT checkpoint keys (local attention, qkv biases or another model?): "
                         f"{unknown[:8]}{' ...' if len(unknown) > 8 else ''}")
    return out


def _state_dict(obj) -> dict:
    if isinstance(obj, dict) and "model_state_dict" in obj:
        obj = obj["model_state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError("expected a state dict (or a dict with 'model_state_dict') of tensors")
    return obj


def load_scbert_checkpoint(path_or_state: Union[str, dict], *, heads: int = 10, **config_overrides) -> ScBERTModel:
    """Build a :class:`ScBERTModel` from an original scBERT checkpoint and load its weights.

    The architecture is read from the tensor shapes (dim, panel length, depth, random features,
    FF width, head widths and classes); ``heads`` cannot be (q/k/v projections are heads x dim_head
    wide) and defaults to the original's 10. The stored projection matrices are loaded too, so the
    model reproduces the checkpoint's outputs exactly until the next redraw.

    Parameters
    ----------
    path_or_state : ``.pth`` file (``torch.load`` with ``weights_only=True``) or a state dict.
    heads : attention heads.
    **config_overrides : other :class:`ScBERTConfig` fields (dropouts, redraw_interval, backend ...).
    """
    obj = torch.load(path_or_state, map_location="cpu", weights_only=True) \
        if not isinstance(path_or_state, dict) else path_or_state
    sd = {_strip(k): v for k, v in _state_dict(obj).items()}
    names = map_scbert_keys(sd)
    need = ("token_emb.weight", "pos_emb.emb.weight", "norm.weight")
    missing = [k for k in need if k not in sd]
    if missing:
        raise ValueError(f"not an scBERT checkpoint: missing {missing}")
    n_tokens, dim = sd["token_emb.weight"].shape
    n_genes = sd["pos_emb.emb.weight"].shape[0] - 1
    depth = len({int(m.group(1)) for k in sd if (m := _LAYER.match(k))})
    if depth == 0:
        raise ValueError("not an scBERT checkpoint: no performer.net.layers.* keys")
    q = next(v for k, v in sd.items() if names[k] == "layers.0.attn.to_q.weight")
    if q.shape[0] % heads:
        raise ValueError(f"q projection width {q.shape[0]} is not divisible by heads={heads}")
    proj = [v for k, v in sd.items() if names[k] == "layers.0.attn.projection"]
    w1 = next(v for k, v in sd.items() if names[k] == "layers.0.ff.w1.weight")
    cfg = dict(dim=int(dim), depth=depth, heads=heads, dim_head=q.shape[0] // heads, ff_mult=w1.shape[0] // dim,
               nb_features=int(proj[0].shape[0]) if proj else None, n_tokens=int(n_tokens))
    n_classes = 0
    if "to_out.fc3.weight" in sd:
        cfg["head_hidden"] = (sd["to_out.fc1.weight"].shape[0], sd["to_out.fc2.weight"].shape[0])
        n_classes = sd["to_out.fc3.weight"].shape[0]
    cfg.update(config_overrides)
    model = ScBERTModel(ScBERTConfig(**cfg), n_genes, n_classes=n_classes)
    new = {}
    for k, v in sd.items():
        if names[k]:
            new[names[k]] = v.to(torch.float32)
    counter = next((sd[k] for k in _COUNTERS if k in sd), None)
    for i in range(depth):
        new[f"layers.{i}.attn.calls_since_redraw"] = (counter.clone() if counter is not None
                                                      else torch.zeros((), dtype=torch.long))
    own = model.state_dict()
    if "mlm_head.weight" not in new:  # fine-tuned checkpoints dropped the MLM head
        new["mlm_head.weight"], new["mlm_head.bias"] = own["mlm_head.weight"], own["mlm_head.bias"]
    if not proj:  # a checkpoint without stored projections keeps freshly drawn ones
        for i in range(depth):
            new[f"layers.{i}.attn.projection"] = own[f"layers.{i}.attn.projection"]
    bad = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in new.items() if k in own and v.shape != own[k].shape]
    if bad:
        raise ValueError(f"checkpoint shapes do not match the inferred architecture: {bad[:5]}")
    model.load_state_dict(new, strict=True)
    model.eval()
    return model
