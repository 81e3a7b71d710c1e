"""Default fine-tuning and linear-probing configs: every field `finetune.py` / `linear_probe.py` read.

Fine-tuning values are microsoft/SimMIM's `config.py` defaults and the ViT-B fine-tune yaml
(`configs/vit_base__800ep/simmim_finetune__vit_base__img224__800ep.yaml`); the finetune family
(`configs/finetune/__init__.py`) overrides what each yaml sets. Linear probing follows facebookresearch/mae
`main_linprobe.py` on the paper's SimMIM protocol (ViT-B 8th block, patch tokens average-pooled:
microsoft/SimMIM issue #14); the linear_probe family (`configs/linear_probe/__init__.py`) starts from it.
"""

import ml_collections

from simmim_jax.configs import default_config


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  # A simmim-pretrain workdir (its latest checkpoint; its config gives the encoder name and sizes), or ""
  # for random initialization (the from-scratch baseline).
  config.pretrained = ""
  config.pretrained_step = 0  # 0 = the latest checkpoint of `pretrained`
  # Encoder: registry name + field overrides. With `pretrained`, the name and architecture come from the
  # pretrained run and only the recipe fields (FINETUNE_MODEL_FIELDS in finetune.py) are taken from here.
  config.model = ml_collections.ConfigDict(dict(
      name="vit_base_patch16", drop_path_rate=0.1,
      use_mean_pooling=True, use_rel_pos_bias=True, use_shared_rel_pos_bias=False,  # USE_* of the ViT yaml
      init_style="timm"))  # the fine-tune ViT's init (official models/vision_transformer.py:270)
  config.num_classes = 0         # 0 = from the data (tfds info / label folders)
  config.head_init_scale = 0.001  # official ViT init_scale; the Swin configs set 1.0 (plain trunc_normal .02)
  config.img_size = 224
  config.dtype = "float32"

  config.global_batch_size = 2048            # 16 GPUs x 128
  config.num_train_images = 0                # 0 = from the data
  config.num_epochs = 100
  config.warmup_epochs = 20
  config.total_steps = 0
  config.warmup_steps = 0
  config.optimizer = ml_collections.ConfigDict(dict(
      base_lr=1.25e-3, warmup_lr=2.5e-7, min_lr=2.5e-7,  # per 512 images (x4 at batch 2048)
      lr_scaling_batch=512, schedule="cosine", multistep_epochs=(), multistep_gamma=0.1,
      warmup_prefix=False,  # True: the cosine runs after the warmup (timm warmup_prefix, Swin-Transformer HEAD)
      layer_decay=0.65,                                  # TRAIN.LAYER_DECAY
      weight_decay=0.05, b1=0.9, b2=0.999, eps=1e-8, clip_grad_norm=5.0, accumulation_steps=1,
      no_decay="intended"))  # weight-decay groups: "intended" or "official" (optim.py; configs/finetune set it)

  config.augment = ml_collections.ConfigDict(dict(
      randaugment="rand-m9-mstd0.5-inc1",  # AUG.AUTO_AUGMENT ("" = off)
      reprob=0.25,                         # AUG.REPROB (random erasing, mode pixel, count 1)
      mixup=0.8, cutmix=1.0, mixup_prob=1.0, mixup_switch_prob=0.5,  # AUG.MIXUP*, mode batch
      mixup_groups=1,                      # lam / pairing per group of batch / groups (official: per GPU)
      label_smoothing=0.1))                # MODEL.LABEL_SMOOTHING

  config.data = _data_config()
  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, fsdp_min_size=2 ** 14, slices=1))
  config.log_every_steps = 100
  config.eval_every_steps = 5 * 625          # every 5 epochs; the official configs validate every epoch (625)
  config.checkpoint_every_steps = 5 * 625
  config.keep_checkpoints = 2
  config.eval_only = False                   # official --eval: evaluate the latest checkpoint and stop
  # A step with a non-finite loss or gradient norm is skipped (parameters untouched); this many in a row
  # stop the run with an explanation.
  config.max_nonfinite_steps = 10
  config.wandb = default_config.wandb_config()  # Weights & Biases logging: off while project is ""
  return config


def _data_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      source="tfds",              # "tfds" | "folder" (data_dir/<split>/<label>/*) | "digits" (the demo's, in memory)
                                  # | "array_record" (Grain: simmim-prepare shards, or tfds `name` as array_record)
      name="imagenet2012",
      data_dir="",
      train_split="train",
      eval_split="validation",
      crop_scale=(0.08, 1.0),     # timm RandomResizedCrop defaults, bicubic (unused at img_size <= 32)
      crop_ratio=(3 / 4, 4 / 3),
      crop_padding=4,             # img_size <= 32: RandomCrop(img_size, padding) (official 4; 0 = no shift)
      shuffle_buffer_size=10_000,
      train_examples_per_class=0,  # > 0: a seeded subset of that many train images per class (folder)
      subset_seed=0,
      max_image_pixels=0,         # larger declared sizes stop the run undecoded; 0 = max(64 x img_size**2, 40 M)
      grain_workers=0,            # source="array_record": processes decoding + augmenting per host (0 = in process)
  ))


def get_linear_probe_config() -> ml_collections.ConfigDict:
  """MAE linear probe: frozen encoder, BatchNorm (no affine) + linear head, LARS lr 0.1 per 256 images,
  weight decay 0, 90 epochs with 10 warmup, batch 16384; RandomResizedCrop + flip only."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.pretrained = ""
  config.pretrained_step = 0
  config.model = ml_collections.ConfigDict(dict(name="vit_base_patch16"))
  config.probe_blocks = (8,)   # 1-based ViT blocks (Swin: stages) probed, one head each; paper: ViT-B 8th
  config.num_classes = 0
  config.img_size = 224
  config.dtype = "float32"
  config.global_batch_size = 16384
  config.num_train_images = 0
  config.num_epochs = 90
  config.warmup_epochs = 10
  config.total_steps = 0
  config.warmup_steps = 0
  config.optimizer = ml_collections.ConfigDict(dict(
      name="lars",  # MAE; "sgd": momentum SGD without trust ratio (short runs, see optim.create_lars_optimizer)
      base_lr=0.1, warmup_lr=0.0, min_lr=0.0, lr_scaling_batch=256, weight_decay=0.0, momentum=0.9,
      accumulation_steps=1,
      warmup_prefix=False))  # True: the cosine runs after the warmup (timm warmup_prefix; optim.py)
  config.data = _data_config()
  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, fsdp_min_size=2 ** 14, slices=1))
  config.log_every_steps = 100
  config.eval_every_steps = 1000
  config.checkpoint_every_steps = 1000
  config.keep_checkpoints = 2
  config.max_nonfinite_steps = 10
  config.wandb = default_config.wandb_config()  # Weights & Biases logging: off while project is ""
  return config


IMAGENET_TRAIN_IMAGES = default_config.IMAGENET_TRAIN_IMAGES
