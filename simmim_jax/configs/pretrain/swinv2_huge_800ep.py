"""SimMIM SwinV2-H (~650M parameters), 800 epochs on ImageNet-1K at 192 px, window 12.

Source: the paper's SwinV2-H result (800 epochs at 192 px, fine-tuned to 85.7% at 224 px and 87.1% at
512 px). The official repositories release no SwinV2-H pretraining yaml, so this config is the SwinV2-B
800-epoch recipe (`simmim_pretrain__swinv2_base__img192_window12__800ep`, value for value, weight-decay
groups included) with the huge model (352, [2, 2, 18, 2], [11, 22, 44, 88]) swapped in. Deviation to know:
the paper's exact SwinV2-H drop path and lr are not public here; 0.1 and 1e-4 are the SwinV2-B values.

The model does not fit replicated with AdamW state on 16 GB chips: it is sharded (FSDP 8), rematerialized and
computed in bfloat16.
Run:
  simmim-pretrain --config=pretrain/swinv2_huge_800ep --workdir=gs://BUCKET/simmim/swinv2_h \\
      --config.data.data_dir=gs://BUCKET/tensorflow_datasets --config.mesh.fsdp=8

Expected result: 85.7% top-1 after fine-tuning at 224 px (paper).
"""

import functools

from simmim_jax.configs import pretrain

get_config = functools.partial(pretrain.get_config, "swinv2_huge,800ep")
