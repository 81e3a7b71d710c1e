"""simmim-reconstruct: the SimMIM reconstruction of any image, from a converted or a trained model.

  simmim-reconstruct --checkpoint=WORKDIR --image=photo.jpg --out=grid.png [--mask_ratio=0.6 --seed=0]
  simmim-reconstruct --checkpoint=simmim_pretrain.pth --encoder=vit_base_patch16 --image=... --out=...

The image is resized (shorter side, bicubic) and centre-cropped to the model's input size, normalized with
the ImageNet mean / std, masked with a random SimMIM block mask (`--mask_patch_size`, default the run's),
and reconstructed; the PNG shows original | masked | prediction | prediction pasted into the visible
pixels (`visualize.reconstruction_grid`). `--checkpoint` is a `simmim-pretrain` / `simmim-convert` workdir,
or a PyTorch SimMIM checkpoint file converted on the fly (`--encoder` then names the encoder).
TF-free: numpy, pillow and JAX.
"""

import argparse
import os
import sys

import jax
import ml_collections
import numpy as np
from PIL import Image, UnidentifiedImageError

from simmim_jax import models, visualize
from simmim_jax import workdir as workdir_lib
from simmim_jax.data import normalization


def load_image(path: str, size: int) -> np.ndarray:
  """uint8 [size, size, 3]: RGB, shorter side resized to `size` (bicubic), centre crop."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"image file {path} does not exist")
  try:
    with Image.open(path) as image:
      image = image.convert("RGB")
      width, height = image.size
      scale = size / min(width, height)
      resized = image.resize((max(size, round(width * scale)), max(size, round(height * scale))), Image.BICUBIC)
  except (UnidentifiedImageError, OSError) as e:
    raise ValueError(f"cannot read the image {path}: {e}") from None
  left, top = (resized.width - size) // 2, (resized.height - size) // 2
  return np.asarray(resized.crop((left, top, left + size, top + size)))


def load_simmim(checkpoint_path: str, encoder: str | None = None, **overrides):
  """(SimMIM model, variables, mask_patch_size) from a workdir or a PyTorch SimMIM checkpoint file."""
  if os.path.isdir(checkpoint_path):
    if not os.path.exists(os.path.join(checkpoint_path, workdir_lib.CONFIG_FILENAME)):
      raise FileNotFoundError(f"{checkpoint_path} has no {workdir_lib.CONFIG_FILENAME}: not a simmim-pretrain or "
                              "simmim-convert workdir")
    model, variables, config = workdir_lib.load_model(checkpoint_path)  # read-only
    return model, variables, int(config.mask_patch_size)
  if not os.path.exists(checkpoint_path):
    raise FileNotFoundError(f"checkpoint {checkpoint_path} does not exist (give a workdir or a .pth / "
                            ".safetensors / .npz file)")
  from simmim_jax import convert, torch_files  # pylint: disable=g-import-not-at-top

  if not encoder:
    raise ValueError(f"--checkpoint={checkpoint_path} is a file: name its encoder with --encoder=NAME")
  model, variables = convert.from_torch(torch_files.load_state_dict(checkpoint_path), encoder=encoder, **overrides)
  if not isinstance(model, models.SimMIM):
    raise ValueError(f"{checkpoint_path} holds no SimMIM decoder (decoder.0.*): it cannot reconstruct images")
  return model, variables, 32  # the paper's mask patch size


def reconstruct(model: models.SimMIM, variables: dict, image: np.ndarray, *, mask_patch_size: int,
                mask_ratio: float, seed: int) -> np.ndarray:
  """The uint8 reconstruction grid of one uint8 image [H, W, 3] at the model's size."""
  from simmim_jax import pretrain  # pylint: disable=g-import-not-at-top

  size = model.encoder.img_size
  if mask_patch_size % model.encoder.patch_size or size % mask_patch_size:
    raise ValueError(f"--mask_patch_size={mask_patch_size} must divide the image size {size} and be a multiple "
                     f"of the model patch size {model.encoder.patch_size}")
  config = ml_collections.ConfigDict(dict(img_size=size, mask_patch_size=mask_patch_size, mask_ratio=mask_ratio))
  run = jax.jit(pretrain.make_reconstruct_fn(config, model, num_images=1))
  images = normalization.normalize(image[None])
  shown = jax.device_get(run(variables["params"], images, jax.random.key(seed)))
  return visualize.reconstruction_grid(*shown)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="simmim-reconstruct", description=__doc__.split("\n\n")[0])
  parser.add_argument("--checkpoint", required=True, help="a simmim-pretrain / simmim-convert workdir, or a "
                      "PyTorch SimMIM checkpoint file (with --encoder)")
  parser.add_argument("--image", required=True, help="any image pillow reads (JPEG, PNG, ...)")
  parser.add_argument("--out", required=True, help="the PNG to write")
  parser.add_argument("--encoder", help="registry name, for a checkpoint file")
  parser.add_argument("--img_size", type=int, help="encoder input size override, for a checkpoint file")
  parser.add_argument("--mask_ratio", type=float, default=0.6)
  parser.add_argument("--mask_patch_size", type=int, help="default: the run's (32 for checkpoint files)")
  parser.add_argument("--seed", type=int, default=0, help="seed of the random mask")
  parser.add_argument("--scale", type=int, default=0, help="PNG upscaling (default: to at least 256 px)")
  args = parser.parse_args(argv)
  try:
    overrides = {"img_size": args.img_size} if args.img_size else {}
    model, variables, mask_patch_size = load_simmim(args.checkpoint, args.encoder, **overrides)
    image = load_image(args.image, model.encoder.img_size)
    grid = reconstruct(model, variables, image, mask_patch_size=args.mask_patch_size or mask_patch_size,
                       mask_ratio=args.mask_ratio, seed=args.seed)
    visualize.save_png(grid, args.out, scale=args.scale or max(1, 256 // model.encoder.img_size))
  except (ValueError, FileNotFoundError) as e:  # bad input: exit 2, one line
    print(f"simmim-reconstruct: {' '.join(str(e).split())}", file=sys.stderr)
    return 2
  except OSError as e:  # a runtime failure (a write that failed): exit 1 with the reason
    print(f"simmim-reconstruct: failed: {type(e).__name__}: {' '.join(str(e).split())}", file=sys.stderr)
    return 1
  print(f"wrote {args.out}: original | masked | prediction | prediction pasted into the visible pixels")
  return 0


if __name__ == "__main__":
  sys.exit(main())
