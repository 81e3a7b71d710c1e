"""simmim_jax models -> Hugging Face transformers model folders (`config.json` + `model.safetensors`).

`export(model, variables, out_dir)` writes a folder that `transformers` (4.x) loads with `from_pretrained`:

  | simmim_jax model                                      | transformers class                   |
  |-------------------------------------------------------|--------------------------------------|
  | SimMIM, plain ViT (`vit_*_plain`: absolute positions, | ViTForMaskedImageModeling            |
  |   q/k/v bias, no layer scale, cls token + final norm) |                                      |
  | SimMIM, official BEiT-style ViT (`vit_*_patch16`)     | BeitModel (the encoder, mask token)  |
  | SimMIM, Swin / SwinV2                                 | Swin / Swinv2ForMaskedImageModeling  |
  | Classifier (simmim-finetune), same encoders           | ViT / Beit / Swin / Swinv2           |
  |                                                       |   ForImageClassification             |

The BEiT-style SimMIM exports its encoder only: HF's `BeitForMaskedImageModeling` is BEiT's own pretraining
model, a LayerNorm + Linear predicting visual-token logits (a DALL-E vocabulary), not SimMIM's 1x1 conv +
PixelShuffle predicting pixels, so no HF class holds the SimMIM head on a BEiT encoder.

Every config.json field comes from the module's fields (sizes, LayerNorm eps, window, encoder stride, layer
scale, relative position bias, mean pooling, q/k/v bias, mlp ratio, exact or tanh GELU), never from HF's
defaults (e.g. `ViTConfig.layer_norm_eps` is 1e-12, `BeitConfig`'s 1e-12, ours 1e-6 for the official ViT).
The state dict is `convert.to_torch`'s official one renamed by `convert.official_to_hf` (the inverse of the
HF reader's rules, checked by mapping back). What HF has no equivalent for is refused (`UnsupportedError`,
a ValueError) naming it: e.g. Swin without patch norm, Swin's absolute position table, a V1 Swin stage
smaller than the window, a ViT layout neither HF ViT nor HF BEiT holds, SimMIM's normalized targets.
Dropout / drop-path rates are written where HF has them (they change training only).

`from_hf(folder)` reads such a folder back (`convert.from_torch` with the encoder fields of config.json). It
trusts no size in config.json: every field it reads is checked for its type and bounds, and the sizes are
compared with the tensor shapes of model.safetensors' header (patch embedding, layer counts, position tables),
before anything is built (`check_hf_config`, `check_against_weights`); a refusal is one ValueError line.
"""

import json
import math
import os
import re
from typing import Any

import numpy as np

from simmim_jax.storage import convert
from simmim_jax.models import swin, swin_v2, vit

CONFIG_FILENAME = "config.json"
WEIGHTS_FILENAME = "model.safetensors"
# fmt (convert.FORMATS) -> (model_type, class prefix, state dict prefix of the encoder inside a task model)
_FAMILIES = {"hf_vit": ("vit", "ViT", "vit."), "hf_beit": ("beit", "Beit", "beit."),
             "hf_swin": ("swin", "Swin", "swin."), "hf_swinv2": ("swinv2", "Swinv2", "swinv2.")}
# Registry names whose layout defaults fit each format (sizes all come from config.json).
_BASE_ENCODERS = {"vit": "vit_base_patch16_plain", "beit": "vit_base_patch16", "swin": "swin_base_patch4_window7",
                  "swinv2": "swinv2_base_patch4_window8"}
_ACTIVATIONS = {False: "gelu", True: "gelu_pytorch_tanh"}  # approximate_gelu -> hidden_act


class UnsupportedError(ValueError):
  """The model has a layout or option no transformers class holds; the message names it."""


# ----------------------------------------------------------------------------------------------------
# Which HF class


def _encoder(model) -> Any:
  return model if convert.model_kind(model) == "encoder" else model.encoder


