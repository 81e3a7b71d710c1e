"""SimMIM ViT-B/16 fine-tuning on ImageNet-1K at 224 px (from the 800-epoch pretraining).

Source: official `configs/vit_base__800ep/simmim_finetune__vit_base__img224__800ep.yaml` (microsoft/SimMIM),
value for value (the defaults of finetune_config.py are this yaml): per-block relative position bias
(USE_RPB), no shared RPB, mean pooling + fc_norm, drop path 0.1, layer decay 0.65, and the family's shared
recipe and official-run settings (finetune/__init__.py).

Run:
  simmim-finetune --config=finetune/vit_base_800ep --workdir=gs://BUCKET/ft_vit_b \\
      --config.pretrained=gs://BUCKET/simmim_vit_b --config.data.data_dir=gs://BUCKET/tensorflow_datasets

Expected result: 83.8% top-1 (paper, README).
"""

import functools

from simmim_jax.configs import finetune

get_config = functools.partial(finetune.get_config, "vit_base,224,800ep")
