"""Linear probe of SimMIM ViT-B/16 at its 8th block (the paper's protocol, 56.7% top-1 on ImageNet-1K).

Source: paper Table 6 / official issue #14 (8th of 12 blocks, average-pooled patch tokens); the probe
recipe is MAE's `main_linprobe.py` (the SimMIM recipe was never published, issue #36), the family's
(linear_probe/__init__.py): BatchNorm without affine + linear head, LARS lr 0.1 per 256 images, weight decay
0, batch 16384, 90 epochs, 10 warmup, RandomResizedCrop + flip.

Run:
  simmim-linear-probe --config=linear_probe/vit_base --workdir=gs://BUCKET/probe_vit_b \\
      --config.pretrained=gs://BUCKET/simmim_vit_b --config.data.data_dir=gs://BUCKET/tensorflow_datasets
"""

import functools

from simmim_jax.configs import linear_probe

get_config = functools.partial(linear_probe.get_config, "vit_base")