def _vit_lacks(encoder: vit.VisionTransformer) -> list[str]:
  """What HF ViT (ViTModel) has no equivalent for in this ViT layout."""
  lacks = []
  if not encoder.use_abs_pos_emb:
    lacks.append("a ViT without absolute position embedding (use_abs_pos_emb=False)")
  if encoder.use_rel_pos_bias or encoder.use_shared_rel_pos_bias:
    lacks.append("relative position bias")
  if encoder.layer_scale_init is not None:
    lacks.append("layer scale")
  if encoder.qkv_bias and encoder.qkv_bias_layout == "qv":
    lacks.append("q/v-only biases (ViTConfig.qkv_bias biases query, key and value)")
  if encoder.use_mean_pooling:
    lacks.append("mean pooling (HF ViT always has the final LayerNorm and classifies the cls token)")
  return lacks


def _beit_lacks(encoder: vit.VisionTransformer) -> list[str]:
  """What HF BEiT (BeitModel) has no equivalent for in this ViT layout."""
  lacks = []
  if not encoder.qkv_bias:
    lacks.append("attention without biases (BeitSelfAttention always has query and value biases)")
  elif encoder.qkv_bias_layout == "qkv":
    lacks.append("a key bias (qkv_bias_layout='qkv'; BeitSelfAttention's key has no bias)")
  if encoder.layer_scale_init is not None and encoder.layer_scale_init <= 0:
    lacks.append(f"layer scale with layer_scale_init={encoder.layer_scale_init} (BEiT creates lambda_1 / "
                 "lambda_2 only for layer_scale_init_value > 0)")
  return lacks


def _swin_lacks(encoder: swin.SwinTransformer) -> list[str]:
  family = "Swinv2" if isinstance(encoder, swin_v2.SwinTransformerV2) else "Swin"
  lacks = []
  if not encoder.patch_norm:
    lacks.append(f"patch_norm=False ({family}Embeddings always applies a LayerNorm to the patch embeddings)")
  if encoder.ape:
    lacks.append(f"ape=True ({family}Config.use_absolute_embeddings adds a [1, num_patches + 1, C] table with a "
                 "cls slot; Swin's absolute_pos_embed is [1, num_patches, C])")
  if family == "Swin":  # V2 clips the window at construction, as the official code; V1 only at run time
    grid = encoder.img_size // encoder.patch_size
    for stage in range(encoder.num_stages):
      resolution = grid // 2 ** stage
      if resolution < encoder.window_size:
        lacks.append(f"a stage smaller than the window (stage {stage} is {resolution}x{resolution}, window_size="
                     f"{encoder.window_size}: official Swin clips the window and its relative position table to "
                     f"{resolution}x{resolution}, HF SwinLayer keeps a table for config.window_size); use an "
                     f"img_size whose last stage is at least window_size")
        break
  return lacks


def hf_target(model) -> tuple[str, str]:
  """(transformers class name, convert format) for `model` (a SimMIM or a Classifier); UnsupportedError if none."""
  kind = convert.model_kind(model)
  encoder = _encoder(model)
  name = type(encoder).__name__
  if kind == "encoder":
    raise UnsupportedError(f"export a SimMIM (pretraining) model or a Classifier (fine-tuning), not a bare {name}")
  if kind == "simmim" and model.norm_target_window is not None:
    raise UnsupportedError(f"SimMIM with norm_target_window={model.norm_target_window}: the HF "
                           "*ForMaskedImageModeling loss regresses raw pixels, it has no locally normalized targets")
  task = "ForMaskedImageModeling" if kind == "simmim" else "ForImageClassification"
  if isinstance(encoder, vit.VisionTransformer):
    vit_lacks = _vit_lacks(encoder)
    if not vit_lacks:
      return "ViT" + task, "hf_vit"
    beit_lacks = _beit_lacks(encoder)
    if beit_lacks:
      raise UnsupportedError(f"no Hugging Face class holds this {name} layout: HF ViT lacks "
                             f"{'; '.join(vit_lacks)}; HF BEiT lacks {'; '.join(beit_lacks)}")
    return ("BeitModel" if kind == "simmim" else "Beit" + task), "hf_beit"
  lacks = _swin_lacks(encoder)
  fmt = "hf_swinv2" if isinstance(encoder, swin_v2.SwinTransformerV2) else "hf_swin"
  if lacks:
    raise UnsupportedError(f"Hugging Face {_FAMILIES[fmt][1]} has no equivalent for {'; '.join(lacks)}")
  return _FAMILIES[fmt][1] + task, fmt


