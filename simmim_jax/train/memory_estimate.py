"""A lower bound on the memory a run needs, from the encoder's fields alone: checked before anything is written.

Every term is something the run cannot do without, so a run that fits is never judged too large
(`validation.check_memory` refuses only past twice what the machine has):
  * per device, the model state: float32 parameters (4 bytes each) and, for what trains, their gradients and
    the two AdamW moments (12 more bytes), divided over the fsdp axis (`config.mesh.fsdp`); the parameters
    are counted from the blocks' matmuls alone ((4 + 2 x mlp_ratio) x channels**2 per block: qkv, proj,
    fc1, fc2) plus a classifier head the caller names, so patch embedding, norms and tables only add to it;
  * per device, the micro-batch of float32 input images, and, when the backward pass runs through the
    encoder, every block's input kept for it (tokens x channels per image in the compute dtype; with or
    without remat), plus one block's float32 attention logits when they are materialized
    (`attention_impl="einsum"`: heads x tokens x window tokens per image);
  * on the host, the numpy tables built while the model is traced: the relative-position index (an
    [N, N, 2] int64 array for an attention window of N tokens) and Swin's shifted-window mask (float32,
    tokens x window tokens), and the embedded demo dataset (uint8 crops, `config.data.num_demo_images`).
Nothing is traced or allocated: the estimate takes microseconds for any depth, width or image size.
`benchmarks/memory_per_chip.py` builds its fuller table (every saved activation) on `stages`.
"""

import dataclasses
import os

GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Stage:
  """`blocks` identical transformer blocks: `tokens` tokens of `channels` channels per image, `heads` heads,
  each token attending to `window_tokens` tokens (ViT: all of them; Swin: its window)."""
  blocks: int
  tokens: int
  channels: int
  heads: int
  window_tokens: int


def stages(encoder) -> list[Stage]:
  """The encoder's blocks, stage by stage (a ViT is one stage), from its fields: nothing is traced."""
  grid = encoder.img_size // encoder.patch_size
  if hasattr(encoder, "depths"):  # Swin / SwinV2: the grid halves and the channels double after each stage
    from simmim_jax.models import swin  # pylint: disable=g-import-not-at-top

    result = []
    for stage, depth in enumerate(encoder.depths):
      resolution = max(grid // 2 ** stage, 1)
      window, _ = swin.effective_window(resolution, encoder.window_size, 0)
      result.append(Stage(depth, resolution ** 2, encoder.embed_dim * 2 ** stage, encoder.num_heads[stage],
                          window ** 2))
    return result
  tokens = grid ** 2 + 1  # + the cls token
  return [Stage(encoder.depth, tokens, encoder.embed_dim, encoder.num_heads, tokens)]


def block_parameters(encoder) -> int:
  """A lower bound on the encoder's parameters: the four matmuls of every block."""
  return sum(s.blocks * int((4 + 2 * encoder.mlp_ratio) * s.channels ** 2) for s in stages(encoder))


def device_bytes(encoder, *, batch_per_device: int, compute_bytes: int, fsdp: int, head_parameters: int = 0,
                 trains_encoder: bool = True) -> dict[str, int]:
  """{part: bytes} the run needs at least on each device (see the module docstring)."""
  encoder_parameters = block_parameters(encoder)
  trained = (encoder_parameters if trains_encoder else 0) + head_parameters
  all_stages = stages(encoder)
  images = batch_per_device * encoder.img_size ** 2 * encoder.in_chans * 4
  kept = sum(s.blocks * s.tokens * s.channels for s in all_stages) * batch_per_device * compute_bytes
  logits = 0
  if getattr(encoder, "attention_impl", "einsum") == "einsum":
    logits = max(s.heads * s.tokens * s.window_tokens for s in all_stages) * batch_per_device * 4
  return {"model state": ((encoder_parameters + head_parameters) * 4 + trained * 12) // fsdp,
          "activations": images + (kept if trains_encoder else 0) + logits}


def host_bytes(encoder, *, demo_images: int = 0, demo_image_size: int = 0) -> dict[str, int]:
  """{part: bytes} the run needs at least on the host besides the devices' memory."""
  all_stages = stages(encoder)
  uses_index = hasattr(encoder, "depths") or encoder.use_rel_pos_bias or encoder.use_shared_rel_pos_bias
  tables = max(16 * s.window_tokens ** 2 for s in all_stages) if uses_index else 0
  if hasattr(encoder, "depths"):  # the shifted-window mask, [windows, w*w, w*w] float32
    tables = max(tables, max(4 * s.tokens * s.window_tokens for s in all_stages))
  return {"position tables": tables, "demo dataset": demo_images * demo_image_size ** 2 * 3}


def host_memory_bytes() -> int:
  """The physical memory of this machine, or the cgroup's limit when lower (containers, SLURM)."""
  total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
    try:
      with open(path) as f:
        limit = f.read().strip()
    except OSError:
      continue
    if limit.isdigit():
      total = min(total, int(limit))
  return total


def device_memory_bytes(device) -> int | None:
  """An accelerator's memory (`bytes_limit` of its memory stats); None on CPU, whose devices share the host's."""
  try:
    stats = device.memory_stats()
  except Exception:  # pylint: disable=broad-except  (backends without memory stats raise or return None)
    return None
  return int(stats["bytes_limit"]) if stats and stats.get("bytes_limit") else None


def gib(num_bytes: float) -> str:
  """'4.1 GiB', or '37 MiB' below a GiB."""
  return f"{num_bytes / GIB:,.1f} GiB" if num_bytes >= GIB else f"{num_bytes / 2 ** 20:,.0f} MiB"
