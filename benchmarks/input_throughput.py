"""Images/s per host core of the pretraining input (decode + RandomResizedCrop + flip + normalize) on JPEGs of
ImageNet's size, tf.data (source="folder") against Grain + ArrayRecord (source="array_record"), and how many host
cores one TPU chip needs.

  python benchmarks/input_throughput.py                         # 256 JPEGs, 192 and 224 px, MFU 0.5
  python benchmarks/input_throughput.py --num_jpegs 512 --mfu 0.4 --json results.json

JPEGs: crops of the embedded demo photographs (simmim_jax/data/demo_images.py, no download) at random sizes
around ImageNet's mean (about 400 x 350 px), with mild noise (NOISE), each saved at the JPEG quality whose file
is closest to 110 KB.
They are written once as a folder and as ArrayRecord shards (simmim-prepare's `prepare`). Every measurement
runs in its own process pinned to `cores` CPUs (os.sched_setaffinity; Grain's worker processes inherit it):
tf.data's parallel map on 1 and 2 cores, Grain with 1 worker on 1 core and 2 workers on 2 cores, after `--warmup`
batches (worker start-up and tf.function tracing excluded). Two rates: img/s per core = wall-clock img/s (the best
of `--repeats` windows of `--batches` batches) / cores, and img per CPU-second = images / the CPU time of the
measuring process and its Grain workers (/proc), the rate of one fully used core, which other load on a shared
machine does not lower.

Cores per chip: a chip at `--mfu` of its bf16 peak (Cloud TPU docs: v4 275 TFLOP/s, v5p 459 TFLOP/s) consumes
peak x MFU / (model FLOPs per training image, simmim_jax.models.flops: 3 x forward) images/s; divided by the
measured img per CPU-second of the Grain path (1 worker) at the model's resolution (ViT-B/16 at 224, Swin-B at 192, the
official SimMIM pretraining sizes), that is the host cores one chip needs, against the vCPUs per chip of a TPU VM
host (v4: 240 vCPUs for 4 chips; v5p: 208 for 4, cloud.google.com/tpu/docs/v5p).
"""

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from simmim_jax.storage import safe_files

TARGET_BYTES = 110_000  # ImageNet's mean JPEG (~110 KB)
NOISE = 4.0  # grey levels of sensor-like noise: the demo photos are smoother than ImageNet's, and smaller as JPEGs
CHIPS = {"v4": {"peak": 275e12, "vcpus_per_host": 240, "chips_per_host": 4},
         "v5p": {"peak": 459e12, "vcpus_per_host": 208, "chips_per_host": 4}}
MODELS = {"ViT-B/16": ("vit_base_patch16", 224, 16), "Swin-B": ("swin_base_patch4_window6", 192, 32)}


def write_jpegs(folder: str, count: int, seed: int = 0) -> dict:
  """`count` JPEGs of ImageNet-like size; returns their mean width, height and bytes."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from simmim_jax.data import demo_images  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(seed)
  photos = [p.convert("RGB") for p in demo_images.load_demo_photos()]
  sizes, total = [], 0
  for i in range(count):
    photo = photos[i % len(photos)]
    width, height = int(rng.integers(330, 500)), int(rng.integers(280, 420))
    scale = max(width / photo.width, height / photo.height) * float(rng.uniform(1.0, 1.6))
    big = photo.resize((int(photo.width * scale) + 1, int(photo.height * scale) + 1), Image.BICUBIC)
    left, top = int(rng.integers(0, big.width - width + 1)), int(rng.integers(0, big.height - height + 1))
    crop = np.asarray(big.crop((left, top, left + width, top + height)), np.float32)
    image = Image.fromarray(np.clip(crop + rng.normal(0, NOISE, crop.shape), 0, 255).astype(np.uint8))
    best = min((_encode(image, q) for q in (85, 90, 94, 97, 99, 100)), key=lambda data: abs(len(data) - TARGET_BYTES))
    safe_files.write_atomic(os.path.join(folder, f"{i:05d}.jpg"), best)
    sizes.append((width, height))
    total += len(best)
  sizes = np.asarray(sizes)
  return {"mean_width": float(sizes[:, 0].mean()), "mean_height": float(sizes[:, 1].mean()),
          "mean_kb": total / count / 1000}


def _encode(image, quality: int) -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, "JPEG", quality=quality)
  return buffer.getvalue()


def cpu_seconds() -> float:
  """User + system CPU seconds of this process and its live children (Grain's workers), from /proc."""
  me, total = os.getpid(), 0
  for pid in (p for p in os.listdir("/proc") if p.isdigit()):
    try:
      with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()  # after the command name: state, ppid, ...
    except OSError:
      continue
    if int(pid) == me or int(fields[1]) == me:
      total += int(fields[11]) + int(fields[12])  # utime, stime (clock ticks)
  return total / os.sysconf("SC_CLK_TCK")


def measure(source: str, data_dir: str, image_size: int, cores: int, workers: int, batch: int, warmup: int,
            batches: int, repeats: int) -> tuple[float, float]:
  """(img/s, img per CPU-second) of this process's pretraining iterator, pinned to `cores` CPUs (call in a fresh
  process). img/s: the best of `repeats` windows of `batches` batches (on a shared machine the best window is the
  least disturbed); img per CPU-second: over all windows, the CPU time of this process and its Grain workers,
  which other load on the machine does not inflate: the rate of one fully used core."""
  os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[:cores]))
  import ml_collections  # pylint: disable=g-import-not-at-top
  from simmim_jax import data  # pylint: disable=g-import-not-at-top

  config = ml_collections.ConfigDict(dict(
      source=source, name="", data_dir=data_dir, split="train", crop_scale=(0.67, 1.0), crop_ratio=(3 / 4, 4 / 3),
      horizontal_flip=True, shuffle_buffer_size=1000, num_demo_images=1, strict=False, max_image_pixels=0,
      grain_workers=workers))
  iterator = data.create_pretrain_iterator(config, image_size=image_size, global_batch_size=batch, seed=0)
  for _ in range(warmup):
    next(iterator)
  rates, cpu_start = [], cpu_seconds()
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(batches):
      next(iterator)
    rates.append(batches * batch / (time.perf_counter() - start))
  return max(rates), repeats * batches * batch / (cpu_seconds() - cpu_start)


