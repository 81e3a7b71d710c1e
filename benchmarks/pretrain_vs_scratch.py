"""What does SimMIM pretraining buy? SimMIM-pretrained vs randomly initialized encoder, same budgets.

Data: scikit-learn's handwritten digits (1,797 real 8x8 scans, 10 classes; `simmim_jax.data.digits`), 32 px,
a fixed stratified 80/20 train/test split. The test split is never used for pretraining, and no choice
below was made by looking at test accuracy of one arm only.

Protocol (all through the package's own entry points, in-process):
  1. SimMIM pretraining of a small official-layout ViT (patch 4, width 64, depth 4, 4 heads;
     mask patch 8, ratio 0.6) on the *unlabelled* train images (`simmim_jax.pretrain`): once with seed 0
     by default (so the seed spread below covers label subsets, head init, data order and augmentation,
     not pretraining variance), or once per seed with --pretrain_per_seed.
  2. For each seed and each regime - few labels (10 per class, a seeded subset) and all labels (1,438):
     a. fine-tuning (`simmim_jax.finetune`, the official recipe: AdamW + layer decay, warmup + cosine,
        RandAugment, random erasing, mixup / cutmix, label smoothing), from the pretrained encoder and from
        random initialization, same steps, same data order, same augmentation draws;
     b. linear probes of every block (`simmim_jax.linear_probe`, MAE protocol) on both encoders.
  3. Report the *final* test top-1 (not the best over evaluations, which would select on the test set),
     mean +- std over seeds, as a Markdown table (also written to <workdir>/results.md and results.json).

Run (about 30 minutes on 2 CPU cores with the defaults; --quick runs a reduced version in a few minutes to
check that everything works; its numbers mean nothing):
  .venv/bin/pip install -e '.[data,benchmarks]'
  .venv/bin/python benchmarks/pretrain_vs_scratch.py --workdir=/tmp/pvs
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

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from simmim_jax import default_config, finetune, finetune_config, linear_probe, pretrain  # noqa: E402
from simmim_jax.data import digits  # noqa: E402

ENCODER = dict(name="vit_base_patch16", patch_size=4, embed_dim=64, depth=4, num_heads=4)
IMG_SIZE = 32


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


def finetune_cfg(args, seed, data_dir, pretrained, per_class):
  config = finetune_config.get_config()
  config.seed = seed
  config.pretrained = pretrained
  config.model.update(**ENCODER)
  config.img_size = IMG_SIZE
  config.data.update(source="folder", data_dir=data_dir, eval_split="test", train_examples_per_class=per_class,
                     subset_seed=seed, crop_scale=(0.35, 1.0))  # 0.08 of an 8x8 digit is a blank patch
  steps = args.finetune_steps_few if per_class else args.finetune_steps_all
  config.global_batch_size = 32 if per_class else 64
  config.total_steps, config.warmup_steps = steps, max(steps // 10, 1)
  config.optimizer.update(base_lr=5e-3, warmup_lr=1e-6, min_lr=1e-6, layer_decay=0.75)
  config.log_every_steps = max(steps // 5, 1)
  config.eval_every_steps = config.checkpoint_every_steps = steps
  return config


def probe_cfg(args, seed, data_dir, pretrained, per_class):
  config = finetune_config.get_linear_probe_config()
  config.seed = seed
  config.pretrained = pretrained
  config.model.update(**ENCODER)
  config.probe_blocks = tuple(range(1, ENCODER["depth"] + 1))
  config.img_size = IMG_SIZE
  config.data.update(source="folder", data_dir=data_dir, eval_split="test", train_examples_per_class=per_class,
                     subset_seed=seed, crop_scale=(0.35, 1.0))
  config.global_batch_size = 32 if per_class else 64
  config.total_steps, config.warmup_steps = args.probe_steps, max(args.probe_steps // 10, 1)
  config.optimizer.base_lr = 0.1  # per 256 images (MAE)
  config.log_every_steps = max(args.probe_steps // 5, 1)
  config.eval_every_steps = config.checkpoint_every_steps = args.probe_steps
  return config


def mean_std(values):
  return f"{np.mean(values):.1f} ± {np.std(values, ddof=1) if len(values) > 1 else 0.0:.1f}"


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
  parser.add_argument("--quick", action="store_true", help="tiny budgets, 2 seeds: checks the script runs")
  args = parser.parse_args()
  if args.quick:
    args.seeds, args.pretrain_steps = args.seeds[:2], 20
    args.finetune_steps_few = args.finetune_steps_all = args.probe_steps = 6
  logging.set_verbosity(logging.WARNING)
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
  header = (f"seeds {args.seeds}; pretraining {args.pretrain_steps} steps x 64 "
            f"({'per seed' if args.pretrain_per_seed else 'once, seed ' + str(args.seeds[0])}); fine-tune {args.finetune_steps_few} "
            f"(few) / {args.finetune_steps_all} (all) steps; probes {args.probe_steps} steps; total {elapsed / 60:.1f} min; "
            f"jax {jax.__version__}, {platform.processor() or platform.machine()}, {jax.device_count()} device(s)")
  table = header + "\n\n" + "\n".join(lines)
  print(table, flush=True)
  with open(os.path.join(args.workdir, "results.md"), "w") as f:
    f.write(table + "\n")
  with open(os.path.join(args.workdir, "results.json"), "w") as f:
    json.dump({"args": vars(args), "results": results, "seconds": elapsed}, f, indent=1)


if __name__ == "__main__":
  main()
