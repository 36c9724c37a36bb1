"""Training a gated transformer on a text with the next-token loss (``--mode=train``).

Why here: the paper's claims are about trained networks, and a language model trained by the
same code that analyses it makes the transformer study reproducible from a checkout, offline.

The model is ``config.model`` (bytes as tokens), trained with AdamW (decoupled weight decay on
the matrices, none on norms and biases), global-norm clipping and a linear warm-up into a cosine
decay. Each step reads ``train.batch_size`` windows of ``data.window + 1`` tokens at random
offsets of the training text, drawn from ``(seed, step)``: a resumed run reads the batches an
uninterrupted one does, so it ends in the same parameters. The held-out windows the analyses
read are evaluated every ``train.eval_every`` steps. Checkpoints (orbax, the config in their
metadata) every ``train.checkpoint_every`` steps and at the end; ``final_metrics.json`` at the
last step marks the run finished (``workdir.trained``), and only a finished run is analysed.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from resnet_ensemble import checkpoint, evaluate, lm_eval, transformer, writers
from resnet_ensemble.stopping import StopRequest, Stopped
from resnet_ensemble import config as config_lib, workdir as workdir_lib
from resnet_ensemble.progress import Progress, say

# Fields a resumed run may change: how often it logs, evaluates and saves, and the analyses.
RESUME_MAY_CHANGE = ("train.log_every", "train.eval_every", "train.checkpoint_every",
                     "train.progress_every_s", "eval", "lesion", "paths", "variant", "report",
                     "data.max_windows")


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


def make_optimizer(tc, num_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW on a warm-up + cosine schedule (to ``final_learning_rate_ratio`` of the peak)."""
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, tc.learning_rate, tc.warmup_steps, max(num_steps, tc.warmup_steps + 1),
      end_value=tc.learning_rate * tc.final_learning_rate_ratio)
  matrices = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # noqa: E731
  tx = optax.chain(optax.clip_by_global_norm(tc.grad_clip),
                   optax.adamw(schedule, b1=0.9, b2=tc.beta2, weight_decay=tc.weight_decay,
                               mask=matrices))
  return tx, schedule


def batch_at(tokens: np.ndarray, seed: int, step: int, batch_size: int,
             window: int) -> np.ndarray:
  """The windows of step ``step``: (batch_size, window + 1) at offsets drawn from (seed, step)."""
  if len(tokens) < window + 1:
    raise lm_eval.TextError(f"the training text has {len(tokens)} tokens, fewer than one "
                            f"window of {window + 1}")
  starts = np.random.default_rng([seed, step]).integers(0, len(tokens) - window, batch_size)
  return np.stack([tokens[s:s + window + 1] for s in starts])


def next_token_loss(model: transformer.GatedTransformer, params, windows_: jax.Array) -> jax.Array:
  logits = model.apply({"params": params}, windows_[:, :-1])
  return evaluate.cross_entropy(logits, windows_[:, 1:]).mean()


