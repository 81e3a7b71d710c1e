"""SimMIM SwinV2-G (~3.0B parameters, depths 2-2-42-4, width 512), 192 px, window 12: the paper's largest model.

Source: the SimMIM paper scales SwinV2 to the 3-billion-parameter SwinV2-G (SwinV2 paper: SimMIM pretraining on
about 70M images of the private ImageNet-22K-ext, then supervised training). No official yaml or public data
exist for that run, so this config is the SwinV2-H one (`pretrain/swinv2_huge_800ep`: the SwinV2-B 800-epoch
recipe, value for value) with the giant model (512, [2, 2, 42, 4], [16, 32, 64, 128]) swapped in. Deviation to
know: ImageNet-1K instead of the paper's 70M images; the official MODELHUB's SwinV2-giant was pretrained on
ImageNet-22K for 500k iterations at batch 2048 (`--config.data.source=folder --config.total_steps=500000`).

It needs a pod: 44 GiB of float32 parameters and AdamW moments before activations. FSDP over 64 chips, remat
and `scan_blocks` (the 42-block stage compiles as one scanned pair) are on; check the topology first:
  simmim-aot --config=pretrain/swinv2_giant_800ep --topology=v5p:4x4x4 --config.mesh.fsdp=64
(BENCHMARKS.md: 9.9 GiB per v5p chip at the global batch 2048, compiled in 8.4 minutes on 2 CPU cores).
Run:
  simmim-pretrain --config=pretrain/swinv2_giant_800ep --workdir=gs://BUCKET/simmim/swinv2_g \\
      --config.data.data_dir=gs://BUCKET/tensorflow_datasets

Expected result: not published for this recipe; MODELHUB's ImageNet-22K SwinV2-giant (500k iterations)
fine-tunes to 86.53% top-1.
"""

import functools

from simmim_jax.configs import pretrain

get_config = functools.partial(pretrain.get_config, "swinv2_giant,800ep")
