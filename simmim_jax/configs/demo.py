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
"""

from simmim_jax.configs import default_config


def get_config():
  config = default_config.get_config()
  config.model.name = "vit_base_patch16"
  config.model.patch_size = 4
  config.model.embed_dim = 128
  config.model.depth = 4
  config.model.num_heads = 4
  config.model.drop_path_rate = 0.0
  config.img_size = 32
  config.mask_patch_size = 8
  config.mask_ratio = 0.6

  config.data.source = "demo"
  config.data.num_demo_images = 2048
  config.global_batch_size = 64
  config.num_train_images = config.data.num_demo_images
  config.total_steps = 300
  config.warmup_steps = 20
  # Chosen on the validation photos by masked-region L1 (benchmarks/reconstruction_quality.py, BENCHMARKS.md):
  # per 512 images; x64/512 -> peak 8e-3. warmup_steps was not swept.
  config.optimizer.base_lr = 6.4e-2
  config.optimizer.warmup_lr = 1e-6
  config.optimizer.min_lr = 1e-5
  config.optimizer.schedule = "cosine"

  config.log_every_steps = 20
  config.checkpoint_every_steps = 100
  config.keep_checkpoints = 2
  config.reconstruction_every_steps = 100
  config.num_reconstruction_images = 8
  return config
