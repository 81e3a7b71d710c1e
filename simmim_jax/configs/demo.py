"""Demo: SimMIM pretraining of a tiny ViT on the embedded demo dataset (real photographs shipped with
scikit-image, cropped at random; no download), on CPU in a few minutes.

Run:
  simmim-pretrain --config=demo --workdir=workdir/demo
Rerunning the same command resumes; `--config.total_steps=600` extends the run.

Expected: the loss (masked L1 on ImageNet-normalized pixels) falls from about 0.8-0.9 to well below at the
end, and `workdir/demo/reconstructions/step_<N>.png` shows blurry but correctly coloured predictions
of the masked blocks.

The model is the official SimMIM ViT layout (shared relative position bias, layer scale 0.1) at toy
size: 32 px images, 4 px patches, width 128, depth 4; masks of 8 px blocks (4x4 cells, 10 masked).

The demo family: `get_config("vit")` is this config, `get_config("swin")` the same run with a toy Swin
(`demo_swin`); finetune/demo and linear_probe/demo start from the demo ViT (`ENCODERS["vit"]`).
"""

import ml_collections

from simmim_jax.configs import default_config

# The demo encoders: official layouts at toy size (the Swin: stage 1 shifted windows, later stages single).
ENCODERS = {
    "vit": dict(name="vit_base_patch16", patch_size=4, embed_dim=128, depth=4, num_heads=4),
    "swin": dict(name="swin_tiny_patch4_window7", embed_dim=32, depths=(2, 2, 2), num_heads=(2, 4, 8),
                 window_size=4),
}
# Peak lr per 512 images. ViT: chosen on the validation photos by masked-region L1
# (benchmarks/reconstruction_quality.py, BENCHMARKS.md): x64/512 -> peak 8e-3; warmup_steps was not swept.
BASE_LR = {"vit": 6.4e-2, "swin": 2e-3}


def get_config(arg: str = "vit") -> ml_collections.ConfigDict:
  """The demo pretraining config with the encoder `arg`, a key of ENCODERS ("vit" or "swin")."""
  if arg not in ENCODERS:
    raise ValueError(f"demo config variant {arg!r}: expected an encoder, one of {', '.join(ENCODERS)}")
  config = default_config.get_config()
  config.model = ml_collections.ConfigDict(dict(ENCODERS[arg], drop_path_rate=0.0))
  config.img_size = 32
  config.mask_patch_size = 8
  config.mask_ratio = 0.6

  config.data.source = "demo"
  config.data.num_demo_images = 2048
  config.global_batch_size = 64
  config.num_train_images = config.data.num_demo_images
  config.total_steps = 300
  config.warmup_steps = 20
  config.optimizer.base_lr = BASE_LR[arg]
  config.optimizer.warmup_lr = 1e-6
  config.optimizer.min_lr = 1e-5
  config.optimizer.schedule = "cosine"

  config.log_every_steps = 20
  config.checkpoint_every_steps = 100
  config.keep_checkpoints = 2
  config.reconstruction_every_steps = 100
  config.num_reconstruction_images = 8
  return config