# ----------------------------------------------------------------------------------------------------
# config.json and the state dict


def hf_config(model) -> dict[str, Any]:
  """The transformers config.json of `model` (every field from the module, see the module docstring)."""
  architecture, fmt = hf_target(model)
  kind = convert.model_kind(model)
  encoder = _encoder(model)
  config: dict[str, Any] = {"architectures": [architecture], "model_type": _FAMILIES[fmt][0],
                            "torch_dtype": "float32", "image_size": encoder.img_size,
                            "patch_size": encoder.patch_size, "num_channels": encoder.in_chans,
                            "hidden_dropout_prob": encoder.drop_rate,
                            "attention_probs_dropout_prob": encoder.attn_drop_rate,
                            "hidden_act": _ACTIVATIONS[bool(getattr(encoder, "approximate_gelu", False))]}
  if fmt in ("hf_vit", "hf_beit"):
    config.update(hidden_size=encoder.embed_dim, num_hidden_layers=encoder.depth,
                  num_attention_heads=encoder.num_heads, intermediate_size=int(encoder.embed_dim * encoder.mlp_ratio),
                  layer_norm_eps=encoder.layer_norm_eps)
    if fmt == "hf_vit":
      config.update(qkv_bias=encoder.qkv_bias, encoder_stride=model.encoder_stride if kind == "simmim" else
                    encoder.output_stride)
    else:
      config.update(use_mask_token=kind == "simmim", use_absolute_position_embeddings=encoder.use_abs_pos_emb,
                    use_relative_position_bias=encoder.use_rel_pos_bias,
                    use_shared_relative_position_bias=encoder.use_shared_rel_pos_bias,
                    layer_scale_init_value=0.0 if encoder.layer_scale_init is None else encoder.layer_scale_init,
                    use_mean_pooling=encoder.use_mean_pooling, drop_path_rate=encoder.drop_path_rate)
  else:
    config.update(embed_dim=encoder.embed_dim, depths=list(encoder.depths), num_heads=list(encoder.num_heads),
                  window_size=encoder.window_size, mlp_ratio=encoder.mlp_ratio, qkv_bias=encoder.qkv_bias,
                  use_absolute_embeddings=encoder.ape, layer_norm_eps=swin.LAYER_NORM_EPS,
                  drop_path_rate=encoder.drop_path_rate,
                  encoder_stride=model.encoder_stride if kind == "simmim" else encoder.output_stride)
    if fmt == "hf_swinv2":
      config["pretrained_window_sizes"] = list(encoder.pretrained_window_sizes or [0] * encoder.num_stages)
  if kind == "classifier":
    config.update(num_labels=model.num_classes, id2label={str(i): f"LABEL_{i}" for i in range(model.num_classes)},
                  label2id={f"LABEL_{i}": i for i in range(model.num_classes)})
  return config


def hf_state_dict(model, variables: dict) -> dict[str, np.ndarray]:
  """{HF key: float32 array} of `model`'s `variables`, in the names of `hf_target(model)`'s class."""
  architecture, fmt = hf_target(model)
  if architecture == "BeitModel":  # the SimMIM head has no HF class on a BEiT encoder: the encoder alone
    official = convert.to_torch(model.encoder, {"params": variables["params"]["encoder"]})
    return convert.official_to_hf(official, fmt, "")
  return convert.official_to_hf(convert.to_torch(model, variables), fmt, _FAMILIES[fmt][2])


def export(model, variables: dict, out_dir: str) -> str:
  """Writes `out_dir`/config.json and `out_dir`/model.safetensors; returns the transformers class name.

  `out_dir` must be new or empty (nothing is overwritten); every check runs before anything is written. The
  files are written into a temporary folder beside `out_dir`, renamed to `out_dir` once both are complete
  (`safe_files.new_folder`): a full disk or a kill never leaves a half-written model, and a rerun works.
  """
  from simmim_jax.storage import safe_files, torch_files  # pylint: disable=g-import-not-at-top

  config = hf_config(model)
  state_dict = hf_state_dict(model, variables)
  if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
    raise FileExistsError(f"--out={out_dir} exists and is not an empty folder; give a new folder for the "
                          f"{config['architectures'][0]} files")
  with safe_files.new_folder(out_dir) as folder:
    torch_files.write_safetensors(os.path.join(folder, WEIGHTS_FILENAME), state_dict, inside=folder)
    safe_files.write_atomic(os.path.join(folder, CONFIG_FILENAME),
                            safe_files.json_text(config, indent=2, sort_keys=True), inside=folder)
  return config["architectures"][0]


