"""Model-step distillation of the learned Clockwork adaptor (PAPER.md "Training: model-step distillation").

Stages, one module each:
  * ``data``       unroll the frozen teacher UNet's sampling trajectories from pure noise (the bundle's sampler, steps
                   and guidance; clock 1) and keep, at every step the clock gives to the adaptor, the training pair
                   (r_in(t), r_out(t+1), temb, pooled text) -> r_out(t); streamed to disk and cached by settings
  * ``checkpoint`` the adaptor checkpoint (safetensors + settings in its metadata), its resume sidecar, and the checks
                   that tie a checkpoint to a model hash, sampler, step count and clock
  * ``train``      the training loop (Adam on an L2 loss, only the adaptor trains), data-parallel under
                   ``accelerate``/``torchrun`` with the same code path; ``cw-export distill``
  * ``evaluate``   held-out comparison of full (clock 1), identity and learned adaptors
  * ``cost``       adaptor parameters and MACs against the UNet's
"""

DEFAULT_EPOCHS = 30  # cw-export distill's default (docs/distillation.md has what it reaches); the paper ran 120
