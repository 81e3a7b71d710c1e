"""Memory per chip for SimMIM pretraining: an analytic estimate, checked against XLA where it compiles.

  python benchmarks/memory_per_chip.py                 # the table (analytic; seconds)
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/memory_per_chip.py --check
      # + XLA's memory_analysis of the real ViT-B and Swin-L steps on 8 fake devices (minutes on CPU)

Model state: float32 parameters, gradients and two AdamW moments = 16 bytes per parameter, divided over
the fsdp axis (config.mesh.fsdp), plus 4 bytes per parameter that XLA's temporaries hold unsharded (the
--check compiles show temporaries of about the full float32 gradient size: gathered weights and gradients
before their reduce-scatter). Activations kept for the backward pass, per image, per block, in the
compute dtype: about 16 values per token and channel (norm inputs, q/k/v, attention output, projection,
MLP hidden before and after GELU, residuals) plus the attention probabilities (heads x window tokens^2 per
token window); with remat only each block's input is kept (and one block is live at a time).
This is an estimate: XLA fuses and reuses buffers, so the measured temporaries are the reference.
"""

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

from simmim_jax.tools import aot
from simmim_jax.configs import default_config
from simmim_jax import models
from simmim_jax.train import pretrain, sharding

MODELS = {  # name: (registry name, img_size, encoder_stride)
    "ViT-B/16": ("vit_base_patch16", 224),
    "Swin-L": ("swin_large_patch4_window12", 192),
    "SwinV2-H": ("swinv2_huge_patch4_window12", 192),
    "SwinV2-G": ("swinv2_giant_patch4_window12", 192),
}
CHIPS_GIB = {"TPU v4": 32, "TPU v5e": 16, "TPU v5p": 95, "TPU v6e": 32, "A100 80GB": 80, "H100": 80,
             "H200": 141}
GIB = 2 ** 30


def parameter_count(name: str, img_size: int) -> int:
  encoder = models.create_encoder(name, img_size=img_size)
  model = models.SimMIM(encoder=encoder, encoder_stride=encoder.output_stride)
  grid = img_size // encoder.patch_size
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, img_size, img_size, 3)),
                          jnp.zeros((1, grid, grid), jnp.int32))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))


def block_geometry(name: str, img_size: int) -> list[tuple[int, int, int, int]]:
  """(tokens, channels, heads, tokens per attention window) for every block."""
  encoder = models.create_encoder(name, img_size=img_size)
  if hasattr(encoder, "depths"):
    blocks = []
    for stage, depth in enumerate(encoder.depths):
      resolution = img_size // encoder.patch_size // 2 ** stage
      window = min(encoder.window_size, resolution)
      blocks += [(resolution ** 2, encoder.embed_dim * 2 ** stage, encoder.num_heads[stage], window ** 2)] * depth
    return blocks
  tokens = (img_size // encoder.patch_size) ** 2 + 1
  return [(tokens, encoder.embed_dim, encoder.num_heads, tokens)] * encoder.depth


def activation_bytes_per_image(name: str, img_size: int, bytes_per_value: int, remat: bool) -> float:
  blocks = block_geometry(name, img_size)
  if remat:
    return sum(t * c for t, c, _, _ in blocks) * bytes_per_value + max(
        (16 * t * c + h * t * w) * bytes_per_value for t, c, h, w in blocks)
  return sum((16 * t * c + h * t * w) * bytes_per_value for t, c, h, w in blocks)


def table() -> list[dict]:
  rows = []
  for label, (name, img_size) in MODELS.items():
    params = parameter_count(name, img_size)
    state = 16 * params
    rows.append({
        "model": label, "params_M": round(params / 1e6, 1), "state_GiB": round(state / GIB, 2),
        "act_GiB_per_img_bf16": round(activation_bytes_per_image(name, img_size, 2, False) / GIB, 3),
        "act_GiB_per_img_bf16_remat": round(activation_bytes_per_image(name, img_size, 2, True) / GIB, 3),
    })
  return rows


def max_batch(row: dict, chip_gib: float, fsdp: int, remat: bool) -> int:
  unsharded_temporaries = row["state_GiB"] / 4  # 4 of the 16 bytes per parameter
  free = chip_gib * 0.9 - row["state_GiB"] / fsdp - unsharded_temporaries  # 10% for workspace, fragmentation
  per_image = row["act_GiB_per_img_bf16_remat" if remat else "act_GiB_per_img_bf16"]
  return max(int(free // per_image), 0)


def check(name: str, img_size: int) -> dict:
  """XLA's per-device memory for the real float32 step, batch 8 over an fsdp mesh of 8 fake devices."""
  config = default_config.get_config()
  config.model.name, config.img_size, config.global_batch_size = name, img_size, 8
  config.mesh.data, config.mesh.fsdp = 1, 8
  compiled = aot.compile_step(pretrain.build_step(config, sharding.create_mesh(config.mesh, jax.devices()[:8])))
  memory = aot.memory_summary(compiled)
  params = parameter_count(name, img_size)
  return {"model": name, "measured_argument_MiB": memory["argument_size_in_bytes"] / 2 ** 20,
          "analytic_state_MiB_per_device": 12 * params / 8 / 2 ** 20,  # params + AdamW moments (args)
          "measured_temp_MiB": memory["temp_size_in_bytes"] / 2 ** 20,
          "analytic_activations_MiB_f32_1img": activation_bytes_per_image(name, img_size, 4, False) / 2 ** 20}


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--check", action="store_true", help="compile ViT-B and Swin-L for 8 fake devices")
  args = parser.parse_args()
  rows = table()
  print("| model | params | AdamW state (f32) | activations / image (bf16) | with remat |")
  print("|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['model']} | {r['params_M']} M | {r['state_GiB']} GiB | {r['act_GiB_per_img_bf16']} GiB | "
          f"{r['act_GiB_per_img_bf16_remat']} GiB |")
  print("\nLargest batch per chip (bf16 compute, remat off / on), by fsdp size:")
  print("| model | chip | fsdp=1 | fsdp=8 | fsdp=64 |")
  print("|---|---|---|---|---|")
  for r in rows:
    for chip, gib in CHIPS_GIB.items():
      cells = [f"{max_batch(r, gib, k, False)} / {max_batch(r, gib, k, True)}" for k in (1, 8, 64)]
      print(f"| {r['model']} | {chip} ({gib} GiB) | " + " | ".join(cells) + " |")
  if args.check:
    for label in ("ViT-B/16", "Swin-L"):
      print(json.dumps(check(*MODELS[label])))


if __name__ == "__main__":
  main()
