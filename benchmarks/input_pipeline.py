"""Images/s of the tf.data pretraining pipeline against what the train step consumes.

  python benchmarks/input_pipeline.py                      # demo source, the demo config's sizes
  python benchmarks/input_pipeline.py --source folder --num_jpegs 512 --img_size 192

`--source folder` writes `--num_jpegs` JPEGs (crops of the demo photographs at 256-512 px) to a
temporary folder first, unless `--data_dir` names an existing folder. Reports the pipeline's steady-state
img/s (host batches, after `--warmup` batches) and, with `--train_step`, the same config's synthetic
train-step img/s measured in the same run, so `pipeline / train_step` >= 1 means the loop never waits on
input (the loop fetches the next batch while the device computes: prefetch + asynchronous dispatch).

`--loop` measures the issue's target directly: the demo config's real train step (simmim_jax/configs/demo.py: official
ViT layout, width 128, depth 4, 32 px, batch 64) run as the training loop runs it - batches from the
pipeline, put on the device with `data.make_global_batch`, dispatched asynchronously - against the same
compiled step on one device-resident batch, in interleaved rounds; `real_over_synthetic` is the ratio of
img/s (target >= 0.9). On a CPU-only machine the pipeline and the step share the same cores.

  python benchmarks/input_pipeline.py --loop --rounds 3 --loop_steps 15
"""

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

from simmim_jax.train import host_memory  # pylint: disable=g-import-not-at-top

# Before TensorFlow and JAX are imported: the allocator setting of simmim-pretrain (simmim_jax/train/host_memory.py).
KEEP_FREED_MEMORY = (__name__ == "__main__" and "--no_host_memory_defaults" not in sys.argv
                     and host_memory.configure_for_cpu_only())

from simmim_jax import data  # pylint: disable=g-import-not-at-top,wrong-import-position
from simmim_jax.configs import default_config
from simmim_jax.data import demo_images  # pylint: disable=g-import-not-at-top


def write_jpegs(directory: str, count: int) -> None:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  photos = demo_images.load_demo_photos()
  for i in range(count):
    photo = photos[i % len(photos)].convert("RGB")
    side = int(rng.integers(256, 513))
    Image.fromarray(np.asarray(photo.resize((side, side)))).save(os.path.join(directory, f"{i:05d}.jpg"),
                                                                  quality=90)


def pipeline_rate(data_config, img_size: int, batch: int, warmup: int, batches: int) -> float:
  iterator = data.create_pretrain_iterator(data_config, image_size=img_size, global_batch_size=batch, seed=0)
  for _ in range(warmup):
    next(iterator)
  start = time.perf_counter()
  for _ in range(batches):
    next(iterator)
  return batches * batch / (time.perf_counter() - start)


def loop_rates(rounds: int, steps: int) -> dict:
  """img/s of the demo config's train step fed by the pipeline vs on one fixed device batch."""
  import jax  # pylint: disable=g-import-not-at-top
  from simmim_jax import configs  # pylint: disable=g-import-not-at-top
  from simmim_jax.train import optim, pretrain, sharding

  config = configs.load("demo")
  model = pretrain.build_model(config)
  tx, schedule = optim.create_optimizer(config)
  mesh = sharding.create_mesh(config.mesh)
  data_sharding = sharding.batch_sharding(mesh)
  state = jax.jit(lambda key: pretrain.init_train_state(model, tx, key))(jax.random.key(0))
  step_fn = jax.jit(pretrain.make_train_step(config, model, tx, schedule), donate_argnums=(0,))
  batches = data.create_pretrain_iterator(config.data, image_size=config.img_size,
                                          global_batch_size=config.global_batch_size, seed=0)
  fixed = data.make_global_batch(next(batches), data_sharding)["image"]
  key = jax.random.key(1)

  def run(real: bool) -> float:
    nonlocal state
    start = time.perf_counter()
    for _ in range(steps):  # as pretrain.train_and_evaluate: no host sync inside the loop
      images = data.make_global_batch(next(batches), data_sharding)["image"] if real else fixed
      state, step_metrics = step_fn(state, images, key)
    jax.block_until_ready((state, step_metrics))
    return steps * config.global_batch_size / (time.perf_counter() - start)

  run(True), run(False)  # compile and warm up
  real, synthetic = [], []
  for _ in range(rounds):
    real.append(run(True))
    synthetic.append(run(False))
  real_rate, synthetic_rate = float(np.median(real)), float(np.median(synthetic))
  return {"loop_config": "demo", "real_img_per_sec": real_rate, "synthetic_img_per_sec": synthetic_rate,
          "real_over_synthetic": real_rate / synthetic_rate, "rounds": rounds, "steps_per_round": steps}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--source", choices=("demo", "folder"), default="demo")
  parser.add_argument("--data_dir")
  parser.add_argument("--num_jpegs", type=int, default=512)
  parser.add_argument("--img_size", type=int, default=32)
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--warmup", type=int, default=5)
  parser.add_argument("--batches", type=int, default=30)
  parser.add_argument("--train_step", choices=("tiny", "vit_b16"), help="also time this preset's step")
  parser.add_argument("--loop", action="store_true", help="real-data vs synthetic-data training loop (demo)")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--loop_steps", type=int, default=15)
  parser.add_argument("--no_host_memory_defaults", action="store_true",
                      help="glibc's default allocator (read from sys.argv before TensorFlow is imported)")
  args = parser.parse_args()
  if args.loop:
    result = loop_rates(args.rounds, args.loop_steps)
    result.update(cpu_count=os.cpu_count(), load_avg_1m=os.getloadavg()[0], keep_freed_memory=KEEP_FREED_MEMORY)
    print(json.dumps(result), flush=True)
    return

  data_config = default_config.get_config().data
  data_config.source = args.source
  data_config.num_demo_images = 2048
  with tempfile.TemporaryDirectory() as tmp:
    if args.source == "folder":
      data_config.data_dir = args.data_dir or tmp
      if not args.data_dir:
        write_jpegs(tmp, args.num_jpegs)
    rate = pipeline_rate(data_config, args.img_size, args.batch, args.warmup, args.batches)
  result = {"source": args.source, "img_size": args.img_size, "batch": args.batch,
            "pipeline_img_per_sec": rate, "cpu_count": os.cpu_count(), "load_avg_1m": os.getloadavg()[0],
            "keep_freed_memory": KEEP_FREED_MEMORY}
  if args.train_step:
    import train_throughput  # pylint: disable=g-import-not-at-top
    spec = dict(train_throughput.PRESETS[args.train_step], img_size=args.img_size, batch=args.batch)
    step = train_throughput.JaxStep(spec)
    step.run(2)
    times = sorted(step.run(6))
    result["train_step_img_per_sec"] = args.batch / times[len(times) // 2]
    result["pipeline_over_train_step"] = rate / result["train_step_img_per_sec"]
  print(json.dumps(result), flush=True)


if __name__ == "__main__":
  main()
