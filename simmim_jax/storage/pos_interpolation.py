"""Loading a SimMIM-pretrained encoder into a fine-tuning model (official `utils.load_pretrained`).

`remap_pretrained(source, target, encoder)` takes the pretrained encoder's parameters and the freshly
initialized fine-tune encoder's parameters and returns the latter with every pretrained value copied in:
  1. the SimMIM-only `mask_token` is dropped, and the ViT final `norm` when the fine-tune model has none
     (mean pooling: `fc_norm` is fresh, as the official model);
  2. ViT: the shared relative position bias (`rel_pos_bias`) is copied into every block's own table;
  3. relative position bias tables whose size differs (another window or resolution) are resized with the
     official geometric-progression ("geo") + bicubic interpolation of BEiT / SimMIM, the 3 extra cls rows
     of the ViT table kept as they are; SciPy's removed `interp2d(kind="cubic")` is replaced by
     `RectBivariateSpline(kx=ky=3, s=0)`, the same FITPACK interpolating bicubic spline on this grid;
  4. absolute position embeddings are resized bicubically (cls token kept), as MAE's
     `interpolate_pos_embed`;
  5. anything else must match by path and shape. Otherwise `CheckpointMismatchError` names every
     mismatched, missing or unexpected parameter. Only `fc_norm` and the head may be missing (fresh).

Pure numpy / SciPy on the host (SciPy is a JAX dependency), no TensorFlow.
"""

from typing import Any

import jax
import numpy as np
from flax import traverse_util
from scipy import interpolate

VIT_EXTRA_TOKENS = 3  # cls-to-token, token-to-cls, cls-to-cls rows of the BEiT table
FRESH_OK = ("fc_norm",)  # encoder parameters a SimMIM checkpoint does not have (the head is outside)


class CheckpointMismatchError(ValueError):
  """The pretrained checkpoint does not fit the model; the message lists the parameters."""


