"""SimMIM ViT-B/16, 800 epochs on ImageNet-1K at 224 px.

Source: official `configs/vit_base__800ep/simmim_pretrain__vit_base__img224__800ep.yaml` (microsoft/SimMIM),
value for value: ViT-B/16 with shared relative position bias, no absolute position embedding, layer scale
0.1, drop path 0.1; mask patch 32, ratio 0.6; AdamW lr 1e-4 / warmup 5e-7 per 512 images (x4 at batch
2048), weight decay 0.05, clip 5.0; 800 epochs, 10 warmup, multistep x0.1 at epoch 700; batch 2048.

Run (TPU VM / GPU, ImageNet prepared with tfds):
  simmim-pretrain --config=pretrain/vit_base_800ep --workdir=gs://BUCKET/simmim_vit_b \\
      --config.data.data_dir=gs://BUCKET/tensorflow_datasets

Expected result: the paper's ViT-B/16 fine-tunes to 83.8% top-1 on ImageNet-1K (from this pretraining
followed by `simmim_finetune__vit_base__img224__800ep`).

The official weight-decay groups (see the family, pretrain/__init__.py) decay the mask token and the shared
relative-position table.
"""

import functools

from simmim_jax.configs import pretrain

get_config = functools.partial(pretrain.get_config, "vit_base,800ep")
