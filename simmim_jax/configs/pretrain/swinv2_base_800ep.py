"""SimMIM SwinV2-B, 800 epochs on ImageNet-1K at 192 px, window 12, with local target normalization.

Source: `configs/simmim/simmim_pretrain__swinv2_base__img192_window12__800ep.yaml` of
microsoft/Swin-Transformer (where SimMIM's SwinV2 support lives), value for value: SwinV2-B (128,
[2, 2, 18, 2], [4, 8, 16, 32]), window 12, drop path 0.1, MODEL.SIMMIM.NORM_TARGET enabled with a 47x47
window; mask patch 32, ratio 0.6; AdamW lr 1e-4 / warmup 5e-7 per 512 images, weight decay 0.05, clip 5.0;
800 epochs, 10 warmup, multistep x0.1 at epoch 700; batch 2048.

Run:
  simmim-pretrain --config=pretrain/swinv2_base_800ep --workdir=gs://BUCKET/simmim/swinv2_b \\
      --config.data.data_dir=gs://BUCKET/tensorflow_datasets --config.dtype=bfloat16

Expected result: fine-tuned at 224 px (window 14, pretrained windows [12, 12, 12, 6]), about 84.6-85%
top-1 (the MODELHUB's SwinV2-B IN-1K numbers; see shared reference §1.7).

Weight decay: the official run's groups (`optimizer.no_decay="official"`, optim.py): its "encoder."-prefixed
no-decay keywords never match, so the `cpb_mlp` weights and `logit_scale` are decayed.
"""

from simmim_jax.configs import default_config


def get_config():
  config = default_config.get_config()
  config.model = default_config.ml_collections.ConfigDict(
      {"name": "swinv2_base_patch4_window12", "drop_path_rate": 0.1})
  config.img_size = 192
  config.norm_target_window = 47  # MODEL.SIMMIM.NORM_TARGET.PATCH_SIZE
  config.num_epochs = 800
  config.warmup_epochs = 10
  config.optimizer.base_lr = 1e-4
  config.optimizer.warmup_lr = 5e-7
  config.optimizer.min_lr = 5e-6  # unused by the multistep schedule
  config.optimizer.schedule = "multistep"
  config.optimizer.multistep_epochs = (700,)
  config.optimizer.multistep_gamma = 0.1
  config.optimizer.no_decay = "official"  # the official groups, keyword bug included (optim.py)
  return config
