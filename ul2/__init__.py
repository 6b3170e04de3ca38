"""ul2: UL2 (Tay et al., 2022) in JAX/Flax.

Read in data-flow order: `denoisers` -> `network` -> `partitioning` -> `train` -> `decoding`.
"""
