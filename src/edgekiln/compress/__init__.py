"""Torch-side compression mechanics: pruning, distillation, quantization-aware training."""
