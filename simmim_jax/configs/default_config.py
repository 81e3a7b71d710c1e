"""Default SimMIM pretraining config: every field the trainer reads, with the official defaults.

The families (`configs/pretrain/__init__.py`, `configs/demo.py`) start from this and override what their yaml
sets. Values are the microsoft/SimMIM `config.py` defaults unless a comment says otherwise.
"""

import ml_collections

IMAGENET_TRAIN_IMAGES = 1_281_167


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0

  # Encoder: a registry name; every other key of config.model is a field override of that encoder
  # (timm-style: drop_path_rate, embed_dim, depth, window_size, ...). img_size comes from config.img_size.
  config.model = ml_collections.ConfigDict({"name": "vit_base_patch16", "drop_path_rate": 0.0})
  config.img_size = 224
  config.mask_patch_size = 32      # MODEL.SIMMIM / DATA.MASK_PATCH_SIZE
  config.mask_ratio = 0.6          # DATA.MASK_RATIO
  config.norm_target_window = 0    # SwinV2 NORM_TARGET window (47); 0 = raw normalized pixels (SimMIM v1)
  config.dtype = "float32"         # compute dtype: "float32" or "bfloat16" (params stay float32)

  # Steps: given as epochs of `num_train_images`, or as total_steps / warmup_steps (which win when > 0).
  config.global_batch_size = 2048  # README: 16 GPUs x 128
  config.num_train_images = IMAGENET_TRAIN_IMAGES
  config.num_epochs = 100
  config.warmup_epochs = 10
  config.total_steps = 0
  config.warmup_steps = 0

  config.optimizer = ml_collections.ConfigDict(dict(
      base_lr=5e-4,           # TRAIN.BASE_LR, per 512 images (scaled by global_batch_size / 512)
      warmup_lr=5e-7,         # TRAIN.WARMUP_LR, scaled the same way
      min_lr=5e-6,            # TRAIN.MIN_LR, scaled the same way
      lr_scaling_batch=512,   # lr = base_lr * global_batch_size / 512 (0 disables scaling)
      schedule="cosine",      # "cosine" (timm CosineLRScheduler) or "multistep"
      warmup_prefix=False,    # cosine only: True = it runs after the warmup (timm warmup_prefix; optim.py)
      multistep_epochs=(),    # TRAIN.LR_SCHEDULER.MULTISTEPS (multistep only)
      multistep_gamma=0.1,    # TRAIN.LR_SCHEDULER.GAMMA
      weight_decay=0.05,
      b1=0.9, b2=0.999, eps=1e-8,
      clip_grad_norm=5.0,     # TRAIN.CLIP_GRAD; 0 disables clipping
      accumulation_steps=1,   # TRAIN.ACCUMULATION_STEPS (micro-batches per update)
      no_decay="intended",    # weight-decay groups: "intended" or "official" (optim.py; configs/pretrain set it)
  ))

  config.data = ml_collections.ConfigDict(dict(
      source="tfds",          # "demo" | "tfds" | "folder" | "array_record" (Grain; sample-exact resume)
      name="imagenet2012",    # tfds dataset name (source="tfds"; "array_record": "" = simmim-prepare shards)
      data_dir="",            # tfds data_dir (e.g. gs://bucket/tfds) or the image folder (source="folder")
      split="train",
      crop_scale=(0.67, 1.0),  # RandomResizedCrop scale (official pretraining transform)
      crop_ratio=(3 / 4, 4 / 3),
      horizontal_flip=True,
      shuffle_buffer_size=10_000,
      num_demo_images=2048,   # size of the embedded demo dataset (source="demo")
      demo_image_size=96,     # side of the stored demo crops (RandomResizedCrop then resizes to img_size)
      strict=False,           # True: an undecodable image stops the run (naming it) instead of being skipped
      max_image_pixels=0,     # larger declared sizes are skipped undecoded; 0 = max(64 x img_size**2, 40 M)
      grain_workers=0,        # source="array_record": processes decoding + augmenting per host (0 = in process)
  ))

  # Device mesh: -1 = all remaining devices. With fsdp > 1, parameters (and their optimizer state) with at
  # least fsdp_min_size elements are sharded over the fsdp axis along their largest divisible dimension.
  # slices > 1: TPU slices over the data-centre network; data and fsdp are per slice (sharding.py).
  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, fsdp_min_size=2 ** 14, slices=1))

  # A step with a non-finite loss or gradient norm is skipped (parameters untouched); this many in a row
  # stop the run with an explanation.
  config.max_nonfinite_steps = 10

  config.log_every_steps = 100               # PRINT_FREQ
  config.checkpoint_every_steps = 5 * 625    # SAVE_FREQ 5 epochs of ImageNet at batch 2048
  config.keep_checkpoints = 3
  config.reconstruction_every_steps = 5 * 625  # reconstructions/step_<N>.png (0 = only at the end)
  config.num_reconstruction_images = 4
  config.wandb = wandb_config()
  return config


def wandb_config() -> ml_collections.ConfigDict:
  """Weights & Biases logging (the `wandb` extra; wandb_logging.py): off while `project` is ""."""
  return ml_collections.ConfigDict(dict(
      project="",  # "" = off; set it to log the config, the metrics.jsonl rows and the images to W&B
      entity="",   # "" = wandb's default entity
      name="",     # "" = a name wandb picks; the run id is kept in <workdir>/wandb_run_id
      mode="",     # "online" | "offline"; "" = the WANDB_MODE environment variable, else online
  ))
