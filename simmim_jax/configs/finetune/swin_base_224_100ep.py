"""SimMIM Swin-B fine-tuning on ImageNet-1K at 224 px, window 7 (from the 100-epoch pretraining).

Source: official `simmim_finetune__swin_base__img224_window7__100ep.yaml`, value for value: Swin-B, drop path 0.1, layer decay 0.9; AdamW lr
1.25e-3 / warmup 2.5e-7 / min 2.5e-7 per 512 images (x4 at batch 2048), weight decay 0.05, clip 5.0, 100
epochs, 20 warmup, cosine; RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25, mixup 0.8 / cutmix 1.0 /
switch 0.5, label smoothing 0.1; batch 2048. Relative position tables of the 192 px / window 6 pretraining are resized to window 7 (geo + bicubic).

Run (the encoder's name and sizes come from the pretrained workdir; window_size from here):
  simmim-finetune --config=finetune/swin_base_224_100ep --workdir=gs://BUCKET/finetune \
      --config.pretrained=gs://BUCKET/simmim_pretrain_workdir --config.data.data_dir=gs://BUCKET/tensorflow_datasets

Expected result: 83.5% top-1 (official README).

As the official run (16 GPUs x 128): its weight-decay groups (`optimizer.no_decay="official"`, optim.py; for
Swin the same as "intended"), Mixup / CutMix drawn per 128 images (`augment.mixup_groups=16`: timm mixes each
GPU's batch), validation every epoch (625 steps, as main_finetune.py), reporting the best and the final top-1.
"""

import ml_collections

from simmim_jax.configs import finetune_config


def get_config():
  config = finetune_config.get_config()
  config.model = ml_collections.ConfigDict(dict(
      name="swin_base_patch4_window7", window_size=7, drop_path_rate=0.1))
  config.optimizer.layer_decay = 0.9
  config.head_init_scale = 1.0  # Swin head: plain trunc_normal(.02) (the 0.001 scale is the ViT's)
  config.img_size = 224
  config.optimizer.no_decay = "official"  # the official groups (optim.py)
  config.augment.mixup_groups = 16        # timm Mixup per GPU: 2048 / 128
  config.eval_every_steps = 625           # every epoch: 1,281,167 // 2048 steps (main_finetune.py)
  return config
