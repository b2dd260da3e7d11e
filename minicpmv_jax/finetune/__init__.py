"""Fine-tuning MiniCPM-V 2.6 in JAX: data, LoRA, the sharded train step, checkpoints and export."""
