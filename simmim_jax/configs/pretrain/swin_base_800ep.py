"""SimMIM Swin-B, 800 epochs on ImageNet-1K at 192 px, window 6.

Source: official `configs/swin_base__800ep/simmim_pretrain__swin_base__img192_window6__800ep.yaml`
(microsoft/SimMIM), value for value: Swin-B, window 6, drop path 0.0; mask patch 32, ratio 0.6; AdamW lr
1e-4 / warmup 5e-7 per 512 images (x4 at batch 2048), weight decay 0.05, clip 5.0; 800 epochs, 10 warmup,
multistep x0.1 at epoch 700; batch 2048. Every relative-position table is decayed, as by the official
weight-decay groups (see the family, pretrain/__init__.py).

Run:
  simmim-pretrain --config=pretrain/swin_base_800ep --workdir=gs://BUCKET/simmim/swin_b_800ep \\
      --config.data.data_dir=gs://BUCKET/tensorflow_datasets --config.dtype=bfloat16

Expected result: fine-tuned at 224 px (window 7), 84.0% top-1 (paper / official README).
"""

import functools

from simmim_jax.configs import pretrain

get_config = functools.partial(pretrain.get_config, "swin_base,800ep")
