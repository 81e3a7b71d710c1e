"""Reconstruction quality of the demo recipe, measured on held-out demo images.

Measure: masked-region L1 of the SimMIM reconstruction (ImageNet-normalized pixels, the training target), relative
to filling each image's masked pixels with the per-channel mean of its own visible pixels:
  relative L1 = sum |prediction - image| over masked pixels / sum |visible mean - image| over masked pixels,
summed over all evaluation images and masks. 1.0 = no better than the mean fill; lower is better.

Data: the demo dataset (`simmim_jax.data.demo_images`: random crops of scikit-image's photographs), split *by
photograph*, so no evaluation crop overlaps a training crop: 10 photos train, 2 validation (lr / warmup choice), 3
held out (reported; never trained on, never used for a choice) - see SPLITS. The demo's crops are drawn with the
demo seed; the photo of crop k is read from the same random draws `make_demo_images` makes (`crop_photos`).
`--num_images` crops are built and the train crops are written as PNGs to `<workdir>/train` and pretrained on with
`data.source="folder"` (same augmentation as the demo source).

Recipe: simmim_jax/configs/demo.py (tiny official-layout ViT, 32 px, batch 64, cosine), with `total_steps`, `warmup_steps`
and `optimizer.base_lr` (per 512 images) set per configuration; `data.source`, `num_train_images` follow the
split. Each configuration is one run of `simmim_jax.train.pretrain.train_and_evaluate` (seed `--seed`), evaluated on
every crop of the chosen split, resized (bicubic) from 96 to 32 px, with `--masks_per_image` SimMIM masks per
image drawn from a fixed key (the same masks for every configuration).

Prints one JSON line per configuration and a Markdown table. Runs (about 3-10 minutes per 300 steps on 2 shared
CPU cores; a 1,500-step run 5x that):
  # choose lr / warmup on the validation photos (300 steps)
  .venv/bin/python benchmarks/reconstruction_quality.py --workdir=/tmp/rq --split=val --steps 300 \
      --lrs 1e-3 2e-3 4e-3 8e-3 1.6e-2 3.2e-2 6.4e-2 1.28e-1 --warmups 20
  # report on the held-out photos: the demo recipe and the validation pick
  .venv/bin/python benchmarks/reconstruction_quality.py --workdir=/tmp/rq --split=heldout --steps 300 1500 \
      --lrs 2e-3 6.4e-2 --warmups 20
  # smoke test (numbers mean nothing)
  .venv/bin/python benchmarks/reconstruction_quality.py --workdir=/tmp/rq_quick --quick
A configuration whose workdir already holds a finished run is evaluated without retraining.
"""

import argparse
import json
import os
import platform
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import logging  # noqa: E402
from PIL import Image  # noqa: E402

from simmim_jax import configs, masking  # noqa: E402
from simmim_jax.train import pretrain
from simmim_jax.data import demo_images, normalization  # noqa: E402

# Photos of each split (a mix of colour and grayscale photos in each).
SPLITS = {
    "val": ("coffee.png", "gravel.png"),
    "heldout": ("chelsea.png", "camera.png", "ihc.png"),
}
SPLITS["train"] = tuple(p for p in demo_images.DEMO_PHOTOS if p not in SPLITS["val"] + SPLITS["heldout"])
EVAL_MASK_SEED = 12345  # evaluation masks: the same for every configuration and run seed


def load_demo_config():
  return configs.load("demo")


def crop_photos(num_images: int) -> np.ndarray:
  """The photo (index into DEMO_PHOTOS) of each of the first `num_images` demo crops: the same draws as
  `demo_images.make_demo_images` (row k = crop k's (photo, side, left, top); photo = floor(u * photos))."""
  draws = np.random.default_rng(demo_images.DEMO_SEED).random((num_images, 4))
  return (draws[:, 0] * len(demo_images.DEMO_PHOTOS)).astype(np.int64)


def split_images(num_images: int, image_size: int) -> dict[str, np.ndarray]:
  """{"train" | "val" | "heldout": uint8 [n, S, S, 3]} crops of each split's photos."""
  images = demo_images.make_demo_images(num_images, image_size)
  photos = np.asarray(demo_images.DEMO_PHOTOS)[crop_photos(num_images)]
  return {name: images[np.isin(photos, members)] for name, members in SPLITS.items()}


def write_folder(directory: str, images: np.ndarray) -> None:
  if os.path.exists(os.path.join(directory, "done")):
    return
  os.makedirs(directory, exist_ok=True)
  for k, image in enumerate(images):
    Image.fromarray(image).save(os.path.join(directory, f"{k:05d}.png"))
  open(os.path.join(directory, "done"), "w").close()


def eval_images(images: np.ndarray, img_size: int) -> np.ndarray:
  """uint8 crops -> ImageNet-normalized float32 [n, img_size, img_size, 3] (whole crop resized, bicubic)."""
  resized = np.stack([np.asarray(Image.fromarray(x).resize((img_size, img_size), Image.Resampling.BICUBIC))
                      for x in images])
  return normalization.normalize(resized)


