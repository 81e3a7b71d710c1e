"""simmim-reconstruct on a real photograph with a tiny converted model: the grid, and errors that name the file."""

import os

import jax
import numpy as np
import pytest
from PIL import Image

from simmim_jax import cli, models
from simmim_jax.storage import convert, visualize
from simmim_jax.tools import reconstruct
from simmim_jax.storage import workdir as workdir_lib
from simmim_jax.configs import finetune_config
from helpers import png_bomb, snapshot

skimage_data = pytest.importorskip("skimage.data")
PHOTO = os.path.join(os.path.dirname(skimage_data.__file__), "chelsea.png")  # a real photo (451 x 300)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  """A tiny SimMIM ViT as an official-format file and as a simmim-convert workdir."""
  encoder = models.create_encoder("vit_test_tiny")
  model = models.SimMIM(encoder=encoder, encoder_stride=encoder.output_stride)
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: (0.1 * rng.standard_normal(s.shape)).astype(np.float32),
                        convert.abstract_params(model))
  root = tmp_path_factory.mktemp("reconstruct")
  path = str(root / "simmim_tiny.npz")
  np.savez(path, **convert.to_torch(model, {"params": params}))
  workdir = str(root / "workdir")
  assert cli.convert_main([f"--checkpoint={path}", "--encoder=vit_test_tiny", f"--workdir={workdir}"]) == 0
  return path, workdir, model, {"params": params}


def test_photo_is_resized_and_centre_cropped():
  image = reconstruct.load_image(PHOTO, 32)
  assert image.shape == (32, 32, 3) and image.dtype == np.uint8
  full = np.asarray(Image.open(PHOTO).convert("RGB").resize((48, 32), Image.BICUBIC))  # 451x300 -> 48x32
  np.testing.assert_array_equal(image, full[:, 8:40])


def test_reconstruction_grid_of_a_photo_from_a_converted_workdir(converted, tmp_path):
  _, workdir, model, variables = converted
  before = snapshot(workdir)
  out = str(tmp_path / "grid.png")
  assert cli.reconstruct_main([f"--checkpoint={workdir}", f"--image={PHOTO}", f"--out={out}", "--mask_patch_size=8",
                               "--seed=1", "--scale=1"]) == 0
  grid = np.asarray(Image.open(out))
  header = visualize.HEADER_HEIGHT  # the column labels, above the panels
  assert grid.shape == (header + 32 + 2, 4 * (32 + 2), 3)
  # The prediction panel is the model's reconstruction of the normalized photo, un-normalized.
  image = reconstruct.load_image(PHOTO, 32)
  expected = reconstruct.reconstruct(model, variables, image, mask_patch_size=8, mask_ratio=0.6, seed=1)
  np.testing.assert_array_equal(grid, expected)
  np.testing.assert_array_equal(grid[:header], visualize.column_header(34))
  grid = grid[header:]
  np.testing.assert_array_equal(grid[:32, :32], image)  # panel 1: the (resized, cropped) original
  assert not np.array_equal(grid[:32, 68:100], grid[:32, :32])  # panel 3: a prediction, not the input
  assert snapshot(workdir) == before  # read only


def test_a_finetune_workdir_is_refused_by_its_recorded_recipe(tmp_path, capsys):
  workdir = tmp_path / "finetuned"
  workdir.mkdir()
  workdir_lib.write_config(str(workdir), finetune_config.get_config(), recipe="finetune")
  before = snapshot(workdir)
  assert cli.reconstruct_main([f"--checkpoint={workdir}", f"--image={PHOTO}", f"--out={tmp_path}/g.png"]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "is a simmim-finetune workdir: give a simmim-pretrain / simmim-convert" in err, err
  assert snapshot(workdir) == before and not (tmp_path / "g.png").exists()


def test_a_checkpoint_file_with_its_encoder_gives_the_same_grid(converted, tmp_path):
  path, workdir, _, _ = converted
  grids = []
  for args in ([f"--checkpoint={workdir}"], [f"--checkpoint={path}", "--encoder=vit_test_tiny"]):
    out = str(tmp_path / f"grid{len(grids)}.png")
    assert cli.reconstruct_main(args + [f"--image={PHOTO}", f"--out={out}", "--mask_patch_size=8"]) == 0
    grids.append(np.asarray(Image.open(out)))
  np.testing.assert_array_equal(grids[0], grids[1])


def test_mask_ratio_and_seed_change_the_mask(converted, tmp_path):
  _, workdir, _, _ = converted
  grids = {}
  for ratio, seed in ((0.3, 0), (0.8, 0), (0.8, 1)):
    out = str(tmp_path / f"{ratio}_{seed}.png")
    assert cli.reconstruct_main([f"--checkpoint={workdir}", f"--image={PHOTO}", f"--out={out}", "--mask_patch_size=8",
                                 f"--mask_ratio={ratio}", f"--seed={seed}", "--scale=1"]) == 0
    grids[(ratio, seed)] = np.asarray(Image.open(out))[visualize.HEADER_HEIGHT:][:32, 34:66]  # the masked panel
  gray = lambda panel: int((np.abs(panel.astype(int) - 128) <= 1).all(-1).sum())
  assert gray(grids[(0.8, 0)]) > gray(grids[(0.3, 0)])
  assert not np.array_equal(grids[(0.8, 0)], grids[(0.8, 1)])


def test_unreadable_image_is_named(converted, tmp_path, capsys):
  _, workdir, _, _ = converted
  bad = tmp_path / "notes.jpg"
  bad.write_text("not an image")
  assert cli.reconstruct_main([f"--checkpoint={workdir}", f"--image={bad}", f"--out={tmp_path}/g.png"]) == 2
  assert "notes.jpg" in capsys.readouterr().err
  assert cli.reconstruct_main([f"--checkpoint={workdir}", f"--image={tmp_path}/gone.png",
                               f"--out={tmp_path}/g.png"]) == 2
  assert "gone.png" in capsys.readouterr().err


def test_missing_checkpoint_is_named(tmp_path, capsys):
  assert cli.reconstruct_main([f"--checkpoint={tmp_path}/nothing.pth", f"--image={PHOTO}",
                               f"--out={tmp_path}/g.png"]) == 2
  assert "nothing.pth" in capsys.readouterr().err
  os.makedirs(tmp_path / "emptydir")
  assert cli.reconstruct_main([f"--checkpoint={tmp_path}/emptydir", f"--image={PHOTO}", f"--out={tmp_path}/g.png"]) == 2
  assert "emptydir" in capsys.readouterr().err


def test_an_image_bomb_or_a_fifo_given_as_image_is_one_line_and_exit_2(converted, tmp_path, capsys):
  _, workdir, _, _ = converted
  bomb = tmp_path / "bomb.png"
  bomb.write_bytes(png_bomb(20000, 20000))  # 400 M pixels (1.2 GB decoded) in under 100 bytes
  assert bomb.stat().st_size < 100
  os.mkfifo(tmp_path / "pipe.png")  # never opened for reading: it would block
  for image, message in ((bomb, "DecompressionBombError: Image size (400000000 pixels) exceeds limit"),
                         (tmp_path / "pipe.png", "is a FIFO (named pipe), not a regular file")):
    assert cli.reconstruct_main([f"--checkpoint={workdir}", f"--image={image}", f"--out={tmp_path}/g.png"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"simmim-reconstruct: cannot read the image {image}: ") and message in err, err
  assert not (tmp_path / "g.png").exists()
