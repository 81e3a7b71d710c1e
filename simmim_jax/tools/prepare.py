"""simmim-prepare: an image folder -> the ArrayRecord shards that data.source="array_record" reads with Grain.

  simmim-prepare --images=imagenet/train --out=prepared --split=train
  simmim-prepare --images=imagenet/val --out=prepared --split=val

Writes `OUT/<split>/shard-NNNNN-of-MMMMM.array_record` and the index `OUT/<split>.json`
(`simmim_jax.data.array_record`). The folder is walked as the "folder" source walks it
(`image_files.list_image_files`: sorted paths, each real file once, symlink loops end); when every image sits in a
class sub-folder (`<images>/<class>/<image>`), the sorted class names are the labels, else records carry no label.
Each file is read with the folder source's bounds (`decode.read_image_file`: regular files only, at most
`max_image_bytes` bytes, the header's declared size at most `--max_image_pixels`); a file that fails them is
skipped, counted and named in the log (`--strict`: the command stops, exit 2, naming it). The bytes are stored as
they are (no re-encoding), so training decodes exactly what the folder source would.

Atomic: the shards are written into a new hidden folder beside `OUT/<split>` that is renamed to it only when every
shard is complete, then the index is written (atomically, `safe_files`); an interrupted run leaves no shard under
`OUT/<split>` and removes its hidden folder. Rerun the command to start over. TF-free.
"""

import math
import os
import sys
import time

from simmim_jax.data import array_record, decode, image_files
from simmim_jax.storage import safe_files

RECORDS_PER_SHARD = 1024  # tfds writes ImageNet's train split as 1024 shards of ~1250 images (~140 MB)


def class_names_of(files: list[str], images: str) -> list[str] | None:
  """Sorted names of the first-level sub-folders holding the images, or None if any image sits at the top."""
  names = set()
  for path in files:
    parts = os.path.relpath(path, images).split(os.sep)
    if len(parts) < 2:
      return None
    names.add(parts[0])
  return sorted(names)


def shard_bounds(count: int, num_shards: int) -> list[tuple[int, int]]:
  """Contiguous [start, end) file ranges of `num_shards` shards of nearly equal size."""
  return [(i * count // num_shards, (i + 1) * count // num_shards) for i in range(num_shards)]


def prepare(images: str, out: str, split: str = "train", *, num_shards: int = 0, max_image_pixels: int = 0,
            strict: bool = False, progress=sys.stdout) -> dict:
  """Writes the shards and index of `split` (module docstring); returns {"records", "skipped", "shards"}."""
  if not split or os.sep in split or split.startswith(".") or split != split.strip():
    raise ValueError(f"--split={split!r}: a split name is a plain name such as 'train' or 'val'")
  if num_shards < 0:
    raise ValueError(f"--num_shards={num_shards} must be >= 0 (0 = one shard per {RECORDS_PER_SHARD} images)")
  max_pixels = decode.max_image_pixels(0, max_image_pixels)  # 0: the training default's floor, 40 M pixels
  if not os.path.isdir(images):
    raise ValueError(f"--images={images!r} is not a folder: give the image folder (flat, or <class>/<image>)")
  index_file = array_record.index_path(out, split)
  if os.path.lexists(index_file):
    raise FileExistsError(f"{index_file} exists: split {split!r} is already prepared in {out} (nothing is "
                          "overwritten; remove it and OUT/<split>/ to prepare it again)")
  files = image_files.list_image_files(images)
  class_names = class_names_of(files, images)
  labels = {name: i for i, name in enumerate(class_names or [])}
  num_shards = min(num_shards or math.ceil(len(files) / RECORDS_PER_SHARD), len(files))
  shards, skips, started = [], decode.SkipCounter(), time.monotonic()
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top

  with safe_files.new_folder(os.path.join(out, split)) as folder:
    for shard, (start, end) in enumerate(shard_bounds(len(files), num_shards)):
      name = f"shard-{shard:05d}-of-{num_shards:05d}.array_record"
      # A fresh file in the hidden folder new_folder just created (nothing else writes there).
      writer = array_record_module.ArrayRecordWriter(os.path.join(folder, name), "group_size:1")
      count = 0
      try:
        for path in files[start:end]:
          try:
            data = decode.read_image_file(path, max_pixels)
          except decode.DECODE_ERRORS as e:
            skips.record(path, f"{type(e).__name__}: {e}", strict)  # strict: UndecodableImageError
            continue
          label = labels[os.path.relpath(path, images).split(os.sep)[0]] if class_names else array_record.NO_LABEL
          writer.write(array_record.encode_record(data, label))
          count += 1
      finally:
        writer.close()
      shards.append({"name": f"{split}/{name}", "num_records": count})
      done = sum(s["num_records"] for s in shards)
      print(f"simmim-prepare: shard {shard + 1}/{num_shards}: {done} images written, {skips.count} skipped, "
            f"{time.monotonic() - started:.0f} s", file=progress, flush=True)
  index = {"format": array_record.RECORD_FORMAT, "split": split, "images": os.path.abspath(images),
           "shards": shards, "num_records": sum(s["num_records"] for s in shards), "skipped": skips.count,
           "class_names": class_names or []}
  safe_files.write_atomic(index_file, safe_files.json_text(index, indent=1), overwrite=False)
  return {"records": index["num_records"], "skipped": skips.count, "shards": num_shards}
