"""Demo: linear probes on every block of the demo pretraining run (configs/demo.py), on the digits.

Run (after `simmim-pretrain --config=demo --workdir=workdir/demo`):
  simmim-linear-probe --config=linear_probe/demo --workdir=workdir/demo_probe \\
      --config.pretrained=workdir/demo
`--config.pretrained=''` probes a randomly initialized encoder of the same architecture (the baseline). The
digits are rendered in memory from scikit-learn's wheel (`data.source="digits"`, no data step), with the fixed
test split of `simmim_jax.data.digits` (`--config.data.eval_split=val`: its validation split).

MAE protocol at toy size: frozen encoder, average-pooled patch tokens after each block, BatchNorm without
affine + linear head per block; metrics.jsonl eval rows hold `eval_top1_block<k>` for k = 1..4. Two changes
for a 200-step run (chosen on a validation split by `benchmarks/pretrain_vs_scratch.py`): momentum SGD at
1.6 per 256 images instead of MAE's LARS at 0.1 (LARS steps are relative to the weight norm and leave the
head at chance in a few hundred small steps), and no 4-px crop shift (`data.crop_padding=0`). Measured on a
random-init encoder (`--config.pretrained=''`, 2026-11-28): 73-74% top-1 on every block after 200 steps.
"""

from simmim_jax.configs import demo
from simmim_jax.configs import finetune_config


def get_config():
  config = finetune_config.get_linear_probe_config()
  config.model.update(demo.ENCODERS["vit"])  # without a pretrained workdir: the demo ViT
  config.probe_blocks = (1, 2, 3, 4)
  config.img_size = 32

  config.data.source = "digits"        # the images and split of `python -m simmim_jax.data.digits`, in memory
  config.data.eval_split = "test"
  config.data.crop_padding = 0

  config.global_batch_size = 128
  config.total_steps = 200
  config.warmup_steps = 20
  config.optimizer.name = "sgd"         # MAE: "lars" at 0.1 per 256 images (thousands of large-batch steps)
  config.optimizer.base_lr = 1.6        # per 256 images

  config.log_every_steps = 20
  config.eval_every_steps = 100
  config.checkpoint_every_steps = 100
  return config
