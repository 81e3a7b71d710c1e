"""What does SimMIM pretraining buy? SimMIM-pretrained vs randomly initialized encoder, same budgets.

Data: scikit-learn's handwritten digits (1,797 real 8x8 scans, 10 classes; `simmim_jax.data.digits`), drawn at
28 px on a 32-px black canvas, a fixed stratified 80/20 train/test split (1,438 / 359). The test split is never
used for pretraining or for any choice below.

Protocol (all through the package's own entry points, in-process):
  1. SimMIM pretraining of a small official-layout ViT (patch 4, width 64, depth 4, 4 heads; no absolute
     position embedding, relative position bias; mask patch 8, ratio 0.6) on the *unlabelled* train images
     (`simmim_jax.train.pretrain`): once with seed 0 by default (so the seed spread below covers label subsets,
     head init, data order and augmentation, not pretraining variance), or once per seed with --pretrain_per_seed.
  2. For each seed and each regime - few labels (10 per class, a seeded subset) and all labels (1,438):
     a. fine-tuning (`simmim_jax.train.finetune`: AdamW + layer decay 0.75, warmup + cosine, label smoothing 0.1;
        at 32 px the official small-image transforms: RandomCrop(32, padding) + flip, eval as is) with the
        --finetune_recipe augmentation and lr (FINETUNE_RECIPES) and --crop_padding, from the pretrained
        encoder and from random initialization, same steps, same data order, same augmentation draws;
     b. linear probes of every block (`simmim_jax.train.linear_probe`, MAE protocol: BatchNorm without affine +
        linear head, crop + flip only) on both encoders, with --probe_optimizer / --probe_lr: MAE's LARS
        at 0.1 per 256 images leaves the head near its init in ~100 steps of 64 (chance accuracy).
     Why --crop_padding 0 (flip only): the official 4-px padded random crop shifts a digit by sub-patch
     amounts, and the random-init encoder's pooled features mostly encode that shift (logistic regression on
     them: 19% train accuracy on shifted images vs 89% unshifted), so nothing learns in this budget.
  3. Report the *final* test top-1 (not the best over evaluations, which would select on the test set),
     mean +- std over seeds, as a Markdown table (also written to <workdir>/results.md and results.json).

Recipe selection (--val): the crop padding (VAL_CROP_PADDINGS), the fine-tune augmentation and lr
(VAL_FINETUNE_RECIPES) and the probe optimizer (VAL_PROBE_OPTIMIZERS) were chosen on a validation split
carved from the train split (`digits.write_digits_folder(holdout="val")`:
1,151 train / 287 validation images, no test image), on the *random-init* arm only (no pretraining run), so
the recipe is tuned for the baseline and applied unchanged to the pretrained encoder. Defaults = the pick:
with padding 0, seed 0, validation top-1 fine-tune official / light / light_lr4 = 11.1 / 50.9 / 49.5 (10 per
class) and 48.8 / 52.3 / 75.3 (all); probes (mean of blocks) LARS 0.1 / SGD 0.1 / 0.4 / 1.6 = 12 / 54 / 63 / 64
(10 per class) and 11 / 61 / 65 / 67 (all). With the official padding 4 (seed 0; fine-tunes in both regimes,
probes with 10 per class) every candidate stayed at 10-19%.

Run (about 16 minutes on 2 CPU cores with the defaults, measured with other jobs on the machine: pretraining
4.2 min, the 24 fine-tune / probe runs 11.3 min; --val with one seed about 6 min per crop padding; --quick runs
a reduced version in a few minutes to check that everything works; its numbers mean nothing):
  .venv/bin/pip install -e '.[data,benchmarks]'
  .venv/bin/python benchmarks/pretrain_vs_scratch.py --workdir=/tmp/pvs
  .venv/bin/python benchmarks/pretrain_vs_scratch.py --workdir=/tmp/pvs_val --val --seeds 0  # recipe choice
  .venv/bin/python benchmarks/pretrain_vs_scratch.py --workdir=/tmp/pvs_quick --quick
"""

import argparse
import json
import os
import platform
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import logging  # noqa: E402

from simmim_jax.configs import default_config, finetune_config  # noqa: E402
from simmim_jax.train import finetune, linear_probe, pretrain
from simmim_jax.data import digits  # noqa: E402