# ----------------------------------------------------------------------------------------------------
# Reading back


# Bounds of the config.json values `from_hf` reads, checked before anything is built. Generous for every
# released ViT / BEiT / Swin / SwinV2 (ViT-H/14: hidden 1280, 32 layers, 16 heads, MLP 5120, up to 518 px;
# ViT-22B: 6144 / 48 / 48 / 24576; BEiT-L: 512 px; SwinV2-G: embed 512, depths (2, 2, 42, 4), heads
# (16, 32, 64, 128), window 40 at 640 px); tight enough that building the module costs at most a few hundred
# MB whatever the file says: the encoders build [tokens + 1]**2 relative position indices (ViT / BEiT) and
# [windows, window**2, window**2] shift masks (Swin) in numpy, and `check_against_weights` ties the sizes that
# make parameters (widths, depths, heads, tables) to the weights file.
_INT_BOUNDS = {"image_size": (1, 8192), "patch_size": (1, 64), "num_channels": (1, 64), "hidden_size": (1, 16384),
               "num_hidden_layers": (1, 256), "num_attention_heads": (1, 1024), "intermediate_size": (1, 131072),
               "embed_dim": (1, 4096), "window_size": (1, 64)}
_MAX_VIT_GRID = 64  # patches per side (4096 tokens: 1024 px at patch 16; DINOv2 518 / 14 = 37): a 4097**2 index
_MAX_SWIN_GRID_X_WINDOW = 8192  # patches per side x window (SwinV2-G: 160 x 40 = 6400): a 256 MB first shift mask
_MAX_STAGES, _MAX_STAGE_DEPTH = 8, 256
# The numpy tables and masks a module builds may take this much, or up to the weights file's size (a real
# SwinV2-G at 640 px builds ~0.7 GB of shift masks next to its 12 GB file; a 50 KB file cannot ask for that).
_TABLE_ALLOWANCE = 256 << 20
_MAX_CONFIG_BYTES = 16 << 20  # config.json (an ImageNet-22k id2label makes ~1 MB)


class _Config:
  """Typed, bounded access to a parsed config.json; every refusal is a ValueError naming the field."""

  def __init__(self, config: Any, path: str):
    if not isinstance(config, dict):
      raise ValueError(f"{path}: expected a JSON object, found a JSON {type(config).__name__}")
    self.config, self.path = config, path

  def _get(self, key: str, default: Any, expected: str) -> Any:
    if key not in self.config:
      if default is _REQUIRED:
        raise ValueError(f"{self.path}: no {key!r}; a transformers {self.config.get('model_type')} config.json "
                         f"has it ({expected})")
      return default
    return self.config[key]

  def _refuse(self, key: str, value: Any, expected: str) -> ValueError:
    return ValueError(f"{self.path}: {key}={_short(value)} is not {expected}")

  def int(self, key: str, default: Any = None) -> int:
    low, high = _INT_BOUNDS[key]
    expected = f"an integer in [{low}, {high}]"
    value = self._get(key, _REQUIRED if default is None else default, expected)
    if type(value) is not int or not low <= value <= high:
      raise self._refuse(key, value, expected)
    return value

  def ints(self, key: str, low: int, high: int, default: Any = None) -> tuple[int, ...]:
    expected = f"a list of 1 to {_MAX_STAGES} integers in [{low}, {high}]"
    value = self._get(key, _REQUIRED if default is None else default, expected)
    if value is None:
      return ()
    if (not isinstance(value, list) or not 1 <= len(value) <= _MAX_STAGES
        or not all(type(v) is int and low <= v <= high for v in value)):
      raise self._refuse(key, value, expected)
    return tuple(value)

  def float(self, key: str, low: float, high: float, default: Any = None, *, open_low: bool = False) -> float:
    expected = f"a number in {'(' if open_low else '['}{low}, {high}]"
    value = self._get(key, _REQUIRED if default is None else default, expected)
    if (type(value) not in (int, float) or not math.isfinite(value) or not low <= value <= high
        or (open_low and value == low)):
      raise self._refuse(key, value, expected)
    return float(value)

  def bool(self, key: str, default: Any = None) -> bool:
    value = self._get(key, _REQUIRED if default is None else default, "true or false")
    if type(value) is not bool:
      raise self._refuse(key, value, "true or false")
    return value

  def choice(self, key: str, choices, default: Any = None) -> str:
    expected = f"one of {sorted(choices)}"
    value = self._get(key, _REQUIRED if default is None else default, expected)
    if not isinstance(value, str) or value not in choices:
      raise self._refuse(key, value, expected)
    return value


