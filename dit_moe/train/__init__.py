"""Training: typed experiment configs, the DeepSpeed engine wrapper, the loop and its metrics."""
