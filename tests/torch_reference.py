"""The PyTorch side of the parity tests; runs under $SIMMIM_TORCH_PYTHON (torch + transformers 4.x).

  python torch_reference.py INPUTS.npz OUTPUT_DIR

INPUTS.npz holds `images` (NHWC float32) and `mask` ([B, h, w] int, 1 = masked) and optionally
`write_check` (the path of a .safetensors file written by simmim_jax, as a 0-d string array). For each model
below (random weights, small configs), OUTPUT_DIR/<name>.npz receives its state dict (keys `sd/<key>`) and
its outputs on those images and masks (keys `out/<name>`, NHWC). Also written: `swinv2.safetensors` (a
state dict through the safetensors package), `checkpoint.pth` (a training checkpoint through torch.save,
with metadata next to the weights), `tensors.pth` + `tensors.npz` (awkward tensors and their values) and
`write_check.npz` (what torch reads back from the simmim_jax-written safetensors file).
"""

import argparse
import os
import sys

import numpy as np
import safetensors.torch
import torch
import transformers as tr


def randomize(model: torch.nn.Module, seed: int) -> None:
  """Adds N(0, 0.1) noise to every parameter, so zero-initialized biases, mask tokens and tables matter."""
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(torch.randn(p.shape, generator=generator) * 0.1)


def state_dict(model: torch.nn.Module) -> dict[str, np.ndarray]:
  return {f"sd/{k}": v.detach().numpy().copy() for k, v in model.state_dict().items()}


def nchw(images: np.ndarray) -> torch.Tensor:
  return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()


def to_nhwc(x: torch.Tensor) -> np.ndarray:
  return x.permute(0, 2, 3, 1).detach().numpy()


def masked_image_modeling(name, model, images, mask, out_dir):
  """HF *ForMaskedImageModeling: reconstruction and loss on the same images and masks."""
  model.eval()
  bool_masked_pos = torch.from_numpy(mask.reshape(mask.shape[0], -1).astype(bool))
  with torch.no_grad():
    output = model(pixel_values=nchw(images), bool_masked_pos=bool_masked_pos)
  np.savez(os.path.join(out_dir, f"{name}.npz"), **state_dict(model),
           **{"out/reconstruction": to_nhwc(output.reconstruction), "out/loss": output.loss.numpy()})


def beit_simmim(name, images, mask, out_dir):
  """The official BEiT-style SimMIM ViT as HF BeitModel (shared relative position bias, layer scale 0.1, q/v
  bias, mask token, no absolute positions, LayerNorm eps 1e-6), plus the SimMIM head and loss written out
  from the official code: 1x1 conv -> PixelShuffle(patch) -> masked L1 / in_chans."""
  config = tr.BeitConfig(image_size=32, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=128, use_shared_relative_position_bias=True,
                         use_relative_position_bias=False, layer_scale_init_value=0.1, use_mask_token=True,
                         use_absolute_position_embeddings=False, use_mean_pooling=False, layer_norm_eps=1e-6)
  encoder = tr.BeitModel(config, add_pooling_layer=False)
  decoder = torch.nn.Sequential(torch.nn.Conv2d(32, 4 * 4 * 3, kernel_size=1), torch.nn.PixelShuffle(4))
  randomize(encoder, 3)
  randomize(decoder, 4)
  encoder.eval()
  x = nchw(images)
  mask_t = torch.from_numpy(mask.astype(np.int64))
  with torch.no_grad():
    hidden = encoder(pixel_values=x, bool_masked_pos=mask_t.reshape(mask.shape[0], -1).bool()).last_hidden_state
    batch, tokens, dim = hidden.shape
    grid = int((tokens - 1) ** 0.5)
    feature_map = hidden[:, 1:].transpose(1, 2).reshape(batch, dim, grid, grid)
    reconstruction = decoder(feature_map)
    pixel_mask = mask_t.repeat_interleave(4, 1).repeat_interleave(4, 2).unsqueeze(1).contiguous()
    loss_recon = torch.nn.functional.l1_loss(x, reconstruction, reduction="none")
    loss = (loss_recon * pixel_mask).sum() / (pixel_mask.sum() + 1e-5) / 3
  sd = {**state_dict(encoder), **{f"sd/decoder.0.{k.split('.', 1)[1]}": v.detach().numpy().copy()
                                  for k, v in decoder.state_dict().items()}}
  np.savez(os.path.join(out_dir, f"{name}.npz"), **sd,
           **{"out/last_hidden_state": hidden.numpy(), "out/reconstruction": to_nhwc(reconstruction),
              "out/loss": loss.numpy()})


