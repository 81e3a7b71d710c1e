"""SimMIM Swin-B, 800 epochs on ImageNet-1K at 192 px, window 6.

Source: official `configs/swin_base__800ep/simmim_pretrain__swin_base__img192_window6__800ep.yaml`
(microsoft/SimMIM), value for value: Swin-B, window 6, drop path 0.0; mask patch 32, ratio 0.6; AdamW lr
1e-4 / warmup 5e-7 per 512 images (x4 at batch 2048), weight decay 0.05, clip 5.0; 800 epochs, 10 warmup,
multistep x0.1 at epoch 700; batch 2048.

Run:
  simmim-pretrain --config=pretrain/swin_base_800ep --workdir=gs://BUCKET/simmim/swin_b_800ep \\
      --config.data.data_dir=gs://BUCKET/tensorflow_datasets --config.dtype=bfloat16

Expected result: fine-tuned at 224 px (window 7), 84.0% top-1 (paper / official README).

Weight decay: the official run's groups (`optimizer.no_decay="official"`, optim.py): its "encoder."-prefixed
no-decay keywords never match, so every relative-position table is decayed.
"""

from simmim_jax.configs import default_config


def get_config():
  config = default_config.get_config()
  config.model = default_config.ml_collections.ConfigDict(
      {"name": "swin_base_patch4_window6", "drop_path_rate": 0.0})
  config.img_size = 192
  config.num_epochs = 800
  config.warmup_epochs = 10
  config.optimizer.base_lr = 1e-4
  config.optimizer.warmup_lr = 5e-7
  config.optimizer.min_lr = 5e-6  # config.py default; unused by the multistep schedule
  config.optimizer.schedule = "multistep"
  config.optimizer.multistep_epochs = (700,)
  config.optimizer.multistep_gamma = 0.1
  config.optimizer.no_decay = "official"  # the official groups, keyword bug included (optim.py)
  return config
