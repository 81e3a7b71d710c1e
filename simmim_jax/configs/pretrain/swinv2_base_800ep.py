"""SimMIM SwinV2-B, 800 epochs on ImageNet-1K at 192 px, window 12, with local target normalization.

Source: `configs/simmim/simmim_pretrain__swinv2_base__img192_window12__800ep.yaml` of
microsoft/Swin-Transformer (where SimMIM's SwinV2 support lives), value for value: SwinV2-B (128,
[2, 2, 18, 2], [4, 8, 16, 32]), window 12, drop path 0.1, MODEL.SIMMIM.NORM_TARGET enabled with a 47x47
window; mask patch 32, ratio 0.6; AdamW lr 1e-4 / warmup 5e-7 per 512 images, weight decay 0.05, clip 5.0;
800 epochs, 10 warmup, multistep x0.1 at epoch 700; batch 2048. The official weight-decay groups (see the
family, pretrain/__init__.py) decay the `cpb_mlp` weights and `logit_scale`.

Run:
  simmim-pretrain --config=pretrain/swinv2_base_800ep --workdir=gs://BUCKET/simmim/swinv2_b \\
      --config.data.data_dir=gs://BUCKET/tensorflow_datasets --config.dtype=bfloat16

Expected result: fine-tuned at 224 px (window 14, pretrained windows [12, 12, 12, 6]), about 84.6-85%
top-1 (the SwinV2-B ImageNet-1K rows of microsoft/Swin-Transformer MODELHUB.md).
"""

import functools

from simmim_jax.configs import pretrain

get_config = functools.partial(pretrain.get_config, "swinv2_base,800ep")
