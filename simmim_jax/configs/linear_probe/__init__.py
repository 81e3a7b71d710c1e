"""The linear-probe family: `get_config("ENCODER")`, e.g. `get_config("vit_base")`.

The recipe is MAE's `main_linprobe.py` (facebookresearch/mae), the defaults of
finetune_config.get_linear_probe_config(): frozen encoder, average-pooled patch tokens, BatchNorm without
affine + linear head, LARS lr 0.1 per 256 images, weight decay 0, batch 16384, 90 epochs, 10 warmup,
RandomResizedCrop + flip. The variant picks the encoder and the blocks probed (`ENCODERS`). Each recipe has
its own file here (`linear_probe/vit_base.py`), whose docstring gives its source and run command;
`linear_probe/demo` is the CPU demo.
"""

import ml_collections

from simmim_jax.configs import finetune_config

# The model block, the probed blocks (1-based; Swin: stages) and the image size of each encoder's probe.
ENCODERS = {
    "vit_base": dict(model=dict(name="vit_base_patch16"), probe_blocks=(8,), img_size=224),  # paper: 8th of 12
}


def get_config(arg: str) -> ml_collections.ConfigDict:
  """The linear-probe config of the variant `arg`: "ENCODER", a key of ENCODERS."""
  if str(arg).strip() not in ENCODERS:
    raise ValueError(f"linear_probe config variant {arg!r}: expected an encoder, one of {', '.join(ENCODERS)}")
  config = finetune_config.get_linear_probe_config()
  config.update(ENCODERS[str(arg).strip()])
  return config
