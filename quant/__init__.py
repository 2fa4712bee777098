"""Offline quantization: quantizer, GPTQ, low-rank branches, FBQuant, layer-by-layer driver, checkpoints."""
