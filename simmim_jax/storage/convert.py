"""PyTorch checkpoints <-> simmim_jax: the official SimMIM weights and Hugging Face transformers models.

Formats read (detected from the keys, `detect_format`):
  * "official": microsoft/SimMIM and microsoft/Swin-Transformer state dicts (the modules of microsoft/SimMIM
    `models/simmim.py`, `models/vision_transformer.py`, `models/swin_transformer.py` and microsoft/Swin-Transformer
    `models/swin_transformer_v2.py`). Pretraining: `encoder.*` + `decoder.0.*` -> a `models.SimMIM`; fine-tuning:
    bare encoder keys + `head.*` -> a `models.Classifier`; bare encoder keys -> the encoder alone. ViT
    (BEiT-style, and timm's plain layout with `pos_embed` / `qkv.bias`), Swin and SwinV2 (`rpe_mlp`, the
    name in the released SwinV2 files, is read as `cpb_mlp`, as microsoft/Swin-Transformer `utils_simmim.py`:25-27).
  * "hf_vit", "hf_beit", "hf_swin", "hf_swinv2": transformers' `ViT*`, `Beit*`, `Swin*`, `Swinv2*` hub key
    names (`*ForMaskedImageModeling`: `vit.` / `beit.` / `swin.` / `swinv2.` + `decoder.0.`; `*Model`: bare;
    `*ForImageClassification`: + `classifier.`). They are renamed to the official names first (q / k / v
    concatenated into the fused `qkv`, BEiT / SwinV2 query and value biases to `q_bias` / `v_bias`), so
    there is a single official <-> Flax mapping. `official_to_hf` applies the same rules inverted (the HF
    export, `hf_export.py`).

The official <-> Flax mapping, explicit for every parameter:
  Linear weight [out, in] <-> Dense kernel W.T; Conv weight [O, I, kh, kw] <-> kernel HWIO (2, 3, 1, 0);
  the 1x1 `decoder.0` conv [O, D, 1, 1] <-> Dense kernel [D, O] (output channels stay in PixelShuffle order);
  LayerNorm weight / bias <-> scale / bias; `qkv` stays fused (rows [q; k; v]); ViT `q_bias` / `v_bias`
  and layer scale `gamma_1` / `gamma_2` are separate parameters; relative position tables as they are.
  Buffers (`relative_position_index`, `attn_mask`, SwinV2 `relative_coords_table`) are recomputed by the
  model: they are dropped on reading and recomputed on writing (`to_torch`), so the official code loads the
  exported dict with `strict=True`.

Layout fields the keys reveal are inferred (`infer_layout`): ViT absolute vs shared vs per-block relative
position bias, layer scale, q/v vs q/k/v bias, mean pooling; Swin qkv bias, `ape`, `patch_norm`. Sizes
(width, depth, heads, window, image size) come from the encoder name and overrides; any key the model does
not have, any parameter the checkpoint lacks and any shape that differs is listed by name
(`ConversionError`). Numbers the keys cannot reveal (LayerNorm eps) come from the name: use `vit_*_plain`
(eps 1e-12, as `ViTConfig`) for HF ViT checkpoints, and `layer_norm_eps=` for BEiT configs that differ.

  model, variables = convert.from_torch(torch_files.load_state_dict("simmim_vit_base.pth"),
                                        encoder="vit_base_patch16")
  state_dict = convert.to_torch(model, variables)          # official keys, buffers included

CLI: `simmim-convert --checkpoint=FILE --encoder=NAME --workdir=DIR` writes a `simmim-pretrain` workdir
(`config.json` + an Orbax step-0 checkpoint) that `workdir.load_model`, `simmim-reconstruct`,
`simmim-pretrain` (continue pretraining) and `simmim-finetune --config.pretrained=DIR` start from. DIR must be
new or empty, or a workdir of the same model without checkpoints (`workdir.check_convert_target`); an existing
`--out` file is replaced only with `--overwrite`, atomically (cli.py, safe_files.py).
"""

import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from simmim_jax import models
from simmim_jax.models import layers, swin, swin_v2, vit
from simmim_jax.models.classifier import Classifier

FORMATS = ("official", "hf_vit", "hf_beit", "hf_swin", "hf_swinv2")
BUFFER_SUFFIXES = ("relative_position_index", "attn_mask", "relative_coords_table")


