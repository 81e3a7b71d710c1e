"""SimMIM Swin-B fine-tuning on ImageNet-1K at 192 px, window 6 (from the 100-epoch pretraining).

Source: official `configs/swin_base__100ep/simmim_finetune__swin_base__img192_window6__100ep.yaml`
(microsoft/SimMIM), value for value: Swin-B, drop path 0.1, layer decay 0.9, and the family's shared recipe
and official-run settings (finetune/__init__.py).

Run (the pretraining's window 6 at 192 px is kept):
  simmim-finetune --config=finetune/swin_base_192_100ep --workdir=gs://BUCKET/finetune \\
      --config.pretrained=gs://BUCKET/simmim_pretrain_workdir --config.data.data_dir=gs://BUCKET/tensorflow_datasets

Expected result: 82.8% top-1 (official README).
"""

import functools

from simmim_jax.configs import finetune

get_config = functools.partial(finetune.get_config, "swin_base,192,100ep")
