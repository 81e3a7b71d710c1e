"""The BENCHMARKS.md table "Will it fit on Cloud TPU?": the pretraining step of each model at the paper's global
batch of 2048, compiled by the TPU compiler for a topology (`simmim-aot --topology`, aot.py), on a CPU machine.

  .venv-tpu/bin/python benchmarks/tpu_compile_table.py                       # every row (hours on 2 cores)
  .venv-tpu/bin/python benchmarks/tpu_compile_table.py --rows=0,5 --timeout=900

Needs libtpu (`pip install -e '.[tpu]'`, in its own venv). Each row is one fresh `simmim-aot` process; a row
past --timeout is reported as not finished. Columns: the compiler's total per chip (arguments + outputs +
temporaries + generated code, less donated aliases), the chip's HBM, whether it fits, the compiler's FLOPs per
chip per step, compile time, and the analytic lower bound of `simmim_jax/train/memory_estimate.py` (model state +
kept activations, from the encoder's fields alone) as a cross-check: how far below the compiler it stays.
FSDP size and remat are chosen per row as what fits best (the smallest FSDP that fits; remat only when needed).
"""

import argparse

from simmim_jax.tools import aot
from simmim_jax import configs, models
from simmim_jax.train import memory_estimate

GLOBAL_BATCH = 2048  # the paper's batch (16 GPUs x 128)

# (model, packaged config, overrides, topology, slices, fsdp, remat); scan_blocks on for the deep Swin stages.
ROWS = [
    ("ViT-B/16 224", "pretrain/vit_base_800ep", {}, "v4:4x4x4", 1, 1, False),
    ("SwinV2-G 192", "pretrain/swinv2_giant_800ep", {}, "v5p:4x4x4", 1, 64, True),
    ("ViT-B/16 224", "pretrain/vit_base_800ep", {}, "v6e:8x8", 2, 1, False),  # multi-slice
    ("ViT-B/16 224", "pretrain/vit_base_800ep", {}, "v5e:16x16", 1, 1, False),
    ("Swin-B 192", "pretrain/swin_base_800ep", {"model.scan_blocks": True}, "v4:4x4x4", 1, 1, False),
    ("Swin-L 192", "pretrain/swin_large_800ep", {"model.scan_blocks": True}, "v5p:4x4x4", 1, 1, False),
    ("Swin-L 192", "pretrain/swin_large_800ep", {"model.scan_blocks": True}, "v6e:8x8", 1, 8, False),
    ("SwinV2-H 192", "pretrain/swinv2_huge_800ep", {"model.scan_blocks": True}, "v5p:4x4x4", 1, 8, True),
    ("SwinV2-H 192", "pretrain/swinv2_huge_800ep", {"model.scan_blocks": True}, "v5e:16x16", 1, 16, True),
    ("SwinV2-G 192", "pretrain/swinv2_giant_800ep", {}, "v4:4x4x4", 1, 64, True),
    ("SwinV2-G 192", "pretrain/swinv2_giant_800ep", {}, "v6e:8x8", 1, 64, True),
    ("SwinV2-G 192", "pretrain/swinv2_giant_800ep", {}, "v5e:16x16", 1, 256, True),
]


def analytic_gib(config_name: str, overrides: dict, chips: int, fsdp: int) -> float:
  """memory_estimate's lower bound per chip for the row (bf16 compute)."""
  config = configs.load(config_name)
  fields = dict(config.model.to_dict())
  fields.update({k.split(".", 1)[1]: v for k, v in overrides.items() if k.startswith("model.")})
  encoder = models.encoder_from_config(fields, config.img_size, "bfloat16")
  parts = memory_estimate.device_bytes(encoder, batch_per_device=GLOBAL_BATCH // chips, compute_bytes=2, fsdp=fsdp)
  return sum(parts.values()) / aot.GIB


def compile_row(config_name, overrides, topology, slices, fsdp, remat, timeout) -> dict:
  args = [f"--config={config_name}", f"--topology={topology}", f"--num_slices={slices}",
          f"--config.global_batch_size={GLOBAL_BATCH}", "--config.dtype=bfloat16", "--config.mesh.data=-1",
          f"--config.mesh.fsdp={fsdp}", f"--config.model.remat={remat}",
          *(f"--config.{k}={v}" for k, v in overrides.items())]
  return aot.compile_in_fresh_process(args, timeout)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rows", default="", help="comma-separated row indices (default: all)")
  parser.add_argument("--timeout", type=float, default=1200, help="seconds per row")
  args = parser.parse_args()
  chosen = [int(i) for i in args.rows.split(",")] if args.rows else range(len(ROWS))
  print("| # | model | topology | chips | FSDP | remat | GiB per chip | HBM | fits | TFLOP per chip per step "
        "| compile (s) | analytic lower bound GiB (compiler / analytic) |")
  print("|---|---|---|---|---|---|---|---|---|---|---|---|")
  for i in chosen:
    model, config_name, overrides, topology, slices, fsdp, remat = ROWS[i]
    parsed = aot.parse_topology(topology)
    chips = parsed.chips * slices
    where = f"{topology}" + (f" x {slices} slices" if slices > 1 else "")
    analytic = analytic_gib(config_name, overrides, chips, fsdp)
    row = compile_row(config_name, overrides, topology, slices, fsdp, remat, args.timeout)
    hbm = parsed.hbm_bytes // aot.GIB
    if "error" in row and row.get("gib") is None:
      print(f"| {i} | {model} | {where} | {chips} | {fsdp} | {remat} | {row['error']} | {hbm} | | | "
            f"| {analytic:.2f} |", flush=True)
      continue
    gib = f"{row['gib']:.2f}" if row["gib"] is not None else "> HBM (compiler OOM)"
    ratio = f" ({row['gib'] / analytic:.1f}x)" if row["gib"] else ""
    tflop = f"{row['tflop']:.3g}" if row["tflop"] else ""
    print(f"| {i} | {model} | {where} | {chips} | {fsdp} | {remat} | {gib} | {hbm} | "
          f"{'yes' if row['fits'] else 'no'} | {tflop} | {row['compile_s']:.0f} | {analytic:.2f}{ratio} |", flush=True)


if __name__ == "__main__":
  main()
