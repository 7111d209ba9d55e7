"""Per-sample gradients: torch.func reference, hooks, layerwise and factorised projection."""