class ConversionError(ValueError):
  """The checkpoint does not fit the model; the message lists every key that does not."""


# ----------------------------------------------------------------------------------------------------
# Format detection and HF -> official key names


def detect_format(keys) -> str:
  """One of FORMATS, from the key names alone."""
  keys = list(keys)
  joined = "\n".join(keys)
  if "continuous_position_bias_mlp" in joined or re.search(r"(^|\.)swinv2\.", joined):
    return "hf_swinv2"
  if "attention.self.query" in joined or re.search(r"(^|\n)swin\.embeddings", joined):
    return "hf_swin"
  if "attention.attention.query" in joined:
    no_key_bias = "attention.attention.query.bias" in joined and "attention.attention.key.bias" not in joined
    if ("lambda_1" in joined or "relative_position_bias" in joined or re.search(r"(^|\n)beit\.", joined)
        or no_key_bias):  # BEiT: query and value biases, never a key bias
      return "hf_beit"
    return "hf_vit"
  if re.search(r"(^|\.)blocks\.\d+\.", joined) or "patch_embed.proj" in joined:
    return "official"
  raise ConversionError(f"cannot tell the checkpoint format from its keys (first keys: {keys[:5]}); "
                        f"expected official SimMIM / Swin keys or Hugging Face ViT, BEiT, Swin or SwinV2 keys")


_HF_MODEL_PREFIXES = {"hf_vit": "vit.", "hf_beit": "beit.", "hf_swin": "swin.", "hf_swinv2": "swinv2."}

def _block_rules(hf_block: str, official_block: str, groups: int) -> list[tuple[str, str]]:
  """The HF -> official rules of a transformer block's projections and norms, both families: `hf_block` matches
  the block's HF prefix with `groups` groups, which `official_block` reuses."""
  leaf = "\\" + str(groups + 1)  # a plain group reference: _invert_rule reads the rules back
  names = (("attention.output.dense", "attn.proj"), ("intermediate.dense", "mlp.fc1"), ("output.dense", "mlp.fc2"),
           ("layernorm_before", "norm1"), ("layernorm_after", "norm2"))
  return [(rf"{hf_block}\.{re.escape(hf)}\.(weight|bias)", f"{official_block}.{official}.{leaf}")
          for hf, official in names]


# (regex on the HF key without its model prefix, official replacement); first match wins.
_HF_VIT_RULES = [
    (r"embeddings\.cls_token", "cls_token"),
    (r"embeddings\.mask_token", "mask_token"),
    (r"embeddings\.position_embeddings", "pos_embed"),
    (r"embeddings\.patch_embeddings\.projection\.(weight|bias)", r"patch_embed.proj.\1"),
    (r"encoder\.relative_position_bias\.relative_position_bias_table", "rel_pos_bias.relative_position_bias_table"),
    (r"encoder\.relative_position_bias\.relative_position_index", "rel_pos_bias.relative_position_index"),
    (r"encoder\.layer\.(\d+)\.attention\.attention\.relative_position_bias\.(relative_position_\w+)",
     r"blocks.\1.attn.\2"),
    *_block_rules(r"encoder\.layer\.(\d+)", r"blocks.\1", groups=1),
    (r"encoder\.layer\.(\d+)\.lambda_(1|2)", r"blocks.\1.gamma_\2"),
    (r"layernorm\.(weight|bias)", r"norm.\1"),
    (r"pooler\.layernorm\.(weight|bias)", r"fc_norm.\1"),
]
_HF_SWIN_RULES = [
    (r"embeddings\.mask_token", "mask_token"),
    (r"embeddings\.position_embeddings", "absolute_pos_embed"),
    (r"embeddings\.patch_embeddings\.projection\.(weight|bias)", r"patch_embed.proj.\1"),
    (r"embeddings\.norm\.(weight|bias)", r"patch_embed.norm.\1"),
    (r"encoder\.layers\.(\d+)\.blocks\.(\d+)\.attention\.self\.continuous_position_bias_mlp\.(\d)\.(weight|bias)",
     r"layers.\1.blocks.\2.attn.cpb_mlp.\3.\4"),
    (r"encoder\.layers\.(\d+)\.blocks\.(\d+)\.attention\.self\.(relative_position_bias_table|logit_scale|"
     r"relative_position_index|relative_coords_table)", r"layers.\1.blocks.\2.attn.\3"),
    *_block_rules(r"encoder\.layers\.(\d+)\.blocks\.(\d+)", r"layers.\1.blocks.\2", groups=2),
    (r"encoder\.layers\.(\d+)\.downsample\.(reduction\.weight|norm\.weight|norm\.bias)", r"layers.\1.downsample.\2"),
    (r"layernorm\.(weight|bias)", r"norm.\1"),
]
# The HF attention module holding query / key / value -> the official attention module (fused `qkv`).
_HF_VIT_QKV_OWNER = (r"encoder\.layer\.(\d+)\.attention\.attention", r"blocks.\1.attn")
_HF_SWIN_QKV_OWNER = (r"encoder\.layers\.(\d+)\.blocks\.(\d+)\.attention\.self", r"layers.\1.blocks.\2.attn")
_HF_QKV_OWNER = {"hf_vit": _HF_VIT_QKV_OWNER, "hf_beit": _HF_VIT_QKV_OWNER, "hf_swin": _HF_SWIN_QKV_OWNER,
                 "hf_swinv2": _HF_SWIN_QKV_OWNER}
