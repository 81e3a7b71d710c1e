"""The SimMIM pretraining family: `get_config("ENCODER,EPOCHS")`, e.g. `get_config("swin_base,800ep")`.

Each official recipe has its own file here (`pretrain/vit_base_800ep.py`, ...) that names its variant and
whose docstring gives the official yaml, the run command and the expected result; see
simmim_jax/configs/__init__.py for how `--config=pretrain/NAME` finds it.

What every recipe of the family shares is what every official pretraining yaml shares (microsoft/SimMIM
`configs/*/simmim_pretrain__*.yaml`, and microsoft/Swin-Transformer `configs/simmim/` for SwinV2): mask
patch 32 at ratio 0.6, AdamW with weight decay 0.05 and gradient clipping 5.0, 10 warmup epochs, batch
2048 (16 GPUs x 128), the learning rates per 512 images. The variant picks
- ENCODER: the model block and image size of its yaml (`ENCODERS`);
- EPOCHS: the schedule of its yaml (`SCHEDULES`): 100 epochs with a cosine decay, or 800 with the lr
  divided by 10 at epoch 700.

Weight decay: the official run's groups (`optimizer.no_decay="official"`, optim.py): its "encoder."-prefixed
no-decay keywords never match, so the tables each recipe names are decayed too.
"""

import ml_collections

from simmim_jax.configs import default_config

# The model block (`config.model`: encoder name + field overrides) and the other per-encoder settings of
# each yaml. SwinV2 (microsoft/Swin-Transformer): MODEL.SIMMIM.NORM_TARGET with a 47x47 window.
ENCODERS = {
    "vit_base": dict(model=dict(name="vit_base_patch16", drop_path_rate=0.1), img_size=224),
    "swin_base": dict(model=dict(name="swin_base_patch4_window6", drop_path_rate=0.0), img_size=192),
    "swin_large": dict(model=dict(name="swin_large_patch4_window12", drop_path_rate=0.0, remat=False),
                       img_size=192),
    "swinv2_base": dict(model=dict(name="swinv2_base_patch4_window12", drop_path_rate=0.1), img_size=192,
                        norm_target_window=47),
    # No official yaml: SwinV2-B's with the larger models swapped in (their recipe files say why), sharded.
    "swinv2_huge": dict(model=dict(name="swinv2_huge_patch4_window12", drop_path_rate=0.1, remat=True),
                        img_size=192, dtype="bfloat16", norm_target_window=47, mesh=dict(fsdp=8)),
    "swinv2_giant": dict(model=dict(name="swinv2_giant_patch4_window12", drop_path_rate=0.1, remat=True,
                                    scan_blocks=True),
                         img_size=192, dtype="bfloat16", norm_target_window=47, mesh=dict(fsdp=64)),
}

# TRAIN.EPOCHS and the TRAIN.* learning rates (per 512 images) of the 100- and 800-epoch yamls. The
# 800-epoch min_lr is config.py's default, unused by the multistep schedule.
SCHEDULES = {
    "100ep": dict(num_epochs=100, optimizer=dict(base_lr=2e-4, warmup_lr=1e-6, min_lr=1e-5, schedule="cosine")),
    "800ep": dict(num_epochs=800, optimizer=dict(base_lr=1e-4, warmup_lr=5e-7, min_lr=5e-6,
                                                 schedule="multistep", multistep_epochs=(700,),
                                                 multistep_gamma=0.1)),
}


def get_config(arg: str) -> ml_collections.ConfigDict:
  """The pretraining config of the variant `arg`: "ENCODER,EPOCHS", ENCODER a key of ENCODERS, EPOCHS of
  SCHEDULES (e.g. "vit_base,800ep")."""
  encoder, epochs = _parse(arg)
  config = default_config.get_config()
  overrides = dict(ENCODERS[encoder])
  config.model = ml_collections.ConfigDict(overrides.pop("model"))
  config.update(overrides)  # nested blocks (mesh) are updated key by key
  config.warmup_epochs = 10     # TRAIN.WARMUP_EPOCHS
  config.update(SCHEDULES[epochs])
  config.optimizer.no_decay = "official"  # the official groups, keyword bug included (optim.py)
  return config


def _parse(arg: str) -> tuple[str, str]:
  parts = [part.strip() for part in str(arg).split(",")]
  if len(parts) != 2 or parts[0] not in ENCODERS or parts[1] not in SCHEDULES:
    raise ValueError(f"pretrain config variant {arg!r}: expected 'ENCODER,EPOCHS', ENCODER one of "
                     f"{', '.join(ENCODERS)} and EPOCHS one of {', '.join(SCHEDULES)} (e.g. 'vit_base,800ep')")
  return parts[0], parts[1]