def run_measurement(args, source, data_dir, image_size, cores, workers) -> tuple[float, float]:
  command = [sys.executable, __file__, "--measure", json.dumps(
      dict(source=source, data_dir=data_dir, image_size=image_size, cores=cores, workers=workers, batch=args.batch,
           warmup=args.warmup, batches=args.batches, repeats=args.repeats))]
  result = subprocess.run(command, capture_output=True, text=True, check=False,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
  if result.returncode:
    raise RuntimeError(f"{source} at {image_size} px failed: {result.stderr[-2000:]}")
  return tuple(json.loads(result.stdout.strip().splitlines()[-1]))


def cores_per_chip(per_core_rates: dict[int, float], mfu: float) -> list[dict]:
  """For each model and chip: img/s per chip at `mfu`, and the host cores that many images need."""
  from simmim_jax import models  # pylint: disable=g-import-not-at-top
  from simmim_jax.models import flops  # pylint: disable=g-import-not-at-top

  rows = []
  for label, (name, size, stride) in MODELS.items():
    model = models.SimMIM(encoder=models.create_encoder(name, img_size=size), encoder_stride=stride)
    per_image = flops.train_flops_per_image(model)
    for chip, spec in CHIPS.items():
      images = spec["peak"] * mfu / per_image
      rows.append({"model": label, "img_size": size, "gflops_per_image": per_image / 1e9, "chip": chip,
                   "img_per_s_per_chip": images, "cores_needed": images / per_core_rates[size],
                   "vcpus_per_chip": spec["vcpus_per_host"] / spec["chips_per_host"]})
  return rows


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--num_jpegs", type=int, default=256)
  parser.add_argument("--sizes", type=int, nargs="+", default=[192, 224])
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--batches", type=int, default=4)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--mfu", type=float, default=0.5)
  parser.add_argument("--json", default="")
  parser.add_argument("--measure", default="", help=argparse.SUPPRESS)  # internal: one pinned measurement
  args = parser.parse_args()
  if args.measure:
    print(json.dumps(measure(**json.loads(args.measure))))
    return

  from simmim_jax.tools import prepare  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory() as tmp:
    images, shards = os.path.join(tmp, "images"), os.path.join(tmp, "shards")
    os.makedirs(images)
    jpegs = write_jpegs(images, args.num_jpegs)
    prepare.prepare(images, shards, "train", num_shards=4, progress=io.StringIO())
    print(f"{args.num_jpegs} JPEGs, mean {jpegs['mean_width']:.0f} x {jpegs['mean_height']:.0f} px, "
          f"{jpegs['mean_kb']:.0f} KB", flush=True)
    runs = []
    for size in args.sizes:
      for label, source, data_dir, cores, workers in (
          ("tf.data (folder)", "folder", images, 1, 0), ("tf.data (folder)", "folder", images, 2, 0),
          ("Grain + ArrayRecord", "array_record", shards, 1, 1),
          ("Grain + ArrayRecord", "array_record", shards, 2, 2)):
        rate, per_cpu_second = run_measurement(args, source, data_dir, size, cores, workers)
        runs.append({"path": label, "img_size": size, "cores": cores, "grain_workers": workers,
                     "img_per_s": rate, "img_per_s_per_core": rate / cores, "img_per_cpu_s": per_cpu_second})
        print(f"{label:20s} {size} px  cores {cores}  workers {workers}:  {rate:7.1f} img/s  "
              f"{rate / cores:7.1f} img/s/core  {per_cpu_second:7.1f} img/CPU-s  (load {os.getloadavg()[0]:.1f})",
              flush=True)
  grain_one_core = {r["img_size"]: r["img_per_cpu_s"] for r in runs
                    if r["path"].startswith("Grain") and r["cores"] == 1}
  chips = cores_per_chip(grain_one_core, args.mfu) if set(grain_one_core) >= {192, 224} else []
  for row in chips:
    print(f"{row['model']:9s} {row['chip']:4s}: {row['gflops_per_image']:.0f} GFLOP/img, "
          f"{row['img_per_s_per_chip']:.0f} img/s/chip at MFU {args.mfu} -> {row['cores_needed']:.0f} cores "
          f"(host has {row['vcpus_per_chip']:.0f} vCPUs per chip)")
  cpu = next((line.split(":", 1)[1].strip() for line in subprocess.run(
      ["lscpu"], capture_output=True, text=True, check=False).stdout.splitlines() if line.startswith("Model name")),
             "unknown")
  result = {"cpu": cpu, "jpegs": jpegs, "runs": runs, "mfu": args.mfu, "cores_per_chip": chips}
  if args.json:
    safe_files.write_atomic(args.json, safe_files.json_text(result, indent=1))


if __name__ == "__main__":
  main()
