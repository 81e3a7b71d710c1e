"""Code and docs cite the official repositories' files (e.g. microsoft/SimMIM `config.py`:97), never notes that live
outside this repository."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCANNED = [*(ROOT / "simmim_jax").rglob("*"), *(ROOT / "benchmarks").rglob("*"), *(ROOT / "launch").rglob("*"),
           *(ROOT / "tests").rglob("*.py"), ROOT / "README.md", ROOT / "BENCHMARKS.md"]
# A notes path: "shared/..." not inside an absolute path (launch scripts use /shared/runs as an example cluster
# mount), "../shared", or the notes' file names.
OUTSIDE_NOTES = re.compile(r"(?<![\w/.-])shared/|\.\./shared|simmim_official\.md|jax_ecosystem\.md|"
                           r"environment\.md|STYLE\.md|ARCHITECTURE\.md")


def _text_files():
  for path in SCANNED:
    if path.is_file() and path != pathlib.Path(__file__).resolve() and "__pycache__" not in path.parts:
      try:
        yield path, path.read_text(encoding="utf-8")
      except UnicodeDecodeError:
        continue


def test_no_file_cites_notes_outside_the_repository():
  hits = [f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(0)}"
          for path, text in _text_files() for m in OUTSIDE_NOTES.finditer(text)]
  assert not hits, "cite the official repositories' files instead:\n" + "\n".join(hits)


@pytest.mark.parametrize("text", ["see shared/reference/simmim_official.md", "(../shared/STYLE.md)",
                                  "jax_ecosystem.md §4.2"])
def test_the_pattern_catches_notes_citations(text):
  assert OUTSIDE_NOTES.search(text)


def test_the_pattern_spares_absolute_cluster_paths():
  assert not OUTSIDE_NOTES.search("--workdir=/shared/runs/swin_b --config.data.data_dir=/shared/tfds")
