"""Mixup / CutMix with label smoothing, on device, with timm `Mixup` semantics (mode "batch").

Official fine-tuning (timm `Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5,
mode="batch", label_smoothing=0.1)`): one draw per batch. With probability `switch_prob` CutMix with
lam ~ Beta(cutmix_alpha, cutmix_alpha), else Mixup with lam ~ Beta(mixup_alpha, mixup_alpha); every image
is mixed with the batch in reverse order (`x.flip(0)`). CutMix pastes a box of relative side sqrt(1 - lam)
centred at a uniform pixel (clipped at the borders; timm `rand_bbox`) and corrects lam to the visible area.
Targets: `lam * smooth(y) + (1 - lam) * smooth(y.flip(0))` with smooth(y) = one-hot at 1 - s + s / K and
s / K elsewhere, so each row sums to 1. Written by hand (timm is PyTorch); randomness from a jax key.

Groups (`config.augment.mixup_groups`): timm mixes each GPU's local batch on its own (one lam, one box and
`x.flip(0)` within the local batch), so the official runs (16 GPUs x 128) draw 16 lams per step and pair images
only within a GPU's 128. `groups=G` splits the global batch into G contiguous groups of B / G images, each with
its own key (`jax.random.split(key, G)`), lam, switch, box and in-group reversal; G = 1 is one draw for the whole
batch (with `key` itself). Groups need not line up with the devices' shards (any G dividing B is correct; a
group spanning several shards just moves data between them).
"""

import functools

import jax
import jax.numpy as jnp


def smooth_one_hot(labels: jax.Array, num_classes: int, smoothing: float) -> jax.Array:
  off = smoothing / num_classes
  return jax.nn.one_hot(labels, num_classes) * (1.0 - smoothing) + off  # on = 1 - s + s / K


def cutmix_box(key: jax.Array, height: int, width: int, lam: jax.Array) -> tuple[jax.Array, ...]:
  """timm `rand_bbox`: (top, bottom, left, right) int32 of a box with sides int(H sqrt(1-lam)),
  int(W sqrt(1-lam)) centred at a uniform pixel, clipped to the image."""
  cut_ratio = jnp.sqrt(1.0 - lam)
  cut_h, cut_w = (height * cut_ratio).astype(jnp.int32), (width * cut_ratio).astype(jnp.int32)
  key_y, key_x = jax.random.split(key)
  cy, cx = jax.random.randint(key_y, (), 0, height), jax.random.randint(key_x, (), 0, width)
  top, bottom = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h // 2, 0, height)
  left, right = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w // 2, 0, width)
  return top, bottom, left, right


def check_groups(groups: int, batch_size: int) -> None:
  """Raises ValueError unless `groups` is a positive integer dividing `batch_size`."""
  if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1 or batch_size % groups:
    raise ValueError(f"config.augment.mixup_groups={groups!r}: use a positive integer that divides the global "
                     f"batch ({batch_size}); the official runs mix per GPU: global batch / 128")


def mixup_cutmix(key: jax.Array, images: jax.Array, labels: jax.Array, *, num_classes: int,
                 mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0, prob: float = 1.0,
                 switch_prob: float = 0.5, label_smoothing: float = 0.1,
                 groups: int = 1) -> tuple[jax.Array, jax.Array, jax.Array]:
  """images [B, H, W, C], int labels [B] -> (mixed images, soft targets [B, K] float32, lam).

  lam is the weight of each image's own label (1 = no mixing): a scalar with one group, [groups] (one per
  group of B / groups contiguous images) with more. Alphas of 0 disable a method; with both 0 (or an unlucky
  `prob` draw) the targets are the smoothed one-hots.
  """
  check_groups(groups, images.shape[0])
  mix = functools.partial(_mixup_cutmix_batch, num_classes=num_classes, mixup_alpha=mixup_alpha,
                          cutmix_alpha=cutmix_alpha, prob=prob, switch_prob=switch_prob,
                          label_smoothing=label_smoothing)
  if groups == 1:
    return mix(key, images, labels)
  per_group = lambda x: x.reshape((groups, x.shape[0] // groups) + x.shape[1:])
  mixed, targets, lam = jax.vmap(mix)(jax.random.split(key, groups), per_group(images), per_group(labels))
  return mixed.reshape(images.shape), targets.reshape((images.shape[0], -1)), lam


def _mixup_cutmix_batch(key, images, labels, *, num_classes, mixup_alpha, cutmix_alpha, prob, switch_prob,
                        label_smoothing):
  """One timm `Mixup` call (mode "batch") on one group: see `mixup_cutmix`."""
  targets = smooth_one_hot(labels, num_classes, label_smoothing)
  if mixup_alpha <= 0 and cutmix_alpha <= 0:
    return images, targets, jnp.ones((), jnp.float32)
  key_apply, key_switch, key_mix, key_cut, key_box = jax.random.split(key, 5)
  apply = jax.random.uniform(key_apply) < prob
  if mixup_alpha > 0 and cutmix_alpha > 0:
    use_cutmix = jax.random.uniform(key_switch) < switch_prob
  else:
    use_cutmix = jnp.asarray(cutmix_alpha > 0)
  lam_mix = jax.random.beta(key_mix, max(mixup_alpha, 1e-3), max(mixup_alpha, 1e-3))
  lam_cut = jax.random.beta(key_cut, max(cutmix_alpha, 1e-3), max(cutmix_alpha, 1e-3))
  flipped = images[::-1]
  height, width = images.shape[1], images.shape[2]
  top, bottom, left, right = cutmix_box(key_box, height, width, lam_cut)
  rows, cols = jnp.arange(height)[:, None], jnp.arange(width)[None, :]
  in_box = ((rows >= top) & (rows < bottom) & (cols >= left) & (cols < right))[None, :, :, None]
  lam_cut = 1.0 - ((bottom - top) * (right - left)) / (height * width)  # correct_lam=True
  cut_images = jnp.where(in_box, flipped, images)
  mix_images = images * lam_mix.astype(images.dtype) + flipped * (1.0 - lam_mix).astype(images.dtype)
  lam = jnp.where(apply, jnp.where(use_cutmix, lam_cut, lam_mix), 1.0).astype(jnp.float32)
  mixed = jnp.where(apply, jnp.where(use_cutmix, cut_images, mix_images), images)
  return mixed, lam * targets + (1.0 - lam) * targets[::-1], lam