_QKV = re.compile(r"(.*)\.(query|key|value)\.(weight|bias)$")



def _store_renamed(out: dict, name: str, value, rules, prefix: str) -> bool:
  """`out[prefix + name renamed by the first (pattern, replacement) rule whose pattern matches it whole] = value`;
  False (nothing stored) when no rule matches."""
  for pattern, replacement in rules:
    if re.fullmatch(pattern, name):
      out[prefix + re.sub(pattern, replacement, name)] = value
      return True
  return False

def _hf_to_official(state_dict: dict[str, np.ndarray], fmt: str) -> dict[str, np.ndarray]:
  """HF hub key names -> official names (official SimMIM prefixes when there is a decoder)."""
  prefix = _HF_MODEL_PREFIXES[fmt]
  rules = _HF_VIT_RULES if fmt in ("hf_vit", "hf_beit") else _HF_SWIN_RULES
  qkv_owner, official_owner = _HF_QKV_OWNER[fmt]
  separate_qv_bias = fmt in ("hf_beit", "hf_swinv2")  # no key bias: q_bias / v_bias parameters
  has_decoder = any(k.startswith("decoder.") for k in state_dict)
  encoder_prefix = "encoder." if has_decoder else ""
  out, unknown, qkv_parts = {}, [], {}
  for key, value in state_dict.items():
    if key.startswith("decoder."):
      out[key] = value
      continue
    if key.startswith("classifier."):
      out["head." + key[len("classifier."):]] = value
      continue
    name = key[len(prefix):] if key.startswith(prefix) else key
    match = _QKV.match(name)
    if match and re.fullmatch(qkv_owner, match.group(1)):
      official_attn = re.sub(qkv_owner, official_owner, match.group(1))
      kind, leaf = match.group(2), match.group(3)
      if leaf == "bias" and separate_qv_bias:
        if kind == "key":
          unknown.append(key)  # BEiT / SwinV2 have no key bias
        else:
          out[f"{encoder_prefix}{official_attn}.{kind[0]}_bias"] = value
      else:
        qkv_parts.setdefault(f"{encoder_prefix}{official_attn}.qkv.{leaf}", {})[kind] = (key, value)
      continue
    if not _store_renamed(out, name, value, rules, encoder_prefix):
      unknown.append(key)
  for fused, parts in qkv_parts.items():
    if set(parts) != {"query", "key", "value"}:
      unknown.extend(k for k, _ in parts.values())  # reported below as unexpected
      continue
    out[fused] = np.concatenate([parts[k][1] for k in ("query", "key", "value")], axis=0)
  if unknown:
    raise ConversionError(f"{len(unknown)} key(s) of this {fmt} checkpoint have no simmim_jax counterpart: "
                          f"{sorted(unknown)}")
  return out


def to_official_keys(state_dict: dict[str, Any]) -> tuple[dict[str, np.ndarray], str]:
  """(the state dict with official key names as numpy arrays, the detected format)."""
  state_dict = {k: np.asarray(v) for k, v in state_dict.items()}
  fmt = detect_format(state_dict)
  if fmt != "official":
    state_dict = _hf_to_official(state_dict, fmt)
  # Released SwinV2 checkpoints call the continuous position bias MLP `rpe_mlp` (official loader renames).
  state_dict = {k.replace(".rpe_mlp.", ".cpb_mlp."): v for k, v in state_dict.items()}
  return state_dict, fmt


