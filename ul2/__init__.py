"""ul2: UL2 (Tay et al., 2022) in JAX/Flax.

Read in data-flow order: `vocabulary` -> `denoisers` -> `data` -> `network` -> `flops` ->
`partitioning` -> `adafactor` -> `train` -> `checkpoints` -> `decoding` -> `evaluation` -> `interop`
(README, "Architecture", says what each owns).
"""
