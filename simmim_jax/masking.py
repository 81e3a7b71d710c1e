"""Random block masking (SimMIM §3.1; official `data/data_simmim.py::MaskGenerator`).

The image is divided into `mask_patch_size`-sized cells; exactly `ceil(cells * mask_ratio)` cells per image
are masked (a random permutation, not Bernoulli: every image masks the same number of cells), and each
cell is upsampled to the `(mask_patch_size // model_patch_size)**2` model patches it covers.
Defaults of the paper: mask patch 32, ratio 0.6 (so ViT 224/16 masks 30 of 49 cells, Swin 192/4 22 of 36).

Unlike the official code (numpy's global RNG inside loader workers) every draw takes a `jax.random` key,
so masks are reproducible, jittable and independent of how the batch is split over hosts.
"""

import math

import jax
import jax.numpy as jnp


def mask_geometry(*, input_size: int, mask_patch_size: int, model_patch_size: int,
                  mask_ratio: float) -> tuple[int, int, int]:
  """Validates the sizes and returns (cells per side, model patches per cell side, masked cells)."""
  for name, value in (("input_size", input_size), ("mask_patch_size", mask_patch_size),
                      ("model_patch_size", model_patch_size)):
    if not isinstance(value, int) or value <= 0:
      raise ValueError(f"{name} must be a positive integer; got {value!r}")
  if input_size % mask_patch_size:
    raise ValueError(f"input_size={input_size} must be divisible by mask_patch_size={mask_patch_size}")
  if mask_patch_size % model_patch_size:
    raise ValueError(f"mask_patch_size={mask_patch_size} must be divisible by "
                     f"model_patch_size={model_patch_size}")
  if not 0.0 < mask_ratio < 1.0:
    raise ValueError(f"mask_ratio={mask_ratio!r} must lie strictly between 0 and 1")
  cells_per_side = input_size // mask_patch_size
  scale = mask_patch_size // model_patch_size
  mask_count = int(math.ceil(cells_per_side ** 2 * mask_ratio))  # official: int(np.ceil(...))
  return cells_per_side, scale, mask_count


def random_mask(key: jax.Array, batch_size: int, *, input_size: int, mask_patch_size: int = 32,
                model_patch_size: int, mask_ratio: float = 0.6) -> jax.Array:
  """Draws SimMIM block masks at the model-patch grid.

  Returns int32 `[batch_size, input_size // model_patch_size, input_size // model_patch_size]`,
  1 = masked. Deterministic in `key`; every image gets its own permutation.
  """
  cells_per_side, scale, mask_count = mask_geometry(
      input_size=input_size, mask_patch_size=mask_patch_size, model_patch_size=model_patch_size,
      mask_ratio=mask_ratio)
  num_cells = cells_per_side ** 2
  # A random permutation has exactly `mask_count` entries below `mask_count`, at uniformly random cells.
  permutations = jax.vmap(lambda k: jax.random.permutation(k, num_cells))(
      jax.random.split(key, batch_size))
  cells = (permutations < mask_count).astype(jnp.int32).reshape(batch_size, cells_per_side, cells_per_side)
  return jnp.repeat(jnp.repeat(cells, scale, axis=1), scale, axis=2)


def upsample_mask(mask: jax.Array, factor: int) -> jax.Array:
  """Nearest-neighbour upsampling of `[B, h, w]` to `[B, h * factor, w * factor]` (repeat_interleave)."""
  return jnp.repeat(jnp.repeat(mask, factor, axis=1), factor, axis=2)