def _is_buffer(key: str) -> bool:
  return key.rsplit(".", 1)[-1] in BUFFER_SUFFIXES


# ----------------------------------------------------------------------------------------------------
# Official -> HF key names: the rules above, inverted (one mapping, read both ways)


def _invert_rule(pattern: str, replacement: str) -> tuple[str, str]:
  """(official regex, HF replacement) of an HF -> official rule whose groups each appear once in `replacement`."""
  groups = re.findall(r"\([^()]*\)", pattern)
  literals = re.split(r"\([^()]*\)", pattern)  # len(groups) + 1 pieces, regex-escaped dots only
  pieces = re.split(r"\\(\d)", replacement)   # literal, group number, literal, ...
  refs = [int(n) for n in pieces[1::2]]
  if sorted(refs) != list(range(1, len(groups) + 1)) or any(re.search(r"[\\\[\]*+?{}|^$]", p.replace("\\.", ""))
                                                           for p in literals):
    raise AssertionError(f"the HF rule {pattern!r} -> {replacement!r} cannot be inverted")
  inverse_pattern = "".join(re.escape(p) if i % 2 == 0 else groups[int(p) - 1] for i, p in enumerate(pieces))
  inverse_replacement = literals[0].replace("\\.", ".")
  for group, literal in enumerate(literals[1:], start=1):
    inverse_replacement += f"\\g<{refs.index(group) + 1}>" + literal.replace("\\.", ".")
  return inverse_pattern, inverse_replacement


_OFFICIAL_TO_HF_VIT = [_invert_rule(p, r) for p, r in _HF_VIT_RULES]
_OFFICIAL_TO_HF_SWIN = [_invert_rule(p, r) for p, r in _HF_SWIN_RULES]
_OFFICIAL_QKV = re.compile(r"(.*)\.(qkv\.weight|qkv\.bias|q_bias|v_bias)$")
# Buffers the HF models keep in their state dict (persistent); the others are recomputed there and not written.
HF_PERSISTENT_BUFFERS = {"hf_swin": ("relative_position_index",)}


def official_to_hf(state_dict: dict[str, np.ndarray], fmt: str, model_prefix: str = "") -> dict[str, np.ndarray]:
  """An official-format state dict (`to_torch`) in the HF key names of `fmt` (inverse of `to_official_keys`).

  Encoder keys (`encoder.*` with a decoder, else bare) get `model_prefix` (e.g. "vit." for
  ViTForMaskedImageModeling, "" for BeitModel), `decoder.0.*` stays, `head.*` becomes `classifier.*`; the
  fused `qkv` is split into query / key / value, `q_bias` / `v_bias` become the query / value biases. Buffers
  HF recomputes are dropped. The result is mapped back with `to_official_keys`' rules and must give the input
  again (else ConversionError): the two directions cannot drift apart.
  """
  if fmt not in _HF_MODEL_PREFIXES:
    raise ValueError(f"fmt={fmt!r} is not one of {sorted(_HF_MODEL_PREFIXES)}")
  rules = _OFFICIAL_TO_HF_VIT if fmt in ("hf_vit", "hf_beit") else _OFFICIAL_TO_HF_SWIN
  owner_pattern, owner_replacement = _invert_rule(*_HF_QKV_OWNER[fmt])
  has_decoder = any(k.startswith("decoder.") for k in state_dict)
  kept_buffers = HF_PERSISTENT_BUFFERS.get(fmt, ())
  out, unknown, written = {}, [], {}
  for key, value in state_dict.items():
    value = np.asarray(value)
    if key.startswith(("decoder.", "head.")):
      out[key if key.startswith("decoder.") else "classifier." + key[len("head."):]] = value
      written[key] = value
      continue
    if has_decoder and not key.startswith("encoder."):
      unknown.append(key)
      continue
    name = key[len("encoder."):] if has_decoder else key
    if _is_buffer(name) and name.rsplit(".", 1)[-1] not in kept_buffers:
      continue
    written[key] = value
    match = _OFFICIAL_QKV.match(name)
    if match and re.fullmatch(owner_pattern, match.group(1)):
      attention = model_prefix + re.sub(owner_pattern, owner_replacement, match.group(1))
      leaf = match.group(2)
      if leaf.startswith("qkv."):
        for part, chunk in zip(("query", "key", "value"), np.split(value, 3, axis=0)):
          out[f"{attention}.{part}.{leaf[len('qkv.'):]}"] = np.ascontiguousarray(chunk)
      else:
        out[f"{attention}.{'query' if leaf == 'q_bias' else 'value'}.bias"] = value
      continue
    if not _store_renamed(out, name, value, rules, model_prefix):
      unknown.append(key)
  if unknown:
    raise ConversionError(f"{len(unknown)} key(s) have no {fmt} counterpart: {sorted(unknown)}")
  back = _hf_to_official(out, fmt)
  differ = sorted(set(back) ^ set(written)) + sorted(
      k for k in set(back) & set(written) if back[k].shape != written[k].shape or not np.array_equal(back[k],
                                                                                                     written[k]))
  if differ:
    raise ConversionError(f"the {fmt} key names do not map back to the official ones: {differ[:20]}")
  return out


