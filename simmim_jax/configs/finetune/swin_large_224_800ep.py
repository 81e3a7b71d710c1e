"""SimMIM Swin-L fine-tuning on ImageNet-1K at 224 px, window 14 (from the 800-epoch pretraining).

Source: official `configs/swin_large__800ep/simmim_finetune__swin_large__img224_window14__800ep.yaml`
(microsoft/SimMIM), value for value: Swin-L, drop path 0.2, layer decay 0.7, and the family's shared recipe
and official-run settings (finetune/__init__.py). Relative position tables 23x23 -> 27x27 and 11x11 -> 13x13
(geo + bicubic).

Expected result: 85.4% top-1 (official README).
Run:
  simmim-finetune --config=finetune/swin_large_224_800ep --workdir=gs://BUCKET/finetune_swin_l \\
      --config.pretrained=gs://BUCKET/simmim/swin_l --config.data.data_dir=gs://BUCKET/tensorflow_datasets
"""

import functools

from simmim_jax.configs import finetune

get_config = functools.partial(finetune.get_config, "swin_large,224,800ep")