def _geometric_source_coords(src_size: int, dst_size: int) -> np.ndarray:
  """BEiT's source coordinates: distances growing geometrically (ratio q found by bisection so that the
  half-table spans dst_size // 2), mirrored around 0; integer target coordinates keep 0 and +-1 exact."""
  left, right = 1.01, 1.5
  while right - left > 1e-6:
    q = (left + right) / 2.0
    progression = (1.0 - q ** (src_size // 2)) / (1.0 - q)
    if progression > dst_size // 2:
      right = q
    else:
      left = q
  distances, current = [], 1.0
  for i in range(src_size // 2):
    distances.append(current)
    current += q ** (i + 1)
  return np.asarray([-d for d in reversed(distances)] + [0.0] + distances)


def resize_relative_position_table(table: np.ndarray, dst_rows: int, num_extra: int = 0) -> np.ndarray:
  """[(2s-1)^2 + extra, heads] -> [dst_rows, heads] (dst_rows = (2d-1)^2 + extra), geo + bicubic.

  The last `num_extra` rows (ViT cls rows) are kept. Same size: returned unchanged.
  """
  table = np.asarray(table, np.float32)
  src_rows, heads = table.shape
  if src_rows == dst_rows:
    return table
  src_size, dst_size = int(round((src_rows - num_extra) ** 0.5)), int(round((dst_rows - num_extra) ** 0.5))
  if src_size ** 2 + num_extra != src_rows or dst_size ** 2 + num_extra != dst_rows:
    raise ValueError(f"relative position tables of {src_rows} and {dst_rows} rows are not square grids "
                     f"(+{num_extra} extra rows)")
  coords = _geometric_source_coords(src_size, dst_size)
  half = dst_size // 2
  targets = np.arange(-half, half + 0.1, 1.0)
  grid = table[:src_rows - num_extra].reshape(src_size, src_size, heads)
  resized = np.stack([interpolate.RectBivariateSpline(coords, coords, grid[:, :, h], kx=3, ky=3, s=0)(
      targets, targets) for h in range(heads)], axis=-1).reshape(-1, heads)
  return np.concatenate([resized, table[src_rows - num_extra:]], axis=0).astype(np.float32)


def resize_absolute_position_embedding(embedding: np.ndarray, dst_tokens: int, num_extra: int) -> np.ndarray:
  """[1, extra + s*s, D] -> [1, extra + d*d, D]: bicubic resize of the patch grid (as MAE's
  `interpolate_pos_embed`, through `jax.image.resize`), the `num_extra` leading (cls) tokens kept."""
  embedding = np.asarray(embedding, np.float32)
  src_size = int(round((embedding.shape[1] - num_extra) ** 0.5))
  dst_size = int(round((dst_tokens - num_extra) ** 0.5))
  if src_size == dst_size:
    return embedding
  dim = embedding.shape[-1]
  grid = embedding[0, num_extra:].reshape(src_size, src_size, dim)
  resized = np.asarray(jax.image.resize(grid, (dst_size, dst_size, dim), "bicubic", antialias=False))
  return np.concatenate([embedding[:, :num_extra], resized.reshape(1, -1, dim)], axis=1)


def remap_pretrained(source: Any, target: Any, *, is_vit: bool) -> tuple[Any, dict[str, list[str]]]:
  """Pretrained encoder params `source` into the shapes of the initialized encoder params `target`.

  Returns (params with target's structure, report {"loaded", "fresh", "dropped", "resized"} of paths).
  Raises CheckpointMismatchError listing every parameter that does not fit.
  """
  src = {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(jax.device_get(source)).items()}
  dst = traverse_util.flatten_dict(target)
  dst_names = {"/".join(k) for k in dst}
  report = {"loaded": [], "fresh": [], "dropped": [], "resized": []}

  def drop(name):
    src.pop(name)
    report["dropped"].append(name)

  for name in list(src):
    if name == "mask_token" or (name.startswith("norm/") and name not in dst_names):
      drop(name)
  shared = "rel_pos_bias/relative_position_bias_table"
  if shared in src and shared not in dst_names:
    for name in dst_names:
      if name.endswith("attn/relative_position_bias/relative_position_bias_table") and name not in src:
        src[name] = src[shared]
    drop(shared)

  problems, result = [], {}
  for path, init_value in dst.items():
    name = "/".join(path)
    if name not in src:
      if name.split("/")[0] in FRESH_OK:
        result[path] = init_value
        report["fresh"].append(name)
      else:
        problems.append(f"  {name}: missing from the checkpoint (model shape {tuple(init_value.shape)})")
      continue
    value = src.pop(name)
    if value.shape != init_value.shape:
      try:
        if name.endswith("relative_position_bias_table") and value.shape[1] == init_value.shape[1]:
          value = resize_relative_position_table(value, init_value.shape[0], VIT_EXTRA_TOKENS if is_vit else 0)
          report["resized"].append(name)
        elif name in ("pos_embed", "absolute_pos_embed") and value.shape[2] == init_value.shape[2]:
          value = resize_absolute_position_embedding(value, init_value.shape[1], 1 if is_vit else 0)
          report["resized"].append(name)
      except ValueError:
        pass
    if value.shape != init_value.shape:
      problems.append(f"  {name}: checkpoint shape {tuple(value.shape)} != model shape {tuple(init_value.shape)}")
      continue
    result[path] = np.asarray(value, dtype=init_value.dtype)
    report["loaded"].append(name)
  problems += [f"  {name}: in the checkpoint but not in the model (shape {tuple(v.shape)})"
               for name, v in sorted(src.items())]
  problems.sort(key=lambda line: "shape (" in line.split(":", 1)[1][:16])  # missing / unexpected first
  if problems:
    shown = problems[:30] + ([f"  ... and {len(problems) - 30} more"] if len(problems) > 30 else [])
    raise CheckpointMismatchError(
        f"the pretrained encoder does not fit the fine-tuning model ({len(problems)} parameter(s)):\n"
        + "\n".join(shown) + "\nUse the pretrained run's encoder (model name and sizes), or no pretrained weights.")
  return traverse_util.unflatten_dict(result), report