# ----------------------------------------------------------------------------------------------------
# Layout inference and model construction


def split_official(state_dict: dict[str, np.ndarray]) -> tuple[str, dict, dict]:
  """(kind, encoder entries without prefix, head entries) with kind "simmim", "classifier" or "encoder"."""
  if any(k.startswith("decoder.") for k in state_dict):
    stray = sorted(k for k in state_dict if not k.startswith(("encoder.", "decoder.0.")))
    if stray:
      raise ConversionError(f"a SimMIM (pretraining) checkpoint has only encoder.* and decoder.0.* keys; "
                            f"unexpected: {stray}")
    encoder = {k[len("encoder."):]: v for k, v in state_dict.items() if k.startswith("encoder.")}
    return "simmim", encoder, {k: v for k, v in state_dict.items() if k.startswith("decoder.")}
  head = {k: v for k, v in state_dict.items() if k.startswith("head.")}
  encoder = {k: v for k, v in state_dict.items() if not k.startswith("head.")}
  return ("classifier" if head else "encoder"), encoder, head


def encoder_family(encoder_keys) -> str:
  """"vit", "swin" or "swinv2" from the (prefix-free) encoder keys."""
  keys = set(encoder_keys)
  if any(".cpb_mlp." in k or k.endswith(".logit_scale") for k in keys):
    return "swinv2"
  if any(k.startswith("layers.") for k in keys):
    return "swin"
  if any(k.startswith("blocks.") for k in keys):
    return "vit"
  raise ConversionError(f"no ViT (blocks.*) or Swin (layers.*) encoder keys found among {sorted(keys)[:8]}")


def infer_layout(encoder_keys) -> dict[str, Any]:
  """Encoder field values the keys reveal (see the module docstring)."""
  keys = set(encoder_keys)
  family = encoder_family(keys)
  if family == "vit":
    has = lambda key: key in keys
    layout = dict(use_abs_pos_emb=has("pos_embed"),
                  use_shared_rel_pos_bias=has("rel_pos_bias.relative_position_bias_table"),
                  use_rel_pos_bias=has("blocks.0.attn.relative_position_bias_table"),
                  use_mean_pooling=has("fc_norm.weight"),
                  qkv_bias=has("blocks.0.attn.q_bias") or has("blocks.0.attn.qkv.bias"),
                  qkv_bias_layout="qkv" if has("blocks.0.attn.qkv.bias") else "qv")
    if not has("blocks.0.gamma_1"):
      layout["layer_scale_init"] = None
    return layout
  first = "layers.0.blocks.0.attn."
  bias_key = first + ("q_bias" if family == "swinv2" else "qkv.bias")
  return dict(qkv_bias=bias_key in keys, ape="absolute_pos_embed" in keys,
              patch_norm="patch_embed.norm.weight" in keys)


_FAMILY_CLASSES = {"vit": vit.VisionTransformer, "swin": swin.SwinTransformer, "swinv2": swin_v2.SwinTransformerV2}


