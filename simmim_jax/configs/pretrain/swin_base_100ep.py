"""SimMIM Swin-B, 100 epochs on ImageNet-1K at 192 px, window 6 (the paper's ablation setting).

Source: official `configs/swin_base__100ep/simmim_pretrain__swin_base__img192_window6__100ep.yaml`
(microsoft/SimMIM), value for value: Swin-B (128, [2, 2, 18, 2], [4, 8, 16, 32]), window 6, drop path 0.0;
mask patch 32, ratio 0.6; AdamW lr 2e-4 / warmup 1e-6 / min 1e-5 per 512 images (x4 at batch 2048: peak
8e-4), weight decay 0.05, clip 5.0; 100 epochs, 10 warmup, cosine; batch 2048.

Run:
  simmim-pretrain --config=pretrain/swin_base_100ep --workdir=gs://BUCKET/simmim/swin_b_100ep \\
      --config.data.data_dir=gs://BUCKET/tensorflow_datasets --config.dtype=bfloat16

Expected result: fine-tuned at 192 px 82.8% top-1, at 224 px 83.5% (paper / official README). With the
official weight-decay groups (see the family, pretrain/__init__.py), every relative-position table is decayed.
"""

import functools

from simmim_jax.configs import pretrain

get_config = functools.partial(pretrain.get_config, "swin_base,100ep")
