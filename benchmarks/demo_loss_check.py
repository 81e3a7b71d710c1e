"""Does the real pretraining step learn on this device? N steps on one fixed batch of demo images.

The step is `pretrain.make_train_step` (fresh random masks every step, AdamW, the config's schedule), the
model and recipe `simmim_jax/configs/demo.py` (or `--config`), the batch the first `batch` demo crops (scikit-image's
bundled photographs; no TensorFlow, no network). The loss must fall: the mean of the last 10 steps below
`--max_ratio` x the mean of the first 5. Prints one JSON line; exit 1 when the loss does not fall or is not
finite. Used by `benchmarks/gpu_check.sh`; runs on CPU too:

  python benchmarks/demo_loss_check.py --steps 50 --dtype bfloat16
"""

import argparse
import json
import sys
import time


import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from simmim_jax import configs  # pylint: disable=g-import-not-at-top,wrong-import-position
from simmim_jax.train import optim, pretrain
from simmim_jax.data import demo_images, normalization  # pylint: disable=wrong-import-position



def load_config(name_or_path: str):
  return configs.load(name_or_path)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="demo", help="a packaged config name or a config file")
  parser.add_argument("--steps", type=int, default=50)
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
  parser.add_argument("--attention_impl", choices=("einsum", "dot_product_attention"), default="einsum")
  parser.add_argument("--max_ratio", type=float, default=0.9,
                      help="pass when mean(last 10 losses) < max_ratio * mean(first 5)")
  args = parser.parse_args(argv)
  if args.steps < 15:
    print(f"demo_loss_check: --steps={args.steps}: use at least 15 (first 5 vs last 10)", file=sys.stderr)
    return 2

  config = load_config(args.config)
  with config.unlocked():
    config.dtype = args.dtype
    config.global_batch_size = args.batch
    config.model.attention_impl = args.attention_impl
  model = pretrain.build_model(config)
  tx, schedule = optim.create_optimizer(config)
  state = jax.jit(lambda key: pretrain.init_train_state(model, tx, key))(jax.random.key(config.seed))
  images = jax.device_put(normalization.normalize(demo_images.make_demo_images(args.batch, config.img_size)))
  step = jax.jit(pretrain.make_train_step(config, model, tx, schedule), donate_argnums=(0,))
  key = jax.random.key(1)
  losses = []
  start = time.perf_counter()
  for _ in range(args.steps):
    state, step_metrics = step(state, images, key)
    losses.append(float(step_metrics["loss"]))
  seconds = time.perf_counter() - start
  first, last = float(np.mean(losses[:5])), float(np.mean(losses[-10:]))
  finite = bool(np.all(np.isfinite(losses)))
  passed = finite and last < args.max_ratio * first
  print(json.dumps({"case": "demo_loss", "model": config.model.name, "img_size": config.img_size,
                    "dtype": args.dtype, "attention_impl": args.attention_impl, "batch": args.batch,
                    "steps": args.steps, "first5_loss": first, "last10_loss": last, "ratio": last / first,
                    "max_ratio": args.max_ratio, "passed": passed, "seconds": seconds,
                    "device_kind": jax.devices()[0].device_kind, "losses": [round(x, 5) for x in losses]}),
        flush=True)
  if not passed:
    print(f"demo_loss_check: the loss did not fall: first 5 steps {first:.4f}, last 10 {last:.4f} "
          f"(needs < {args.max_ratio} x){'' if finite else '; non-finite losses'}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