ENCODER = dict(name="vit_base_patch16", patch_size=4, embed_dim=64, depth=4, num_heads=4)
IMG_SIZE = 32
# Downstream recipes (the same for both arms). "official": the official fine-tune augmentation (RandAugment
# m9, random erasing 0.25, Mixup 0.8 / CutMix 1.0, label smoothing 0.1); "light": none of RandAugment,
# erasing, Mixup, CutMix (label smoothing 0.1 kept); "light_lr4": light at 4x the lr (2e-2 per 512 images).
# At 32 px all train on RandomCrop(32, padding=4) + flip and evaluate the image as it is (official small-image
# transforms, `data.finetune_pipeline`).
FINETUNE_RECIPES = {
    "official": dict(randaugment="rand-m9-mstd0.5-inc1", reprob=0.25, mixup=0.8, cutmix=1.0, label_smoothing=0.1),
    "light": dict(randaugment="", reprob=0.0, mixup=0.0, cutmix=0.0, label_smoothing=0.1),
    "light_lr4": dict(randaugment="", reprob=0.0, mixup=0.0, cutmix=0.0, label_smoothing=0.1, base_lr=2e-2),
}
CROP_PADDINGS = (4, 0)  # RandomCrop(32, padding): official 4 (shifts of up to 4 px), or 0 (flip only)
# --val: the candidates compared on the validation split (random-init arm only, see the module docstring).
VAL_FINETUNE_RECIPES = ("official", "light", "light_lr4")
VAL_CROP_PADDINGS = CROP_PADDINGS
# (optimizer, lr per 256 images): LARS 0.1 = MAE (at its batch 16384 and ~7k steps); LARS steps are relative to
# the weight norm, so from a 0.01-std head ~100 steps of 64 barely move it; momentum SGD has no trust ratio.
VAL_PROBE_OPTIMIZERS = (("lars", 0.1), ("sgd", 0.1), ("sgd", 0.4), ("sgd", 1.6))