_REQUIRED = object()


def _short(value: Any) -> str:
  text = " ".join(repr(value).split())
  return text if len(text) <= 80 else text[:77] + "..."


def check_hf_config(config: Any, path: str = "config.json") -> dict[str, Any]:
  """The simmim_jax encoder fields of a transformers ViT / BEiT / Swin / SwinV2 config.json (parsed), after
  checking the type and bounds of every field read (`_INT_BOUNDS`, ...). Raises ValueError (one line naming
  the field, its value and what it must be); allocates nothing."""
  c = _Config(config, path)
  model_type = c.choice("model_type", _BASE_ENCODERS)
  act = c.choice("hidden_act", set(_ACTIVATIONS.values()) if model_type in ("vit", "beit") else {"gelu"}, "gelu")
  image_size, patch_size = c.int("image_size"), c.int("patch_size")
  if patch_size > image_size:
    raise ValueError(f"{path}: patch_size={patch_size} is larger than image_size={image_size}")
  fields = dict(img_size=image_size, patch_size=patch_size, in_chans=c.int("num_channels"),
                drop_rate=c.float("hidden_dropout_prob", 0.0, 1.0, 0.0),
                attn_drop_rate=c.float("attention_probs_dropout_prob", 0.0, 1.0, 0.0))
  grid = image_size // patch_size
  if model_type in ("vit", "beit"):
    if grid > _MAX_VIT_GRID:
      raise ValueError(f"{path}: image_size={image_size} / patch_size={patch_size} is a {grid}x{grid} patch grid, "
                       f"more than the {_MAX_VIT_GRID}x{_MAX_VIT_GRID} a ViT config.json may describe here")
    hidden, heads = c.int("hidden_size"), c.int("num_attention_heads")
    if hidden % heads:
      raise ValueError(f"{path}: hidden_size={hidden} is not a multiple of num_attention_heads={heads}")
    fields.update(approximate_gelu=act != "gelu", embed_dim=hidden, depth=c.int("num_hidden_layers"),
                  num_heads=heads, mlp_ratio=c.int("intermediate_size") / hidden,
                  layer_norm_eps=c.float("layer_norm_eps", 0.0, 1.0, open_low=True))
    if model_type == "vit":
      layout = {k: v for k, v in vit.PLAIN.items() if k not in ("layer_norm_eps", "init_style")}
      fields.update(layout, qkv_bias=c.bool("qkv_bias", True), use_mean_pooling=False)
    else:
      scale = c.float("layer_scale_init_value", 0.0, 1e3, 0.0)
      fields.update(qkv_bias=True, qkv_bias_layout="qv", use_abs_pos_emb=c.bool("use_absolute_position_embeddings"),
                    use_rel_pos_bias=c.bool("use_relative_position_bias"),
                    use_shared_rel_pos_bias=c.bool("use_shared_relative_position_bias"),
                    layer_scale_init=scale if scale > 0 else None, use_mean_pooling=c.bool("use_mean_pooling"),
                    drop_path_rate=c.float("drop_path_rate", 0.0, 1.0, 0.0))
    return fields
  embed_dim, window = c.int("embed_dim"), c.int("window_size")
  depths = c.ints("depths", 1, _MAX_STAGE_DEPTH)
  heads = c.ints("num_heads", 1, _INT_BOUNDS["num_attention_heads"][1])
  if len(heads) != len(depths):
    raise ValueError(f"{path}: num_heads={list(heads)} and depths={list(depths)} differ in length")
  if sum(depths) > _INT_BOUNDS["num_hidden_layers"][1]:
    raise ValueError(f"{path}: depths={list(depths)} add up to more than {_INT_BOUNDS['num_hidden_layers'][1]} blocks")
  for stage, stage_heads in enumerate(heads):
    if (embed_dim * 2 ** stage) % stage_heads:
      raise ValueError(f"{path}: stage {stage} is {embed_dim * 2 ** stage} wide (embed_dim={embed_dim} x 2**{stage}), "
                       f"not a multiple of its num_heads {stage_heads}")
  if grid * window > _MAX_SWIN_GRID_X_WINDOW:
    raise ValueError(f"{path}: image_size={image_size} / patch_size={patch_size} = {grid} patches per side with "
                     f"window_size={window}: {grid} x {window} is more than the {_MAX_SWIN_GRID_X_WINDOW} a Swin "
                     "config.json may describe here")
  fields.update(embed_dim=embed_dim, depths=depths, num_heads=heads, window_size=window,
                mlp_ratio=c.float("mlp_ratio", 0.0, 64.0, open_low=True), qkv_bias=c.bool("qkv_bias"),
                ape=c.bool("use_absolute_embeddings", False), drop_path_rate=c.float("drop_path_rate", 0.0, 1.0, 0.0))
  if model_type == "swinv2":
    sizes = c.ints("pretrained_window_sizes", 0, _INT_BOUNDS["window_size"][1], [0] * len(depths))
    if sizes and len(sizes) != len(depths):
      raise ValueError(f"{path}: pretrained_window_sizes={list(sizes)} and depths={list(depths)} differ in length")
    fields["pretrained_window_sizes"] = sizes if any(sizes) else None
  return fields


