"""Demo: fine-tune the demo pretraining run (configs/demo.py) on scikit-learn's handwritten digits, on CPU.

Run (after `simmim-pretrain --config=demo --workdir=workdir/demo`):
  simmim-finetune --config=finetune/demo --workdir=workdir/demo_ft --config.pretrained=workdir/demo
`--config.pretrained=''` fine-tunes the same encoder from random initialization (the baseline). The digits
come from scikit-learn's wheel, rendered in memory (`data.source="digits"`): no data step, no files; the split
is the fixed 80/20 test split of `simmim_jax.data.digits` (`--config.data.eval_split=val`: its validation split).

The official optimizer recipe (AdamW, layer decay, warmup + cosine, label smoothing 0.1, drop path) at toy
size, with the augmentation that learns the digits in 300 steps (`benchmarks/pretrain_vs_scratch.py` chose it
on a validation split): horizontal flip only - no RandAugment, random erasing, mixup / cutmix, and no 4-px
padded crop shift (`data.crop_padding=0`) - and a 4x higher lr. With the official augmentation and padding
this run stays at chance (10-11% top-1 after 200 steps, measured). The encoder (name and sizes) comes from
the pretrained workdir; without one it is the demo ViT of configs/demo.py (32 px, patch 4, width 128, depth 4).
300 steps of 64 images: about 3 minutes on 2 cores. Measured from random init (`--config.pretrained=''`,
2026-11-28): eval top-1 73% / 84% / 87% at steps 100 / 200 / 300 (chance: 10%).
"""

from simmim_jax.configs import demo
from simmim_jax.configs import finetune_config


def get_config():
  config = finetune_config.get_config()
  config.model.update(demo.ENCODERS["vit"])
  config.model.drop_path_rate = 0.1
  config.img_size = 32

  config.data.source = "digits"        # the images and split of `python -m simmim_jax.data.digits`, in memory
  config.data.train_split = "train"
  config.data.eval_split = "test"
  config.data.crop_padding = 0          # official 4: a 4-px shift of a 3.5-px stroke defeats a 300-step run
  config.augment.randaugment = ""       # official rand-m9-mstd0.5-inc1, random erasing 0.25, mixup 0.8 /
  config.augment.reprob = 0.0           # cutmix 1.0: built for 100 ImageNet epochs, not 300 steps
  config.augment.mixup = 0.0
  config.augment.cutmix = 0.0

  config.global_batch_size = 64
  config.total_steps = 300
  config.warmup_steps = 30
  config.optimizer.base_lr = 2e-2       # per 512 images: peak 2.5e-3 at batch 64
  config.optimizer.warmup_lr = 1e-6
  config.optimizer.min_lr = 1e-6
  config.optimizer.layer_decay = 0.75

  config.log_every_steps = 20
  config.eval_every_steps = 100
  config.checkpoint_every_steps = 100
  return config