def build_model(kind: str, encoder: Any, head: dict[str, np.ndarray]):
  if kind == "simmim":
    return models.SimMIM(encoder=encoder, encoder_stride=encoder.output_stride, in_chans=encoder.in_chans)
  if kind == "classifier":
    return Classifier(encoder=encoder, num_classes=int(head["head.weight"].shape[0]))
  return encoder


def _dummy_inputs(encoder) -> tuple[jax.Array, jax.Array]:
  grid = encoder.img_size // encoder.patch_size
  return (jnp.zeros((1, encoder.img_size, encoder.img_size, encoder.in_chans), jnp.float32),
          jnp.zeros((1, grid, grid), jnp.int32))


def abstract_params(model, with_mask_token: bool = True) -> dict:
  """The model's parameter tree as ShapeDtypeStructs (nothing computed)."""
  encoder = model.encoder if isinstance(model, (models.SimMIM, Classifier)) else model
  images, mask = _dummy_inputs(encoder)
  if isinstance(model, Classifier):
    init = lambda key: model.init(key, images)
  elif isinstance(model, models.SimMIM) or with_mask_token:
    init = lambda key: model.init(key, images, mask)
  else:
    init = lambda key: model.init(key, images)
  return jax.eval_shape(init, jax.random.key(0))["params"]


# ----------------------------------------------------------------------------------------------------
# The official <-> Flax mapping


def _official_name(path: tuple[str, ...]) -> str:
  """Flax path inside an encoder -> official key (e.g. blocks_0/attn/qkv/kernel -> blocks.0.attn.qkv.weight)."""
  name = "/".join(path)
  name = re.sub(r"^patch_embed/(kernel|bias)$", r"patch_embed/proj/\1", name)  # ViT conv sits on its own
  name = re.sub(r"cpb_mlp/layers_(\d+)", r"cpb_mlp/\1", name)
  name = re.sub(r"(blocks|layers)_(\d+)", r"\1/\2", name)
  name = name.replace("attn/relative_position_bias/relative_position_bias_table",
                      "attn/relative_position_bias_table")
  name = re.sub(r"/(kernel|scale)$", "/weight", name)
  return name.replace("/", ".")


def _key_and_layout(kind: str, path: tuple[str, ...]) -> tuple[str, str]:
  """(official key, layout) of a Flax parameter of the whole model; layout says how to transform it."""
  if kind == "simmim":
    if path[0] == "decoder":
      return f"decoder.0.{'weight' if path[1] == 'kernel' else 'bias'}", (
          "conv1x1" if path[1] == "kernel" else "same")
    key, path = "encoder.", path[1:]
  elif kind == "classifier":
    if path[0] == "head":
      return f"head.{'weight' if path[1] == 'kernel' else 'bias'}", "linear" if path[1] == "kernel" else "same"
    key, path = "", path[1:]
  else:
    key = ""
  return key + _official_name(path), "kernel" if path[-1] == "kernel" else "same"


def _to_flax(value: np.ndarray, layout: str, ndim: int) -> np.ndarray:
  if layout == "conv1x1":  # [O, D, 1, 1] -> [D, O]
    return value.reshape(value.shape[:2]).T if value.ndim == 4 else value
  if layout in ("kernel", "linear"):
    if ndim == 2 and value.ndim == 2:
      return value.T  # Linear [out, in] -> [in, out]
    if ndim == 4 and value.ndim == 4:
      return value.transpose(2, 3, 1, 0)  # Conv [O, I, kh, kw] -> [kh, kw, I, O]
  return value


def _from_flax(value: np.ndarray, layout: str) -> np.ndarray:
  if layout == "conv1x1":
    return value.T[:, :, None, None]
  if layout in ("kernel", "linear"):
    return value.T if value.ndim == 2 else value.transpose(3, 2, 0, 1)
  return value


def model_kind(model) -> str:
  if isinstance(model, models.SimMIM):
    return "simmim"
  return "classifier" if isinstance(model, Classifier) else "encoder"


