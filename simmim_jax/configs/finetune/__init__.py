"""The SimMIM fine-tuning family: `get_config("ENCODER,IMG_SIZE,EPOCHS")`, e.g. `get_config("swin_base,224,800ep")`.

Each official recipe has its own file here (`finetune/vit_base_800ep.py`, ...) that names its variant and
whose docstring gives the official yaml, the run command and the expected result; see
simmim_jax/configs/__init__.py for how `--config=finetune/NAME` finds it. `finetune/demo` is the CPU demo.

What every recipe of the family shares is what every official fine-tuning yaml shares (microsoft/SimMIM
`configs/*/simmim_finetune__*.yaml`, and microsoft/Swin-Transformer `configs/simmim/` for SwinV2), the
defaults of finetune_config.py: AdamW lr 1.25e-3 / warmup 2.5e-7 / min 2.5e-7 per 512 images (x4 at batch
2048), weight decay 0.05, clip 5.0, 100 epochs, 20 warmup, cosine; RandAugment rand-m9-mstd0.5-inc1, random
erasing 0.25, mixup 0.8 / cutmix 1.0 / switch 0.5, label smoothing 0.1; batch 2048. The variant picks
- ENCODER and IMG_SIZE: the model block of the yaml (`MODELS`: encoder name, window, drop path);
- ENCODER and EPOCHS (of the pretraining run): its TRAIN.LAYER_DECAY (`LAYER_DECAY`).
The encoder's name and sizes come from the pretrained workdir (`config.pretrained`); the fine-tuning fields
(window size, drop path, ...) come from here.

As the official run (16 GPUs x 128): its weight-decay groups (`optimizer.no_decay="official"`, optim.py; for
Swin the same as "intended", official ViT fine-tuning also decays the per-block relative-position tables),
Mixup / CutMix drawn per 128 images (`augment.mixup_groups=16`: timm mixes each GPU's batch), validation every
epoch (625 steps, as main_finetune.py), reporting the best and the final top-1.
"""

import ml_collections

from simmim_jax.configs import finetune_config

# MODEL.* of each yaml by encoder and fine-tuning image size. The ViT block updates finetune_config's (the
# ViT-B yaml's: per-block relative position bias, mean pooling); a Swin block replaces it.
MODELS = {
    ("vit_base", 224): dict(name="vit_base_patch16", drop_path_rate=0.1),
    ("swin_base", 192): dict(name="swin_base_patch4_window6", window_size=6, drop_path_rate=0.1),
    ("swin_base", 224): dict(name="swin_base_patch4_window7", window_size=7, drop_path_rate=0.1),
    ("swin_large", 224): dict(name="swin_large_patch4_window14", window_size=14, drop_path_rate=0.2),
    # PRETRAINED_WINDOW_SIZES: the continuous position bias on the pretraining's coordinate scale.
    ("swinv2_base", 224): dict(name="swinv2_base_patch4_window12", window_size=14, drop_path_rate=0.1,
                               pretrained_window_sizes=(12, 12, 12, 6)),
}

# TRAIN.LAYER_DECAY of each yaml, by encoder and the epochs of its pretraining.
LAYER_DECAY = {
    ("vit_base", "800ep"): 0.65,
    ("swin_base", "100ep"): 0.9,
    ("swin_base", "800ep"): 0.8,
    ("swin_large", "800ep"): 0.7,
    ("swinv2_base", "800ep"): 0.75,
}


def get_config(arg: str) -> ml_collections.ConfigDict:
  """The fine-tuning config of the variant `arg`: "ENCODER,IMG_SIZE,EPOCHS" with (ENCODER, IMG_SIZE) a key
  of MODELS and (ENCODER, EPOCHS) one of LAYER_DECAY (e.g. "vit_base,224,800ep")."""
  encoder, img_size, epochs = _parse(arg)
  config = finetune_config.get_config()
  if encoder.startswith("vit"):
    config.model.update(MODELS[encoder, img_size])
  else:
    config.model = ml_collections.ConfigDict(MODELS[encoder, img_size])
    config.head_init_scale = 1.0  # Swin head: plain trunc_normal(.02) (the 0.001 scale is the ViT's)
  config.optimizer.layer_decay = LAYER_DECAY[encoder, epochs]
  config.img_size = img_size
  config.optimizer.no_decay = "official"  # the official groups (optim.py)
  config.augment.mixup_groups = 16        # timm Mixup per GPU: 2048 / 128
  config.eval_every_steps = 625           # every epoch: 1,281,167 // 2048 steps (main_finetune.py)
  return config


def _parse(arg: str) -> tuple[str, int, str]:
  parts = [part.strip() for part in str(arg).split(",")]
  if len(parts) == 3 and parts[1].isdigit():
    encoder, img_size, epochs = parts[0], int(parts[1]), parts[2]
    if (encoder, img_size) in MODELS and (encoder, epochs) in LAYER_DECAY:
      return encoder, img_size, epochs
  raise ValueError(f"finetune config variant {arg!r}: expected 'ENCODER,IMG_SIZE,EPOCHS' (e.g. 'vit_base,224,800ep'); "
                   f"models: {', '.join(f'{e},{s}' for e, s in MODELS)}; pretraining epochs: "
                   f"{', '.join(f'{e},{n}' for e, n in LAYER_DECAY)}")
