"""Load original scGPT checkpoints (bowang-lab/scGPT ``TransformerModel``) into :class:`ScGPTModel`.

A scGPT model folder holds ``best_model.pt`` (a state dict), ``args.json`` (training arguments)
and ``vocab.json`` (token -> id). Parameter names match biogen's modules except the attention
input projection, which the reference stores either as flash-attn's ``self_attn.Wqkv.*`` or as
``nn.MultiheadAttention``'s ``self_attn.in_proj_weight`` / ``in_proj_bias``; both have the same
(q | k | v) x heads x head_dim row layout as biogen's ``Wqkv``, so they are renamed, not permuted.

Token ids are remapped: biogen's :class:`~biogen.sc.GeneVocab` fixes ``<pad>`` = 0, ``<cls>`` = 1,
``<mask>`` = 2 and genes from 3, so the gene-embedding rows are reordered to match.
"""

from __future__ import annotations

import json
import os
import re
import warnings

import torch

from .network import ScGPTConfig, ScGPTModel

#: reference parameters with no counterpart here that can be dropped without changing what
#: biogen computes: the generative flag embedding (biogen marks unknown genes by their value and
#: the attention mask instead), explicit zero-probability heads, the adversarial batch
#: discriminator.
IGNORED_PREFIXES = ("flag_encoder.", "decoder.zero_logit.", "mvc_decoder.W_zero_logit.",
                    "grad_reverse_discriminator.")

_SPECIAL = re.compile(r"^<[^<>]+>$")


def _strip_wrappers(sd: dict) -> dict:
    out = {}
    for k, v in sd.items():
        for prefix in ("module.", "_orig_mod."):  # DDP / torch.compile wrappers
            if k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def map_reference_keys(ref_state: dict) -> tuple[dict, list[str], list[str]]:
    """Rename reference parameter names to biogen's.

    Returns ``(mapped, ignored, unsupported)``: the renamed state dict, the reference keys dropped
    on purpose (:data:`IGNORED_PREFIXES`), and keys biogen has no module for.
    """
    mapped, ignored, unsupported = {}, [], []
    for k, v in _strip_wrappers(ref_state).items():
        if k.startswith(IGNORED_PREFIXES):
            ignored.append(k)
            continue
        if k.startswith(("dsbn.", "bn.", "cls_decoder.cls_token_matrix", "cls_decoder.embed_norm",
                         "cls_decoder.token_norm", "mvc_decoder.fc1", "mvc_decoder.fc2",
                         "mvc_decoder.hidden_activation")):
            unsupported.append(k)
            continue
        k = k.replace(".self_attn.in_proj_weight", ".self_attn.Wqkv.weight")
        k = k.replace(".self_attn.in_proj_bias", ".self_attn.Wqkv.bias")
        mapped[k] = v
    return mapped, ignored, unsupported


def _config_from(args: dict, sd: dict) -> tuple[ScGPTConfig, int]:
    """Config from args.json, with every size that the weights determine taken from the weights."""
    def arg(*names, default=None):
        for n in names:
            if n in args and args[n] is not None:
                return args[n]
        return default

    d_model = sd["encoder.embedding.weight"].shape[1]
    layer_ids = {int(m.group(1)) for k in sd if (m := re.match(r"transformer_encoder\.layers\.(\d+)\.", k))}
    if not layer_ids:
        raise ValueError("checkpoint has no transformer_encoder.layers.* parameters")
    d_hid = sd["transformer_encoder.layers.0.linear1.weight"].shape[0]
    n_lin_cls = len({k for k in sd if re.match(r"cls_decoder\._decoder\.\d+\.weight", k)
                     and sd[k].ndim == 2})
    n_classes = sd["cls_decoder.out_layer.weight"].shape[0] if "cls_decoder.out_layer.weight" in sd else 0
    style = arg("input_emb_style", default="continuous")
    if style not in ("continuous", "category"):
        raise ValueError(f"args.json input_emb_style={style!r} is not supported (continuous, category)")
    n_bins = int(arg("n_bins", default=51))
    pad_value, mask_value = float(arg("pad_value", default=-2)), float(arg("mask_value", default=-1))
    if style == "category":
        n_rows = sd["value_encoder.embedding.weight"].shape[0]
        # The reference embeds bins 0..n_bins-1 plus pad (n_bins) and mask (n_bins + 1).
        n_bins = n_rows - 2
        pad_value, mask_value = float(n_bins), float(n_bins + 1)
    for name, given, actual in (("embsize", arg("embsize", "d_model"), d_model),
                                ("nlayers", arg("nlayers"), len(layer_ids)), ("d_hid", arg("d_hid"), d_hid)):
        if given is not None and int(given) != actual:
            raise ValueError(f"args.json {name}={given} disagrees with the weights ({actual})")
    nhead = arg("nheads", "nhead")
    if nhead is None:
        raise ValueError("args.json lacks 'nheads': the number of attention heads cannot be read from weights")
    if arg("pre_norm", default=False):
        warnings.warn("this checkpoint was trained with scGPT's pre_norm scheme, which biogen's standard "
                      "pre-norm block does not reproduce exactly", stacklevel=3)
    cfg = ScGPTConfig(
        d_model=d_model, nhead=int(nhead), nlayers=len(layer_ids), d_hid=d_hid,
        dropout=float(arg("dropout", default=0.2)), n_bins=n_bins, input_style=style,
        max_seq_len=int(arg("max_seq_len", default=1200)), pre_norm=bool(arg("pre_norm", default=False)),
        n_batches=sd["batch_encoder.embedding.weight"].shape[0] if "batch_encoder.embedding.weight" in sd else None,
        mvc="mvc_decoder.W.weight" in sd, nlayers_cls=(n_lin_cls + 1) if n_classes else 3,
        pad_value=pad_value, mask_value=mask_value,
    )
    return cfg, n_classes


