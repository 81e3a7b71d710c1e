"""SimMIM SwinV2-B fine-tuning on ImageNet-1K at 224 px, window 14 (from the 800-epoch pretraining).

Source: official `simmim_finetune__swinv2_base__img224_window14__800ep.yaml` (microsoft/Swin-Transformer), value for
value at the SimMIM merge (see Schedule below): SwinV2-B, drop path 0.1, layer decay 0.75; AdamW lr
1.25e-3 / warmup 2.5e-7 / min 2.5e-7 per 512 images (x4 at batch 2048), weight decay 0.05, clip 5.0, 100
epochs, 20 warmup, cosine; RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25, mixup 0.8 / cutmix 1.0 /
switch 0.5, label smoothing 0.1; batch 2048. PRETRAINED_WINDOW_SIZES [12, 12, 12, 6]: the continuous position bias is evaluated on the pretraining's coordinate scale.

Run (the encoder's name and sizes come from the pretrained workdir; window_size from here):
  simmim-finetune --config=finetune/swinv2_base_224_800ep --workdir=gs://BUCKET/finetune \
      --config.pretrained=gs://BUCKET/simmim_pretrain_workdir --config.data.data_dir=gs://BUCKET/tensorflow_datasets

Schedule: the code at the SimMIM merge (microsoft/Swin-Transformer 5b841aa, 2022-09-25), where timm's cosine spans
the warmup (`optimizer.warmup_prefix=False`): the lr at the end of warmup is 4.52e-3, not the peak 5e-3. Since
d19503d (2022-10-05) that repository's config.py sets TRAIN.LR_SCHEDULER.WARMUP_PREFIX = True, so the cosine runs
over the 80 post-warmup epochs only (this schedule's mean lr is 0.81x HEAD's); for HEAD's behaviour add
  --config.optimizer.warmup_prefix=True

Expected result: not stated for this exact config in the reference notes; check the official MODELHUB.md.

As the official run (16 GPUs x 128): its weight-decay groups (`optimizer.no_decay="official"`, optim.py; for
Swin the same as "intended"), Mixup / CutMix drawn per 128 images (`augment.mixup_groups=16`: timm mixes each
GPU's batch), validation every epoch (625 steps, as main_finetune.py), reporting the best and the final top-1.
"""

import ml_collections

from simmim_jax.configs import finetune_config


def get_config():
  config = finetune_config.get_config()
  config.model = ml_collections.ConfigDict(dict(
      name="swinv2_base_patch4_window12", window_size=14, drop_path_rate=0.1, pretrained_window_sizes=(12, 12, 12, 6)))
  config.optimizer.layer_decay = 0.75
  config.head_init_scale = 1.0  # Swin head: plain trunc_normal(.02) (the 0.001 scale is the ViT's)
  config.img_size = 224
  config.optimizer.no_decay = "official"  # the official groups (optim.py)
  config.optimizer.warmup_prefix = False  # 5b841aa (SimMIM merge); True = HEAD (d19503d), see the docstring
  config.augment.mixup_groups = 16        # timm Mixup per GPU: 2048 / 128
  config.eval_every_steps = 625           # every epoch: 1,281,167 // 2048 steps (main_finetune.py)
  return config