def make_train_step(model: transformer.GatedTransformer,
                    tx: optax.GradientTransformation) -> Callable:
  """``step(state, windows) -> (state, loss)``, compiled; the state's buffers are donated."""

  def step(state: TrainState, windows_: jax.Array):
    loss, grads = jax.value_and_grad(lambda p: next_token_loss(model, p, windows_))(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return TrainState(state.step + 1, optax.apply_updates(state.params, updates), opt_state), loss

  return jax.jit(step, donate_argnums=0)


def make_held_out_eval(model: transformer.GatedTransformer, windows_: np.ndarray,
                       batch_size: int) -> Callable:
  """``fn(params) -> {held_out_loss, held_out_error, held_out_bits_per_token}`` over every
  predicted token of ``windows_``: the intact model through the analyses' own evaluator, so the
  training's last row is their baseline."""
  batches, mask = (jnp.asarray(a) for a in lm_eval.batched(windows_, batch_size))
  evaluate = lm_eval.make_variant_evaluator(model)
  intact = np.ones((1, model.layout.n_branches), np.float32)

  def fn(params) -> dict[str, float]:
    out = jax.device_get(evaluate({"params": params}, batches, mask, intact))
    loss = float(out["loss"][0])
    return {"held_out_loss": loss, "held_out_error": float(1.0 - out["top1"][0]),
            "held_out_bits_per_token": loss / math.log(2)}

  return fn


def _guard_resume(workdir: str, config, saved: dict | None) -> None:
  """Refuses to resume a run with a config that changes what it computes."""
  if saved is None:
    return
  from resnet_ensemble.lm_config import base_config
  diffs = workdir_lib.config_differences(
      saved, workdir_lib.config_dict(config),
      lambda k: not config_lib.covered(k, RESUME_MAY_CHANGE), base=base_config())
  if diffs:
    raise workdir_lib.ConfigMismatchError(
        f"the workdir {workdir} holds a language model trained with another config; use a new "
        "workdir or the run's own settings. Differences:\n  " + "\n  ".join(diffs))


def _init_state(model, tx, seed: int, window: int) -> TrainState:
  variables = model.init(jax.random.key(seed), jnp.zeros((1, window), jnp.int32))
  return TrainState(jnp.zeros((), jnp.int32), variables["params"],
                    tx.init(variables["params"]))


def restore_params(config, workdir: str, model: transformer.GatedTransformer) -> dict:
  """The trained parameters in ``workdir`` (``{"params": ...}``); a ValueError (one line) when
  the run there has not finished ``train.steps`` steps."""
  steps = config.train.steps
  if not workdir_lib.trained(workdir, steps):
    at = workdir_lib.latest_step(workdir)
    raise ValueError(f"{workdir} holds no finished training of {steps} steps "
                     f"({'no checkpoint' if at is None else f'newest checkpoint: step {at}'}); "
                     "run --mode=train (or --mode=all) first")
  tx, _ = make_optimizer(config.train, steps)
  manager = checkpoint.make_manager(workdir)
  _guard_resume(workdir, config, checkpoint.saved_config(manager))
  abstract = jax.eval_shape(lambda: _init_state(model, tx, config.seed, config.data.window))
  state = checkpoint.restore_latest(manager, abstract)
  manager.close()
  return {"params": state.params}


def train(config, workdir: str, model: transformer.GatedTransformer, tokens: np.ndarray,
          held_out: np.ndarray) -> tuple[dict, dict]:
  """Trains ``model`` on ``tokens`` for ``config.train.steps`` steps in ``workdir`` (locked by
  the caller), resuming from its newest checkpoint; evaluates on the ``held_out`` windows.
  Returns the trained variables (``{"params": ...}``) and the final metrics (also written to
  ``final_metrics.json``)."""
  tc, window = config.train, config.data.window
  steps = tc.steps
  tx, schedule = make_optimizer(tc, steps)
  manager = checkpoint.make_manager(workdir)
  _guard_resume(workdir, config, checkpoint.saved_config(manager))
  state = checkpoint.restore_latest(
      manager, jax.eval_shape(lambda: _init_state(model, tx, config.seed, window)))
  if state is None:
    state = _init_state(model, tx, config.seed, window)
  step = int(state.step)
  if step:
    say(f"resumed from {workdir} at step {step}")
    workdir_lib.trim_metrics(workdir, step)
  workdir_lib.write_json(workdir, "config.json", workdir_lib.config_dict(config))
  saved_config = workdir_lib.config_dict(config)
  train_step = make_train_step(model, tx)
  held_out_eval = make_held_out_eval(model, held_out, config.eval.batch_size)
  writer = writers.create_writer(workdir)
  progress = Progress(steps, "train", start=step, every_s=tc.progress_every_s)
  losses, t_log, step_log = [], time.perf_counter(), step
  final: dict = {}
  try:
    with StopRequest() as stop:
      while step < steps and not stop.received:
        batch = jnp.asarray(batch_at(tokens, config.seed, step, tc.batch_size, window))
        state, loss = train_step(state, batch)
        losses.append(loss)
        step += 1
        done = step == steps
        if step % tc.log_every == 0 or done:
          mean = float(np.mean(jax.device_get(losses)))
          if not math.isfinite(mean):
            raise FloatingPointError(f"the training loss is {mean} at step {step}: the run "
                                     "diverged; its last checkpoint is kept")
          now = time.perf_counter()
          row = {"train_loss": mean, "learning_rate": float(schedule(step - 1)),
                 "steps_per_s": (step - step_log) / (now - t_log)}
          writer.write_scalars(step, row)
          progress.update(step, force=True, loss=mean)
          losses, t_log, step_log = [], now, step
        if step % tc.eval_every == 0 or done:
          final = held_out_eval(state.params)
          writer.write_scalars(step, final)
          say(f"eval at step {step}: " + " ".join(f"{k} {v:.4f}" for k, v in final.items()))
        if step % tc.checkpoint_every == 0 or done or stop.received:
          checkpoint.save(manager, step, state, saved_config)
      if stop.received:
        checkpoint.wait(manager)
        raise Stopped(stop.received, step, steps, [workdir])
    checkpoint.wait(manager)
  finally:
    writer.close()
    manager.close()
  if not final:  # resumed a finished run whose final metrics were not written
    final = held_out_eval(state.params)
  final = {"step": step, **final, "tokens_seen": step * tc.batch_size * window}
  workdir_lib.write_json(workdir, "final_metrics.json", final)
  return {"params": state.params}, final

