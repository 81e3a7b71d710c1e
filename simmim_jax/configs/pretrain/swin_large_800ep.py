"""SimMIM Swin-L, 800 epochs on ImageNet-1K at 192 px, window 12.

Source: official `configs/swin_large__800ep/simmim_pretrain__swin_large__img192_window12__800ep.yaml`
(microsoft/SimMIM), value for value: Swin-L (192, [2, 2, 18, 2], [6, 12, 24, 48]), window 12 (stage 3 at
12x12 and stage 4 at 6x6 are single unshifted windows), drop path 0.0; mask patch 32, ratio 0.6; AdamW lr
1e-4 / warmup 5e-7 per 512 images, weight decay 0.05 (the official groups, see the family
pretrain/__init__.py: every relative-position table is decayed), clip 5.0; 800 epochs, 10 warmup, multistep
x0.1 at epoch 700; batch 2048.

Run (consider --config.mesh.fsdp=<chips per host> and --config.model.remat=True on 16 GB chips):
  simmim-pretrain --config=pretrain/swin_large_800ep --workdir=gs://BUCKET/simmim/swin_l \\
      --config.data.data_dir=gs://BUCKET/tensorflow_datasets --config.dtype=bfloat16

Expected result: fine-tuned at 224 px (window 14), 85.4% top-1 (paper; 83.5% without pretraining).
"""

import functools

from simmim_jax.configs import pretrain

get_config = functools.partial(pretrain.get_config, "swin_large,800ep")