def relative_l1(model, params, config, images: np.ndarray, masks_per_image: int, batch: int = 256) -> dict:
  """{"relative_l1", "l1_model", "l1_mean_fill"}: masked-pixel L1 (per masked pixel and channel) of the model
  and of the visible-mean fill, over every image x mask; see the module docstring."""
  patch = model.encoder.patch_size

  @jax.jit
  def sums(images, mask):
    prediction = model.apply({"params": params}, images, mask)["reconstruction"]
    pixel_mask = masking.upsample_mask(mask, patch)[..., None].astype(jnp.float32)  # 1 = masked
    visible = 1.0 - pixel_mask
    visible_mean = (images * visible).sum((1, 2), keepdims=True) / visible.sum((1, 2), keepdims=True)
    return (jnp.sum(jnp.abs(prediction - images) * pixel_mask), jnp.sum(jnp.abs(visible_mean - images) * pixel_mask),
            jnp.sum(pixel_mask) * images.shape[-1])

  key = jax.random.key(EVAL_MASK_SEED)
  totals = np.zeros(3)
  for repeat in range(masks_per_image):
    for start in range(0, len(images), batch):
      chunk = jnp.asarray(images[start:start + batch])
      mask = masking.random_mask(jax.random.fold_in(jax.random.fold_in(key, repeat), start), len(chunk),
                                 input_size=config.img_size, mask_patch_size=config.mask_patch_size,
                                 model_patch_size=patch, mask_ratio=config.mask_ratio)
      totals += np.asarray(jax.device_get(sums(chunk, mask)), np.float64)
  model_l1, mean_l1, count = totals
  return {"relative_l1": model_l1 / mean_l1, "l1_model": model_l1 / count, "l1_mean_fill": mean_l1 / count}


def run_config(args, train_dir, num_train, steps, lr, warmup):
  config = load_demo_config()
  config.seed = args.seed
  config.data.source, config.data.data_dir = "folder", train_dir
  config.num_train_images = num_train
  config.total_steps, config.warmup_steps = steps, warmup
  config.optimizer.base_lr = lr
  config.log_every_steps = max(steps // 5, 1)
  config.checkpoint_every_steps = steps
  config.keep_checkpoints = 1
  config.reconstruction_every_steps = 0
  workdir = os.path.join(args.workdir, f"steps{steps}_lr{lr:g}_warmup{warmup}_seed{args.seed}")
  trained_before = os.path.exists(os.path.join(workdir, "config.json"))
  start = time.time()
  state = pretrain.train_and_evaluate(config, workdir)
  return config, state, None if trained_before else time.time() - start  # None: trained by an earlier call


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--split", choices=("val", "heldout"), default="heldout",
                      help="evaluation photos: 'val' to choose lr / warmup, 'heldout' to report")
  parser.add_argument("--steps", type=int, nargs="+", default=[300, 1500])
  parser.add_argument("--lrs", type=float, nargs="+", default=None, help="base lr per 512 images (default: demo's)")
  parser.add_argument("--warmups", type=int, nargs="+", default=None, help="warmup steps (default: demo's)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--num_images", type=int, default=3072, help="demo crops built (about 2/3 are train)")
  parser.add_argument("--masks_per_image", type=int, default=4)
  parser.add_argument("--quick", action="store_true", help="tiny budgets: checks the script runs")
  args = parser.parse_args()
  demo = load_demo_config()
  lrs = args.lrs or [demo.optimizer.base_lr]
  warmups = args.warmups or [demo.warmup_steps]
  if args.quick:
    args.steps, args.num_images, args.masks_per_image = [4], 512, 1
  logging.set_verbosity(logging.WARNING)

  splits = split_images(args.num_images, demo.data.demo_image_size)
  train_dir = os.path.join(args.workdir, f"train_{args.num_images}")
  write_folder(train_dir, splits["train"])
  evaluation = eval_images(splits[args.split], demo.img_size)
  print(f"crops: train {len(splits['train'])}, val {len(splits['val'])}, heldout {len(splits['heldout'])}; "
        f"evaluating on {args.split}", flush=True)

  rows = []
  for steps in args.steps:
    for lr in lrs:
      for warmup in warmups:
        config, state, seconds = run_config(args, train_dir, len(splits["train"]), steps, lr, warmup)
        model = pretrain.build_model(config)
        result = relative_l1(model, state.params, config, evaluation, args.masks_per_image)
        row = dict(split=args.split, steps=steps, base_lr=lr, peak_lr=lr * config.global_batch_size / 512,
                   warmup_steps=warmup, seed=args.seed, eval_images=len(evaluation),
                   masks_per_image=args.masks_per_image, train_seconds=None if seconds is None else round(seconds, 1),
                   **{k: round(float(v), 4) for k, v in result.items()})
        rows.append(row)
        print(json.dumps(row), flush=True)

  cpu = platform.processor() or platform.machine()
  lines = [f"split {args.split!r} ({len(evaluation)} crops of {', '.join(SPLITS[args.split])}; "
           f"{args.masks_per_image} masks each), trained on {len(splits['train'])} crops of the other photos; "
           f"simmim_jax/configs/demo.py, seed {args.seed}; jax {jax.__version__}, {cpu}, {jax.device_count()} device(s)", "",
           "| steps | base lr (per 512) | warmup steps | relative masked L1 (1.0 = visible-mean fill) | "
           "masked L1 model / mean fill | train time (s) |", "|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['steps']} | {r['base_lr']:g} | {r['warmup_steps']} | {r['relative_l1']:.3f} | "
                 f"{r['l1_model']:.3f} / {r['l1_mean_fill']:.3f} | "
                 f"{'earlier run' if r['train_seconds'] is None else round(r['train_seconds'])} |")
  print("\n".join(lines), flush=True)


if __name__ == "__main__":
  main()
