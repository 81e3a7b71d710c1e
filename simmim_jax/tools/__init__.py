"""Programs on top of the core: ahead-of-time compilation for a topology (`aot.py`) and reconstructions of
images by a trained model (`reconstruct.py`)."""
