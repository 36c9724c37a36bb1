"""SGD with momentum, coupled weight decay (as PyTorch's SGD and the paper), LR schedules."""

from __future__ import annotations

import jax.numpy as jnp
import optax


def learning_rate_schedule(c, num_steps: int) -> optax.Schedule:
  """Warm-up ('constant': He et al.'s 0.01 for the first steps, or 'linear'), then 'piecewise'
  (x decay_factor at each absolute step in ``boundaries``) or 'cosine' (to 0 at ``num_steps``)."""
  if c.schedule not in ("piecewise", "cosine"):
    raise ValueError(f"unknown schedule {c.schedule!r}; valid: piecewise, cosine")
  if c.warmup not in ("constant", "linear"):
    raise ValueError(f"unknown warmup {c.warmup!r}; valid: constant, linear")
  boundaries = tuple(int(b) for b in c.boundaries)

  def schedule(step):
    step = jnp.asarray(step)
    if c.schedule == "piecewise":
      drops = sum((step >= b).astype(jnp.float32) for b in boundaries) if boundaries else 0.0
      lr = c.learning_rate * c.decay_factor ** drops
    else:
      t = jnp.clip((step - c.warmup_steps) / max(num_steps - c.warmup_steps, 1), 0.0, 1.0)
      lr = c.learning_rate * 0.5 * (1.0 + jnp.cos(jnp.pi * t))
    if c.warmup_steps:
      if c.warmup == "constant":
        warm = c.warmup_learning_rate
      else:
        warm = c.warmup_learning_rate + (c.learning_rate - c.warmup_learning_rate) * step / c.warmup_steps
      lr = jnp.where(step < c.warmup_steps, warm, lr)
    return jnp.asarray(lr, jnp.float32)

  return schedule


def make_optimizer(c, num_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Weight decay added to the gradient before momentum (PyTorch SGD semantics)."""
  schedule = learning_rate_schedule(c, num_steps)
  tx = optax.chain(optax.add_decayed_weights(c.weight_decay),
                   optax.sgd(schedule, momentum=c.momentum or None, nesterov=c.nesterov))
  return tx, schedule
