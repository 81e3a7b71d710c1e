"""Demo with a Swin encoder: SimMIM pretraining of a tiny Swin on the embedded demo dataset, on CPU.

Run:
  simmim-pretrain --config=demo_swin --workdir=workdir/demo_swin

A toy Swin at 32 px: patch 4, width 32, depths (2, 2, 2), window 4 (stage 1 uses shifted windows, the
later stages are single windows), encoder stride 16; 8 px mask blocks at ratio 0.6. Expected: the loss
falls from about 0.8-0.9 within the 300 steps, as configs/demo.py.
"""

from simmim_jax.configs import default_config


def get_config():
  config = default_config.get_config()
  config.model = default_config.ml_collections.ConfigDict(dict(
      name="swin_tiny_patch4_window7", embed_dim=32, depths=(2, 2, 2), num_heads=(2, 4, 8), window_size=4,
      drop_path_rate=0.0))
  config.img_size = 32
  config.mask_patch_size = 8
  config.mask_ratio = 0.6
  config.data.source = "demo"
  config.data.num_demo_images = 2048
  config.global_batch_size = 64
  config.num_train_images = config.data.num_demo_images
  config.total_steps = 300
  config.warmup_steps = 20
  config.optimizer.base_lr = 2e-3
  config.optimizer.warmup_lr = 1e-6
  config.optimizer.min_lr = 1e-5
  config.optimizer.schedule = "cosine"
  config.log_every_steps = 20
  config.checkpoint_every_steps = 100
  config.keep_checkpoints = 2
  config.reconstruction_every_steps = 100
  config.num_reconstruction_images = 8
  return config
