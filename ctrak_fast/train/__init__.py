"""Model training: the diffusion models, their judges and the tiny text-to-image model
(`ctrak train`, the shipped assets). Benchmarks live in bench/."""