def load_scgpt_checkpoint(path: str | os.PathLike, *, map_location: str | torch.device = "cpu",
                          strict: bool = True):
    """Read a scGPT model folder and return ``(model, vocab)``.

    Parameters
    ----------
    path : folder with ``best_model.pt`` (or ``model.pt``), ``args.json`` and ``vocab.json``.
    map_location : device for the weights.
    strict : raise if a reference parameter has no place in biogen's model (other than the ones in
        :data:`IGNORED_PREFIXES`) or a biogen parameter is missing from the checkpoint.

    Returns
    -------
    model : :class:`ScGPTModel` in eval mode; config derived from ``args.json`` and the weight shapes.
    vocab : :class:`biogen.sc.GeneVocab` of the checkpoint's genes (special tokens other than
        ``<pad>``, ``<cls>``, ``<mask>``, e.g. ``<eoc>``, are dropped).
    """
    from biogen.sc import GeneVocab

    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"scGPT checkpoint folder {path!r} does not exist")
    weights = next((os.path.join(path, f) for f in ("best_model.pt", "model.pt")
                    if os.path.exists(os.path.join(path, f))), None)
    missing = [f for f, p in (("best_model.pt", weights), ("args.json", os.path.join(path, "args.json")),
                              ("vocab.json", os.path.join(path, "vocab.json"))) if p is None or not os.path.exists(p)]
    if missing:
        raise FileNotFoundError(f"scGPT checkpoint folder {path!r} lacks {missing}")
    with open(os.path.join(path, "args.json"), encoding="utf-8") as f:
        args = json.load(f)
    with open(os.path.join(path, "vocab.json"), encoding="utf-8") as f:
        ref_vocab: dict = json.load(f)
    ref_state = torch.load(weights, map_location=map_location, weights_only=True)
    if not isinstance(ref_state, dict):
        raise ValueError(f"{weights}: expected a state dict, got {type(ref_state).__name__}")
    sd, ignored, unsupported = map_reference_keys(ref_state)
    out_w = sd.get("cls_decoder.out_layer.weight")
    if out_w is not None and out_w.shape[0] < 2:
        # scGPT always builds a classifier, with one output when no task was set: not a real head.
        for k in [k for k in sd if k.startswith("cls_decoder.")]:
            ignored.append(k)
            del sd[k]
    if unsupported and strict:
        raise ValueError(f"checkpoint parameters with no counterpart in biogen's model: {unsupported[:8]}")

    pad_token = args.get("pad_token", "<pad>")
    for tok in (pad_token, "<cls>"):
        if tok not in ref_vocab:
            raise ValueError(f"vocab.json lacks the special token {tok!r}")
    genes = sorted((g for g in ref_vocab if not _SPECIAL.match(g)), key=lambda g: ref_vocab[g])
    vocab = GeneVocab(genes)
    emb = sd["encoder.embedding.weight"]
    if emb.shape[0] < max(ref_vocab.values()) + 1:
        raise ValueError(f"vocab.json has ids up to {max(ref_vocab.values())} but the gene embedding has "
                         f"{emb.shape[0]} rows")
    cfg, n_classes = _config_from(args, sd)
    model = ScGPTModel(cfg, len(vocab), vocab.pad_id, n_classes=n_classes)
    # Rows in biogen's id order: pad, cls, mask (reference row if it has one, else keep the fresh
    # initialisation; masked values are marked through the value input, never the gene token), genes.
    src = torch.tensor([ref_vocab[pad_token], ref_vocab["<cls>"], ref_vocab.get("<mask>", -1)]
                       + [ref_vocab[g] for g in genes])
    new_emb = model.encoder.embedding.weight.detach().clone().to(emb.device, emb.dtype)
    has = src >= 0
    new_emb[has] = emb[src[has]]
    sd["encoder.embedding.weight"] = new_emb
    result = model.load_state_dict(sd, strict=False)
    if strict and (result.missing_keys or result.unexpected_keys):
        raise ValueError(f"checkpoint does not match the model: missing {result.missing_keys[:8]}, "
                         f"unexpected {result.unexpected_keys[:8]}")
    model.to(map_location).eval()
    model.ignored_checkpoint_keys = ignored
    return model, vocab
