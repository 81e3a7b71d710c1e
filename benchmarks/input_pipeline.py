"""Images/s of the tf.data pretraining pipeline against what the train step consumes.

  python benchmarks/input_pipeline.py                      # demo source, the demo config's sizes
  python benchmarks/input_pipeline.py --source folder --num_jpegs 512 --img_size 192

`--source folder` writes `--num_jpegs` JPEGs (crops of the demo photographs at 256-512 px) to a
temporary folder first, unless `--data_dir` names an existing folder. Reports the pipeline's steady-state
img/s (host batches, after `--warmup` batches) and, with `--train_step`, the same config's synthetic
train-step img/s measured in the same run, so `pipeline / train_step` >= 1 means the loop never waits on
input (the loop fetches the next batch while the device computes: prefetch + asynchronous dispatch).
"""

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from simmim_jax import data, default_config  # pylint: disable=g-import-not-at-top
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
  args = parser.parse_args()

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
            "pipeline_img_per_sec": rate, "cpu_count": os.cpu_count(), "load_avg_1m": os.getloadavg()[0]}
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
