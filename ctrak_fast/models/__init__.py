"""eps(x_t, t, c) models: the FactorUNet and the diffusers adapters."""
