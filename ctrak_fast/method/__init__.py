"""Concept-TRAK and its baselines: diffusion, losses, per-sample gradients, features, queries."""
