"""Everything that reads or writes files: the workdir (its one reader, checkpoints, metrics and logs), weight
files of other frameworks (official .pth, Hugging Face safetensors) and their conversion and export. Every
local write goes through `safe_files.py`; every user file is read through `simmim_jax/data/input_files.py`."""
