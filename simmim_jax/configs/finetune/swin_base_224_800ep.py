"""SimMIM Swin-B fine-tuning on ImageNet-1K at 224 px, window 7 (from the 800-epoch pretraining).

Source: official `configs/swin_base__800ep/simmim_finetune__swin_base__img224_window7__800ep.yaml`
(microsoft/SimMIM), value for value: Swin-B, drop path 0.1, layer decay 0.8, and the family's shared recipe
and official-run settings (finetune/__init__.py). The pretraining's relative position tables (192 px, window
6) are resized to window 7 (geo + bicubic). Expected result: 84.0% top-1 (official README).

Run:
  simmim-finetune --config=finetune/swin_base_224_800ep --workdir=gs://BUCKET/finetune \\
      --config.pretrained=gs://BUCKET/simmim_pretrain_workdir --config.data.data_dir=gs://BUCKET/tensorflow_datasets
"""

import functools

from simmim_jax.configs import finetune

get_config = functools.partial(finetune.get_config, "swin_base,224,800ep")
