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

`from_hf(folder)` reads such a folder back (`convert.from_torch` with the encoder fields of config.json).
"""

import json
import os
from typing import Any

import numpy as np

from simmim_jax import convert
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
  from simmim_jax import safe_files, torch_files  # pylint: disable=g-import-not-at-top

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


def encoder_fields(config: dict[str, Any]) -> dict[str, Any]:
  """The simmim_jax encoder fields a transformers ViT / BEiT / Swin / SwinV2 config.json describes."""
  model_type, act = config.get("model_type"), config.get("hidden_act", "gelu")
  if model_type not in _BASE_ENCODERS:
    raise ValueError(f"config.json model_type={model_type!r}: expected one of {sorted(_BASE_ENCODERS)}")
  if act not in _ACTIVATIONS.values():
    raise ValueError(f"config.json hidden_act={act!r}: simmim_jax encoders use gelu or gelu_pytorch_tanh")
  fields = dict(img_size=config["image_size"], patch_size=config["patch_size"], in_chans=config["num_channels"],
                drop_rate=config.get("hidden_dropout_prob", 0.0),
                attn_drop_rate=config.get("attention_probs_dropout_prob", 0.0))
  if model_type in ("vit", "beit"):
    fields.update(approximate_gelu=act != "gelu", embed_dim=config["hidden_size"], depth=config["num_hidden_layers"],
                  num_heads=config["num_attention_heads"],
                  mlp_ratio=config["intermediate_size"] / config["hidden_size"],
                  layer_norm_eps=config["layer_norm_eps"])
    if model_type == "vit":
      layout = {k: v for k, v in vit.PLAIN.items() if k not in ("layer_norm_eps", "init_style")}
      fields.update(layout, qkv_bias=config.get("qkv_bias", True), use_mean_pooling=False)
    else:
      scale = config.get("layer_scale_init_value", 0.0)
      fields.update(qkv_bias=True, qkv_bias_layout="qv", use_abs_pos_emb=config["use_absolute_position_embeddings"],
                    use_rel_pos_bias=config["use_relative_position_bias"],
                    use_shared_rel_pos_bias=config["use_shared_relative_position_bias"],
                    layer_scale_init=scale if scale > 0 else None, use_mean_pooling=config["use_mean_pooling"],
                    drop_path_rate=config.get("drop_path_rate", 0.0))
    return fields
  if act != "gelu":
    raise ValueError(f"config.json hidden_act={act!r}: simmim_jax Swin encoders use the exact gelu")
  fields.update(embed_dim=config["embed_dim"], depths=tuple(config["depths"]), num_heads=tuple(config["num_heads"]),
                window_size=config["window_size"], mlp_ratio=config["mlp_ratio"], qkv_bias=config["qkv_bias"],
                ape=config.get("use_absolute_embeddings", False), drop_path_rate=config.get("drop_path_rate", 0.0))
  if model_type == "swinv2":
    sizes = tuple(config.get("pretrained_window_sizes") or ())
    fields["pretrained_window_sizes"] = sizes if any(sizes) else None
  return fields


def from_hf(folder: str, encoder: str | None = None):
  """(model, variables) of a transformers folder (config.json + model.safetensors) of a ViT / BEiT / Swin /
  SwinV2 model, as `convert.from_torch` (SimMIM with a decoder, Classifier with a classifier, else the
  encoder); `encoder` is the registry name to start from (default: one of the config's family)."""
  from simmim_jax import torch_files  # pylint: disable=g-import-not-at-top

  with open(os.path.join(folder, CONFIG_FILENAME)) as f:
    config = json.load(f)
  fields = encoder_fields(config)
  state_dict = torch_files.load_state_dict(os.path.join(folder, WEIGHTS_FILENAME))
  return convert.from_torch(state_dict, encoder=encoder or _BASE_ENCODERS[config["model_type"]], **fields)


# ----------------------------------------------------------------------------------------------------
# Workdirs


def load_workdir(workdir: str):
  """(model, variables) of a `simmim-pretrain` / `simmim-convert` workdir (SimMIM) or a `simmim-finetune`
  workdir (Classifier): the latest complete checkpoint. Reads only."""
  from simmim_jax import downstream  # pylint: disable=g-import-not-at-top
  from simmim_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top

  config = workdir_lib.read_config(workdir)
  if "probe_blocks" in config:
    raise UnsupportedError(f"{workdir} is a simmim-linear-probe workdir (probe heads on frozen features); export "
                           "its pretraining or fine-tuning workdir instead")
  if "num_classes" in config:
    model, variables, _ = downstream.load_classifier(workdir)
  else:
    model, variables, _ = workdir_lib.load_model(workdir)
  return model, variables


__all__ = ["UnsupportedError", "encoder_fields", "export", "from_hf", "hf_config", "hf_state_dict", "hf_target",
           "load_workdir"]