def _expect_shape(shapes: dict[str, tuple], suffix: str, expected: tuple, what: str, path: str,
                  required: bool = False) -> None:
  """Every tensor whose key ends with `suffix` must have `expected` shape (and one must exist if `required`)."""
  found = [(k, v) for k, v in shapes.items() if k == suffix or k.endswith("." + suffix)]
  if required and not found:
    raise ValueError(f"{path}: no tensor named *{suffix}: not the weights of a transformers ViT / BEiT / Swin")
  for key, shape in found:
    if tuple(shape) != tuple(expected):
      raise ValueError(f"{path}: {key} is {list(shape)}, but config.json describes {list(expected)} ({what})")


def table_bytes(model_type: str, fields: dict[str, Any]) -> int:
  """About the bytes of the numpy tables an encoder of these fields builds (measured on this repository's
  modules: ~30 bytes per entry of the [tokens + 1]**2 relative position index of a ViT / BEiT with relative
  position bias, ~13 per entry of each Swin stage's [windows, window**2, window**2] shift mask)."""
  grid = fields["img_size"] // fields["patch_size"]
  if model_type in ("vit", "beit"):
    relative = fields.get("use_rel_pos_bias") or fields.get("use_shared_rel_pos_bias")
    return 32 * (grid * grid + 1) ** 2 if relative else 0
  return sum(16 * (max(grid // 2 ** stage, 1) * min(fields["window_size"], max(grid // 2 ** stage, 1))) ** 2
             for stage in range(len(fields["depths"])))


def check_against_weights(config: dict[str, Any], fields: dict[str, Any], shapes: dict[str, tuple],
                          path: str, file_size: int) -> None:
  """Refuses (ValueError) a config.json whose sizes the weights' shapes (`shapes`, from the safetensors header)
  contradict: the patch embedding (width, channels, patch size), the number of layers per stage, the MLP width,
  and the position tables (the patch grid, the window); or whose grid and window would build more tables
  (`table_bytes`) than `_TABLE_ALLOWANCE` or the weights file's size. Runs before any module is built."""
  model_type, patch = config["model_type"], fields["patch_size"]
  grid = fields["img_size"] // patch
  tables = table_bytes(model_type, fields)
  if tables > max(_TABLE_ALLOWANCE, file_size):
    window = f", window_size={fields['window_size']}" if "window_size" in fields else ""
    raise ValueError(f"{path}: config.json's image_size={fields['img_size']}, patch_size={patch}{window} would "
                     f"build ~{tables / 1e6:,.0f} MB of position tables for a weights file of {file_size / 1e6:,.1f} "
                     "MB: it does not describe these weights")
  _expect_shape(shapes, "embeddings.patch_embeddings.projection.weight",
                (fields["embed_dim"], fields["in_chans"], patch, patch),
                "embed width / hidden_size, num_channels, patch_size", path, required=True)
  if model_type in ("vit", "beit"):
    layers = {int(m.group(1)) for k in shapes if (m := re.search(r"(?:^|\.)encoder\.layer\.(\d+)\.", k))}
    if layers != set(range(fields["depth"])):
      raise ValueError(f"{path}: the weights hold {len(layers)} layers, config.json says num_hidden_layers="
                       f"{fields['depth']}")
    _expect_shape(shapes, "encoder.layer.0.intermediate.dense.weight",
                  (config["intermediate_size"], fields["embed_dim"]), "intermediate_size, hidden_size", path)
    _expect_shape(shapes, "embeddings.position_embeddings", (1, grid * grid + 1, fields["embed_dim"]),
                  f"a {grid}x{grid} patch grid + cls: image_size / patch_size", path)
    _expect_shape(shapes, "relative_position_bias.relative_position_bias_table",
                  ((2 * grid - 1) ** 2 + 3, fields["num_heads"]),
                  f"a {grid}x{grid} patch grid: image_size / patch_size, num_attention_heads", path)
    return
  blocks = {}
  for key in shapes:
    if m := re.search(r"(?:^|\.)encoder\.layers\.(\d+)\.blocks\.(\d+)\.", key):
      blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
  depths = tuple(len(blocks.get(stage, ())) for stage in range(max(len(fields["depths"]), len(blocks))))
  if depths != fields["depths"] or any(blocks[s] != set(range(n)) for s, n in enumerate(depths)):
    raise ValueError(f"{path}: the weights hold {list(depths)} blocks per stage, config.json says depths="
                     f"{list(fields['depths'])}")
  if model_type == "swin":  # V2's continuous position bias (an MLP) does not depend on the window
    for stage, heads in enumerate(fields["num_heads"]):
      _expect_shape({k: v for k, v in shapes.items() if f"encoder.layers.{stage}.blocks." in k},
                    "attention.self.relative_position_bias_table", ((2 * fields["window_size"] - 1) ** 2, heads),
                    f"window_size, num_heads[{stage}]", path)


def encoder_fields(config: dict[str, Any]) -> dict[str, Any]:
  """The simmim_jax encoder fields a transformers ViT / BEiT / Swin / SwinV2 config.json describes (every
  field type- and bound-checked: `check_hf_config`; a ValueError names a bad one)."""
  return check_hf_config(config)


def from_hf(folder: str, encoder: str | None = None):
  """(model, variables) of a transformers folder (config.json + model.safetensors) of a ViT / BEiT / Swin /
  SwinV2 model, as `convert.from_torch` (SimMIM with a decoder, Classifier with a classifier, else the
  encoder); `encoder` is the registry name to start from (default: one of the config's family)."""
  from simmim_jax.data import input_files
  from simmim_jax.storage import torch_files  # pylint: disable=g-import-not-at-top

  config_path, weights_path = os.path.join(folder, CONFIG_FILENAME), os.path.join(folder, WEIGHTS_FILENAME)
  try:
    config = json.loads(input_files.read_regular(config_path, _MAX_CONFIG_BYTES, "config.json"))
  except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
    raise ValueError(f"{config_path}: not JSON ({' '.join(str(e).split())})") from None
  fields = check_hf_config(config, config_path)
  shapes = torch_files.read_safetensors_shapes(weights_path)
  check_against_weights(config, fields, shapes, weights_path, os.path.getsize(weights_path))
  state_dict = torch_files.load_state_dict(weights_path)
  return convert.from_torch(state_dict, encoder=encoder or _BASE_ENCODERS[config["model_type"]], **fields)


__all__ = ["UnsupportedError", "check_against_weights", "check_hf_config", "encoder_fields", "export", "from_hf",
           "hf_config", "hf_state_dict", "hf_target", "table_bytes"]
