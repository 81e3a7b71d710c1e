"""SimMIM Swin-B fine-tuning on ImageNet-1K at 224 px, window 7 (from the 100-epoch pretraining).

Source: official `configs/swin_base__100ep/simmim_finetune__swin_base__img224_window7__100ep.yaml`
(microsoft/SimMIM), value for value: Swin-B, drop path 0.1, layer decay 0.9, and the family's shared recipe
and official-run settings (finetune/__init__.py). Relative position tables of the 192 px / window 6
pretraining are resized to window 7 (geo + bicubic).

Expected result: 83.5% top-1 (official README), after
  simmim-finetune --config=finetune/swin_base_224_100ep --workdir=gs://BUCKET/finetune \\
      --config.pretrained=gs://BUCKET/simmim_pretrain_workdir --config.data.data_dir=gs://BUCKET/tensorflow_datasets
"""

import functools

from simmim_jax.configs import finetune

get_config = functools.partial(finetune.get_config, "swin_base,224,100ep")