def official_to_flax(model, state_dict: dict[str, np.ndarray], dtype=np.float32) -> dict:
  """{"params": ...} of `model` from an official-format state dict; raises ConversionError listing every
  unexpected / missing key and shape mismatch."""
  kind = model_kind(model)
  with_mask_token = any(k.rsplit(".", 1)[-1] == "mask_token" for k in state_dict)
  target = traverse_util.flatten_dict(abstract_params(model, with_mask_token))
  used, missing, mismatched, params = set(), [], [], {}
  for path, struct in target.items():
    key, layout = _key_and_layout(kind, path)
    if key not in state_dict:
      missing.append(f"{key} {tuple(struct.shape)}")
      continue
    used.add(key)
    value = _to_flax(np.asarray(state_dict[key]), layout, len(struct.shape))
    if tuple(value.shape) != tuple(struct.shape):
      mismatched.append(f"{key}: checkpoint {tuple(state_dict[key].shape)} -> {tuple(value.shape)}, "
                        f"model {tuple(struct.shape)}")
      continue
    params[path] = np.ascontiguousarray(value.astype(dtype))
  unexpected = sorted(k for k in state_dict if k not in used and not _is_buffer(k))
  if unexpected or missing or mismatched:
    lines = []
    if unexpected:
      lines.append(f"unexpected keys (the model has no such parameter): {unexpected}")
    if missing:
      lines.append(f"missing keys (the model needs them): {sorted(missing)}")
    if mismatched:
      lines.append(f"shape mismatches: {sorted(mismatched)}")
    raise ConversionError("the checkpoint does not fit the model:\n  " + "\n  ".join(lines))
  return {"params": traverse_util.unflatten_dict(params)}


def from_torch(state_dict: dict[str, Any], *, encoder: str, **encoder_overrides):
  """(model, variables) for a PyTorch state dict {key: array} in official or HF format.

  `model` is a `models.SimMIM` when the state dict has a decoder, a `Classifier` when it has a head, else
  the encoder; `encoder` is a registry name (`models.list_encoders()`) whose sizes the checkpoint must
  have; `encoder_overrides` are encoder fields (img_size, window_size, layer_norm_eps, ...). Layout fields
  are inferred from the keys; an explicit override wins.
  """
  official, _ = to_official_keys(state_dict)
  kind, encoder_keys, head = split_official(official)
  family = encoder_family(encoder_keys)
  base = models.create_encoder(encoder)
  if type(base) is not _FAMILY_CLASSES[family]:
    raise ConversionError(f"the checkpoint holds a {family} encoder but encoder={encoder!r} is a "
                          f"{type(base).__name__}; pick a {family} name from models.list_encoders()")
  layout = {k: v for k, v in infer_layout(encoder_keys).items() if getattr(base, k) != v}
  encoder_module = models.create_encoder(encoder, **{**layout, **encoder_overrides})
  model = build_model(kind, encoder_module, head)
  return model, official_to_flax(model, official)


def layout_overrides(state_dict: dict[str, Any], encoder: str) -> dict[str, Any]:
  """The encoder fields `from_torch` infers from the keys that differ from `encoder`'s defaults."""
  official, _ = to_official_keys(state_dict)
  _, encoder_keys, _ = split_official(official)
  base = models.create_encoder(encoder)
  return {k: v for k, v in infer_layout(encoder_keys).items() if getattr(base, k) != v}


# ----------------------------------------------------------------------------------------------------
# Flax -> official (export)


