"""Demo: fine-tune the demo pretraining run (configs/demo.py) on scikit-learn's handwritten digits, on CPU.

Run (after `simmim-pretrain --config=configs/demo.py --workdir=workdir/demo`):
  python -m simmim_jax.data.digits workdir/digits       # writes the labelled image folder (offline)
  simmim-finetune --config=configs/finetune/demo.py --workdir=workdir/demo_finetune \
      --config.pretrained=workdir/demo
`--config.pretrained=''` fine-tunes the same encoder from random initialization (the baseline).

The official recipe (AdamW, layer decay, warmup + cosine, RandAugment, random erasing, mixup / cutmix,
label smoothing) at toy size: the encoder (name and sizes) comes from the pretrained workdir; without one it
is the demo ViT below (32 px, patch 4, width 128, depth 4). 300 steps of 64 images: a few minutes on 2 cores.
Expected: eval top-1 well above chance (10%); see BENCHMARKS.md for measured numbers and their spread.
"""

from simmim_jax import finetune_config


def get_config():
  config = finetune_config.get_config()
  config.model.name = "vit_base_patch16"
  config.model.patch_size = 4
  config.model.embed_dim = 128
  config.model.depth = 4
  config.model.num_heads = 4
  config.model.drop_path_rate = 0.1
  config.img_size = 32

  config.data.source = "folder"
  config.data.data_dir = "workdir/digits"
  config.data.train_split = "train"
  config.data.eval_split = "test"

  config.global_batch_size = 64
  config.total_steps = 300
  config.warmup_steps = 30
  config.optimizer.base_lr = 5e-3       # per 512 images: peak 6.25e-4 at batch 64
  config.optimizer.warmup_lr = 1e-6
  config.optimizer.min_lr = 1e-6
  config.optimizer.layer_decay = 0.75

  config.log_every_steps = 20
  config.eval_every_steps = 100
  config.checkpoint_every_steps = 100
  return config
