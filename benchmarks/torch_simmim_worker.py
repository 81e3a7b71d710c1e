"""PyTorch side of `train_throughput.py --compare torch`: HF transformers' SimMIM models, timed on command.

Runs in a separate interpreter (on CPU here: the Python 3.11 torch venv at $SIMMIM_TORCH_PYTHON), so the
JAX and PyTorch measurements can be interleaved in one run. It imports only torch, transformers and
the standard-library `process_usage.py` beside it.

Protocol (one JSON object per line, both ways):
  argv[1] = the spec: {"family": "vit"|"swin", "img_size", "patch_size", "embed_dim", "depth" | "depths",
            "num_heads", "mlp_dim", "window_size", "encoder_stride", "batch", "mask_ratio", "amp", "threads",
            "clip_grad" (global-norm gradient clipping as the official SimMIM step; 0 / absent: none)}
  stdin  "steps N"  -> {"step_times": [N seconds], "per_step": rusage, "peak_bytes": CUDA peak allocated
            or null}   (each step synchronized)
  stdin  "matmul N" -> {"matmul_flops_per_sec": median over N 2048^2 (4096^2 on GPU) products}
  stdin  "quit"
"""

import json
import os
import statistics
import sys
import time

import torch
import transformers

import process_usage  # benchmarks/ is this script's directory, so first on sys.path


def build_model(spec):
  common = dict(image_size=spec["img_size"], patch_size=spec["patch_size"], num_channels=3,
                encoder_stride=spec["encoder_stride"], hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0)
  if spec["family"] == "vit":
    config = transformers.ViTConfig(hidden_size=spec["embed_dim"], num_hidden_layers=spec["depth"],
                                    num_attention_heads=spec["num_heads"], intermediate_size=spec["mlp_dim"],
                                    **common)
    return transformers.ViTForMaskedImageModeling(config)
  config = transformers.SwinConfig(embed_dim=spec["embed_dim"], depths=spec["depths"],
                                   num_heads=spec["num_heads"], window_size=spec["window_size"],
                                   drop_path_rate=0.0, **common)
  return transformers.SwinForMaskedImageModeling(config)


def main():
  spec = json.loads(sys.argv[1])
  torch.manual_seed(0)
  if spec.get("threads"):
    torch.set_num_threads(spec["threads"])
  device = "cuda" if torch.cuda.is_available() else "cpu"
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  model = build_model(spec).to(device).train()
  optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
  batch, size = spec["batch"], spec["img_size"]
  grid = size // spec["patch_size"]
  images = torch.randn(batch, 3, size, size, device=device)
  num_masked = int(round(grid * grid * spec["mask_ratio"]))
  amp = spec.get("amp") and device == "cuda"

  def step():
    # A fresh random mask per step, at the model patch grid (the mask geometry does not change the cost).
    mask = torch.zeros(batch, grid * grid, dtype=torch.bool, device=device)
    mask[:, torch.randperm(grid * grid, device=device)[:num_masked]] = True
    with torch.autocast(device, dtype=torch.bfloat16, enabled=bool(amp)):
      loss = model(pixel_values=images, bool_masked_pos=mask).loss
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if spec.get("clip_grad"):
      torch.nn.utils.clip_grad_norm_(model.parameters(), spec["clip_grad"])
    optimizer.step()

  print(json.dumps({"ready": True, "torch": torch.__version__, "transformers": transformers.__version__,
                    "threads": torch.get_num_threads(), "device": device,
                    "attn_implementation": getattr(model.config, "_attn_implementation", None),
                    "glibc_tunables": os.environ.get("GLIBC_TUNABLES")}), flush=True)
  for line in sys.stdin:
    command, *args = line.split()
    if command == "steps":
      times = []
      before = process_usage.reading()
      for _ in range(int(args[0])):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
      per_step = process_usage.rusage_per_step(before, process_usage.reading(), len(times))
      peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
      print(json.dumps({"step_times": times, "per_step": per_step, "peak_bytes": peak}), flush=True)
    elif command == "matmul":
      n = 4096 if device == "cuda" else 2048
      dtype = torch.bfloat16 if amp else torch.float32
      a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
      rates = []
      for i in range(int(args[0]) + 3):
        sync()
        start = time.perf_counter()
        torch.mm(a, b)
        sync()
        if i >= 3:
          rates.append(2 * n ** 3 / (time.perf_counter() - start))
      print(json.dumps({"matmul_flops_per_sec": statistics.median(rates)}), flush=True)
    elif command == "quit":
      return


if __name__ == "__main__":
  main()