def beit_classifier(name, images, out_dir):
  """The official fine-tune ViT layout: per-block relative position bias, mean pooling + fc_norm, head."""
  config = tr.BeitConfig(image_size=32, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=128, use_shared_relative_position_bias=False,
                         use_relative_position_bias=True, layer_scale_init_value=0.1,
                         use_absolute_position_embeddings=False, use_mean_pooling=True, layer_norm_eps=1e-6,
                         num_labels=5)
  model = tr.BeitForImageClassification(config)
  randomize(model, 5)
  model.eval()
  with torch.no_grad():
    logits = model(pixel_values=nchw(images)).logits
  np.savez(os.path.join(out_dir, f"{name}.npz"), **state_dict(model), **{"out/logits": logits.numpy()})


def files(out_dir, write_check):
  """torch.save / safetensors files for the readers, and a read-back of a simmim_jax-written file."""
  base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
  tensors = {
      "transposed": base.t(),                      # non-contiguous view (strides)
      "slice": base[1:3, 2:],                      # view with a storage offset, shares base's storage
      "base": base,
      "bf16": torch.linspace(-2, 2, 7).to(torch.bfloat16),
      "fp16": torch.linspace(-2, 2, 5).to(torch.float16),
      "int64": torch.tensor([[1, -2], [3, 4]], dtype=torch.int64),
      "bool": torch.tensor([True, False, True]),
      "scalar": torch.tensor(3.5),
      "empty": torch.zeros(0, 3),
      "parameter": torch.nn.Parameter(torch.ones(2, 2)),
  }
  torch.save(tensors, os.path.join(out_dir, "tensors.pth"))
  np.savez(os.path.join(out_dir, "tensors.npz"),
           **{k: (v.detach().float().numpy() if v.dtype == torch.bfloat16 else v.detach().numpy()) for k, v in
              tensors.items()})
  model = tr.SwinForMaskedImageModeling(tr.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[2, 2],
                                                      num_heads=[1, 2], window_size=4, encoder_stride=8))
  checkpoint = {"model": model.state_dict(), "optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]},
                "epoch": 3, "max_accuracy": 0.5, "config": argparse.Namespace(MODEL="swin", TAG="x")}
  torch.save(checkpoint, os.path.join(out_dir, "checkpoint.pth"))
  np.savez(os.path.join(out_dir, "checkpoint.npz"), **state_dict(model))
  if write_check:
    loaded = safetensors.torch.load_file(write_check)
    np.savez(os.path.join(out_dir, "write_check.npz"), **{k: v.numpy() for k, v in loaded.items()})


def main():
  inputs_path, out_dir = sys.argv[1:3]
  torch.manual_seed(0)
  torch.set_num_threads(2)
  inputs = np.load(inputs_path)
  images, mask = inputs["images"].astype(np.float32), inputs["mask"]

  vit = tr.ViTForMaskedImageModeling(tr.ViTConfig(image_size=32, patch_size=4, hidden_size=32, num_hidden_layers=2,
                                                  num_attention_heads=2, intermediate_size=128, encoder_stride=4))
  randomize(vit, 0)
  masked_image_modeling("hf_vit", vit, images, mask, out_dir)

  # Two stages: 8x8 (window 4, shifted odd block) and 4x4 (one unshifted window); HF Swin pads nothing here.
  swin = tr.SwinForMaskedImageModeling(tr.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[2, 2],
                                                     num_heads=[1, 2], window_size=4, encoder_stride=8))
  randomize(swin, 1)
  masked_image_modeling("hf_swin", swin, images, mask, out_dir)

  # Three stages: 8x8 shifted, 4x4 one window, 2x2 window clipped to 2 (V2 clips at construction).
  swinv2 = tr.Swinv2ForMaskedImageModeling(tr.Swinv2Config(image_size=32, patch_size=4, embed_dim=16,
                                                           depths=[2, 2, 2], num_heads=[1, 2, 4], window_size=4,
                                                           encoder_stride=16))
  randomize(swinv2, 2)
  masked_image_modeling("hf_swinv2", swinv2, images, mask, out_dir)
  safetensors.torch.save_file({k: v.contiguous() for k, v in swinv2.state_dict().items()},
                              os.path.join(out_dir, "swinv2.safetensors"))

  beit_simmim("beit_simmim", images, mask, out_dir)
  beit_classifier("beit_classifier", images, out_dir)
  files(out_dir, str(inputs["write_check"]) if "write_check" in inputs.files else "")


if __name__ == "__main__":
  main()