def pretrain_config(args, seed, data_dir):
  config = default_config.get_config()
  config.seed = seed
  config.model.update(**ENCODER)
  config.model.drop_path_rate = 0.0
  config.img_size, config.mask_patch_size, config.mask_ratio = IMG_SIZE, 8, 0.6
  config.data.source, config.data.data_dir = "folder", os.path.join(data_dir, "train")  # labels ignored
  config.global_batch_size = 64
  config.total_steps, config.warmup_steps = args.pretrain_steps, max(args.pretrain_steps // 20, 1)
  config.optimizer.update(base_lr=4e-3, warmup_lr=1e-6, min_lr=1e-5, schedule="cosine")  # per 512 images
  config.log_every_steps = max(args.pretrain_steps // 10, 1)
  config.checkpoint_every_steps = args.pretrain_steps
  config.reconstruction_every_steps = 0
  return config


def finetune_cfg(args, seed, data_dir, pretrained, per_class, eval_split="test", recipe=None, crop_padding=None):
  config = finetune_config.get_config()
  config.seed = seed
  config.pretrained = pretrained
  config.model.update(**ENCODER)
  config.img_size = IMG_SIZE
  config.data.update(source="folder", data_dir=data_dir, eval_split=eval_split, train_examples_per_class=per_class,
                     subset_seed=seed, crop_padding=args.crop_padding if crop_padding is None else crop_padding)
  augment = dict(FINETUNE_RECIPES[recipe or args.finetune_recipe])
  config.optimizer.update(base_lr=augment.pop("base_lr", 5e-3), warmup_lr=1e-6, min_lr=1e-6, layer_decay=0.75)
  config.augment.update(**augment)
  steps = args.finetune_steps_few if per_class else args.finetune_steps_all
  config.global_batch_size = 32 if per_class else 64
  config.total_steps, config.warmup_steps = steps, max(steps // 10, 1)
  config.log_every_steps = max(steps // 5, 1)
  config.eval_every_steps = config.checkpoint_every_steps = steps
  return config


def probe_cfg(args, seed, data_dir, pretrained, per_class, eval_split="test", optimizer=None, crop_padding=None):
  config = finetune_config.get_linear_probe_config()
  config.seed = seed
  config.pretrained = pretrained
  config.model.update(**ENCODER)
  config.probe_blocks = tuple(range(1, ENCODER["depth"] + 1))
  config.img_size = IMG_SIZE
  config.data.update(source="folder", data_dir=data_dir, eval_split=eval_split, train_examples_per_class=per_class,
                     subset_seed=seed, crop_padding=args.crop_padding if crop_padding is None else crop_padding)
  config.global_batch_size = 32 if per_class else 64
  config.total_steps, config.warmup_steps = args.probe_steps, max(args.probe_steps // 10, 1)
  config.optimizer.name, config.optimizer.base_lr = optimizer or (args.probe_optimizer, args.probe_lr)  # per 256
  config.log_every_steps = max(args.probe_steps // 5, 1)
  config.eval_every_steps = config.checkpoint_every_steps = args.probe_steps
  return config


def mean_std(values):
  return f"{np.mean(values):.1f} ± {np.std(values, ddof=1) if len(values) > 1 else 0.0:.1f}"


def select_recipe(args):
  """--val: every candidate of VAL_FINETUNE_RECIPES / VAL_PROBE_OPTIMIZERS, random-init arm, on the validation split."""
  start = time.time()
  data_dir = os.path.join(args.workdir, "digits_val")
  print("digits validation folder:", digits.write_digits_folder(data_dir, IMG_SIZE, holdout="val"), flush=True)
  rows = []  # (regime, method, candidate, block, seed, top1)
  for seed in args.seeds:
    for regime, per_class in (("few", args.per_class), ("all", 0)):
      for pad in args.val_crop_paddings:
        for recipe in VAL_FINETUNE_RECIPES:
          out = finetune.train_and_evaluate(
              finetune_cfg(args, seed, data_dir, "", per_class, "val", recipe=recipe, crop_padding=pad),
              os.path.join(args.workdir, f"val_finetune_seed{seed}_{regime}_pad{pad}_{recipe}"))
          rows.append((regime, "fine-tune", f"pad {pad}, {recipe}", 0, seed, out["eval_top1"]))
        for name, base_lr in VAL_PROBE_OPTIMIZERS:
          out = linear_probe.train_and_evaluate(
              probe_cfg(args, seed, data_dir, "", per_class, "val", optimizer=(name, base_lr), crop_padding=pad),
              os.path.join(args.workdir, f"val_probe_seed{seed}_{regime}_pad{pad}_{name}{base_lr}"))
          for block in range(1, ENCODER["depth"] + 1):
            rows.append((regime, "linear probe", f"pad {pad}, {name} {base_lr}", block, seed,
                         out[f"eval_top1_block{block}"]))
      print(f"[val seed {seed} {regime}] {time.time() - start:.0f} s", flush=True)
  lines = ["| regime | method | candidate | block | random-init validation top-1 (%) |", "|---|---|---|---|---|"]
  for key in dict.fromkeys(r[:4] for r in rows):
    lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {key[3] or '-'} | "
                 f"{mean_std([r[5] for r in rows if r[:4] == key])} |")
  table = (f"validation ({args.per_class}/class and all of the 1,151-image train part; 287 validation images), "
           f"seeds {args.seeds}, fine-tune {args.finetune_steps_few} / {args.finetune_steps_all} steps, probes "
           f"{args.probe_steps} steps; {(time.time() - start) / 60:.1f} min\n\n" + "\n".join(lines))
  print(table, flush=True)
  with open(os.path.join(args.workdir, "validation.md"), "w") as f:
    f.write(table + "\n")


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  parser.add_argument("--per_class", type=int, default=10, help="labels per class in the few-label regime")
  # Defaults sized from measured step times on 2 shared CPU cores to fit about 30 minutes in all.
  parser.add_argument("--pretrain_steps", type=int, default=800)
  parser.add_argument("--pretrain_per_seed", action="store_true", help="pretrain once per seed (slower)")
  parser.add_argument("--finetune_steps_few", type=int, default=100)
  parser.add_argument("--finetune_steps_all", type=int, default=150)
  parser.add_argument("--probe_steps", type=int, default=100)
  parser.add_argument("--finetune_recipe", choices=sorted(FINETUNE_RECIPES), default="light_lr4")
  parser.add_argument("--crop_padding", type=int, choices=CROP_PADDINGS, default=0)
  parser.add_argument("--probe_optimizer", choices=("lars", "sgd"), default="sgd")
  parser.add_argument("--probe_lr", type=float, default=1.6, help="probe lr per 256 images")
  parser.add_argument("--val_crop_paddings", type=int, nargs="+", default=list(VAL_CROP_PADDINGS))
  parser.add_argument("--val", action="store_true",
                      help="compare the recipe candidates on a validation split of the train split (random init)")
  parser.add_argument("--quick", action="store_true", help="tiny budgets, 2 seeds: checks the script runs")
  args = parser.parse_args()
  if args.quick:
    args.seeds, args.pretrain_steps = args.seeds[:2], 20
    args.finetune_steps_few = args.finetune_steps_all = args.probe_steps = 6
  logging.set_verbosity(logging.WARNING)
  if args.val:
    return select_recipe(args)
  start = time.time()
  data_dir = os.path.join(args.workdir, "digits")
  print("digits folder:", digits.write_digits_folder(data_dir, IMG_SIZE), flush=True)

  results = []  # rows: seed, regime, init, method, block, top1
  for seed in args.seeds:
    pretrain_seed = seed if args.pretrain_per_seed else args.seeds[0]
    pretrained_dir = os.path.join(args.workdir, f"pretrain_seed{pretrain_seed}")
    t0 = time.time()
    pretrain.train_and_evaluate(pretrain_config(args, pretrain_seed, data_dir), pretrained_dir)  # no-op if done
    print(f"[seed {seed}] pretraining (seed {pretrain_seed}): {time.time() - t0:.0f} s", flush=True)
    for regime, per_class in (("few", args.per_class), ("all", 0)):
      for init, pretrained in (("simmim", pretrained_dir), ("scratch", "")):
        tag = f"seed{seed}_{regime}_{init}"
        t0 = time.time()
        out = finetune.train_and_evaluate(finetune_cfg(args, seed, data_dir, pretrained, per_class),
                                          os.path.join(args.workdir, "finetune_" + tag))
        results.append(dict(seed=seed, regime=regime, init=init, method="finetune", block=0, top1=out["eval_top1"]))
        out = linear_probe.train_and_evaluate(probe_cfg(args, seed, data_dir, pretrained, per_class),
                                              os.path.join(args.workdir, "probe_" + tag))
        for block in range(1, ENCODER["depth"] + 1):
          results.append(dict(seed=seed, regime=regime, init=init, method="probe", block=block,
                              top1=out[f"eval_top1_block{block}"]))
        print(f"[{tag}] fine-tune + probe: {time.time() - t0:.0f} s", flush=True)

  lines = [f"| regime | method | SimMIM-pretrained top-1 (%) | random-init top-1 (%) | difference (pp) |",
           "|---|---|---|---|---|"]
  for regime in ("few", "all"):
    for method, block in [("finetune", 0)] + [("probe", b) for b in range(1, ENCODER["depth"] + 1)]:
      pick = lambda init: [r["top1"] for r in results if (r["regime"], r["method"], r["block"], r["init"]) ==
                           (regime, method, block, init)]
      simmim, scratch = pick("simmim"), pick("scratch")
      diff = [a - b for a, b in zip(simmim, scratch)]  # paired by seed
      name = "fine-tune" if method == "finetune" else f"linear probe, block {block}"
      label = f"{args.per_class}/class" if regime == "few" else "all (1,438)"
      lines.append(f"| {label} | {name} | {mean_std(simmim)} | {mean_std(scratch)} | {mean_std(diff)} |")
  elapsed = time.time() - start
  pretrained_once = "per seed" if args.pretrain_per_seed else f"once, seed {args.seeds[0]}"
  header = (f"seeds {args.seeds}; pretraining {args.pretrain_steps} steps x 64 ({pretrained_once}); fine-tune "
            f"{args.finetune_steps_few} (few) / {args.finetune_steps_all} (all) steps, recipe "
            f"{args.finetune_recipe!r}; probes {args.probe_steps} steps, {args.probe_optimizer} lr {args.probe_lr} "
            f"per 256; crop padding {args.crop_padding}; total {elapsed / 60:.1f} min; "
            f"jax {jax.__version__}, {platform.processor() or platform.machine()}, {jax.device_count()} device(s)")
  table = header + "\n\n" + "\n".join(lines)
  print(table, flush=True)
  with open(os.path.join(args.workdir, "results.md"), "w") as f:
    f.write(table + "\n")
  with open(os.path.join(args.workdir, "results.json"), "w") as f:
    json.dump({"args": vars(args), "results": results, "seconds": elapsed}, f, indent=1)


if __name__ == "__main__":
  main()