def _encoder_buffers(encoder) -> dict[str, np.ndarray]:
  """The official encoder's buffers (prefix-free keys), recomputed from its configuration."""
  buffers = {}
  if isinstance(encoder, vit.VisionTransformer):
    grid = encoder.img_size // encoder.patch_size
    index = vit.relative_position_index_with_cls(grid, grid).astype(np.int64)
    if encoder.use_shared_rel_pos_bias:
      buffers["rel_pos_bias.relative_position_index"] = index
    if encoder.use_rel_pos_bias:
      for i in range(encoder.depth):
        buffers[f"blocks.{i}.attn.relative_position_index"] = index
    return buffers
  is_v2 = isinstance(encoder, swin_v2.SwinTransformerV2)
  grid = encoder.img_size // encoder.patch_size
  for stage, depth in enumerate(encoder.depths):
    resolution = grid // 2 ** stage
    pretrained = (encoder.pretrained_window_sizes or [0] * len(encoder.depths))[stage] if is_v2 else 0
    for j in range(depth):
      window, shift = swin.effective_window(resolution, encoder.window_size,
                                            0 if j % 2 == 0 else encoder.window_size // 2)
      prefix = f"layers.{stage}.blocks.{j}."
      if is_v2:
        table = swin_v2.relative_coords_table(window, pretrained)
        buffers[prefix + "attn.relative_coords_table"] = table.reshape(1, 2 * window - 1, 2 * window - 1, 2)
      buffers[prefix + "attn.relative_position_index"] = layers.relative_position_index(window, window).astype(
          np.int64)
      mask = swin.shifted_window_attention_mask(resolution, resolution, window, shift)
      if mask is not None:
        buffers[prefix + "attn_mask"] = mask
  return buffers


def to_torch(model, variables: dict, *, include_buffers: bool = True, dtype=np.float32) -> dict[str, np.ndarray]:
  """The official-format state dict {key: numpy array} of `model`'s `variables` (inverse of from_torch for
  official checkpoints). Buffers are recomputed so that the official model loads it with strict=True."""
  kind = model_kind(model)
  out = {}
  for path, value in traverse_util.flatten_dict(jax.device_get(variables["params"])).items():
    key, layout = _key_and_layout(kind, path)
    out[key] = np.ascontiguousarray(_from_flax(np.asarray(value), layout).astype(dtype))
  if include_buffers:
    encoder = model.encoder if kind != "encoder" else model
    prefix = "encoder." if kind == "simmim" else ""
    out.update({prefix + k: v for k, v in _encoder_buffers(encoder).items()})
  return out


# ----------------------------------------------------------------------------------------------------
# simmim-pretrain workdirs


def save_workdir(workdir: str, model, variables: dict, *, encoder: str, overrides: dict[str, Any],
                 config=None, source: str = "") -> None:
  """Writes a `simmim-pretrain` workdir for a converted SimMIM: config.json + its parameters as the step-0
  checkpoint (meta "converted_from": `source`).

  `config` is a pretraining config to continue with (default: `default_config` with this model); its
  model must build exactly the converted parameter tree (`workdir_config`). `workdir.load_model(workdir)`
  then returns the converted weights, `simmim-pretrain --config=<same config> --workdir=DIR` continues from
  them (fresh optimizer state, step 0) and `simmim-finetune --config.pretrained=DIR` fine-tunes them.
  `workdir` must be a new or empty folder, or a workdir of the same model without checkpoints
  (`workdir.check_convert_target`): nothing else is overwritten.
  """
  from simmim_jax.storage import workdir as workdir_lib  # pylint: disable=g-import-not-at-top

  config = workdir_config(model, variables, encoder=encoder, overrides=overrides, config=config)
  params = jax.tree.map(jnp.asarray, variables["params"])
  workdir_lib.write_converted(workdir, config, {"params": params},
                              {"step": 0, "signature": workdir_lib.signature(config), "converted_from": source})


def workdir_config(model, variables: dict, *, encoder: str, overrides: dict[str, Any], config=None):
  """The pretraining config of `save_workdir`'s workdir (ConversionError when its model does not build exactly
  the converted parameter tree). Writes nothing."""
  import ml_collections  # pylint: disable=g-import-not-at-top

  from simmim_jax.configs import default_config  # pylint: disable=g-import-not-at-top

  if model_kind(model) != "simmim":
    raise ConversionError("only a SimMIM (pretraining) checkpoint, with a decoder, becomes a simmim-pretrain "
                          "workdir; this one is a " + model_kind(model) + " (use --out=FILE.npz)")
  if config is None:
    config = default_config.get_config()
    config.img_size = model.encoder.img_size
  config = ml_collections.ConfigDict(config.to_dict())
  if config.model.name != encoder:
    config.model = ml_collections.ConfigDict({"name": encoder})
  for key, value in overrides.items():
    if key == "img_size":
      config.img_size = value
    elif key not in config.model or config.model[key] != value:
      config.model[key] = tuple(value) if isinstance(value, list) else value
  expected = traverse_util.flatten_dict(abstract_params(models.simmim_from_config(config)))
  got = traverse_util.flatten_dict(variables["params"])
  differ = sorted("/".join(p) for p in set(expected) ^ set(got))
  differ += sorted("/".join(p) for p in set(expected) & set(got) if expected[p].shape != got[p].shape)
  if differ:
    raise ConversionError(f"the config's model ({config.model.to_dict()}, img_size={config.img_size}) does "
                          f"not match the converted parameters: {differ[:20]}")
  return config
