"""Training: the teacher's masked diffusion and the asymmetric distillation into a block-causal student."""
