"""SimMIM ViT-B/16 fine-tuning on ImageNet-1K at 224 px (from the 800-epoch pretraining).

Source: official `configs/vit_base__800ep/simmim_finetune__vit_base__img224__800ep.yaml`, value for value:
per-block relative position bias (USE_RPB), no shared RPB, mean pooling + fc_norm, drop path 0.1, layer
decay 0.65; AdamW lr 1.25e-3 / warmup 2.5e-7 / min 2.5e-7 per 512 images (x4 at batch 2048), weight decay
0.05, clip 5.0, 100 epochs, 20 warmup, cosine; RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25,
mixup 0.8 / cutmix 1.0 / switch 0.5, label smoothing 0.1; batch 2048.

Run:
  simmim-finetune --config=finetune/vit_base_800ep --workdir=gs://BUCKET/ft_vit_b \
      --config.pretrained=gs://BUCKET/simmim_vit_b --config.data.data_dir=gs://BUCKET/tensorflow_datasets

Expected result: 83.8% top-1 (paper, README).

As the official run (16 GPUs x 128): its weight-decay groups (`optimizer.no_decay="official"`, optim.py;
official ViT fine-tuning also decays the per-block relative-position tables), Mixup / CutMix drawn per 128
images (`augment.mixup_groups=16`: timm mixes each GPU's batch), validation every epoch (625 steps, as
main_finetune.py), reporting the best and the final top-1.
"""

from simmim_jax.configs import finetune_config


def get_config():
  config = finetune_config.get_config()  # the defaults are this yaml
  config.model.name = "vit_base_patch16"
  config.model.drop_path_rate = 0.1
  config.optimizer.layer_decay = 0.65
  config.img_size = 224
  config.optimizer.no_decay = "official"  # the official groups (optim.py)
  config.augment.mixup_groups = 16        # timm Mixup per GPU: 2048 / 128
  config.eval_every_steps = 625           # every epoch: 1,281,167 // 2048 steps (main_finetune.py)
  return config
