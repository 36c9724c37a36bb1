"""Evaluation windows of a held-out text, and the measures of many damaged language models.

A text is tokenised once (the model folder's tokenizer, or ``byte_tokens``: bytes as tokens,
for our own models) and cut into windows of ``length + 1`` tokens: the model reads the first
``length`` and predicts each next one. The windows stay on the device, like CIFAR's test
images, padded to whole batches with a mask.

A *variant* is a gate vector over the branches run (zeros delete them) and, optionally, an
index array over the stacked layers (``transformer.GatedTransformer``'s ``order``). Per
variant, over every predicted token: the mean next-token loss, the top-1 accuracy, and the KL
divergence KL(intact || variant) of its next-token distribution from the intact model's (the
measures of Lad et al., 2024). ``make_variant_evaluator`` runs a chunk of variants as one
compiled program: per batch the intact model runs once, and the variants under ``vmap``.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from resnet_ensemble import evaluate
from resnet_ensemble.transformer import GatedTransformer, InputError, check_order

BYTE_VOCAB = 256


class TextError(ValueError):
  """A text that cannot give evaluation windows (a user error: one line)."""


def byte_tokens(text: str | bytes) -> np.ndarray:
  """A text as its UTF-8 bytes, one token each (vocabulary 256)."""
  data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
  return np.frombuffer(data, np.uint8).astype(np.int32)


def tokenize(tokenizer, text: str) -> np.ndarray:
  """A text as the ids of a ``tokenizers.Tokenizer`` (int32)."""
  return np.asarray(tokenizer.encode(text).ids, np.int32)


def windows(tokens, length: int, stride: int | None = None, name: str = "the text") -> np.ndarray:
  """(n, length + 1) windows of ``tokens``, starting every ``stride`` (default ``length``:
  each token is predicted once) tokens; what is left after the last whole window is dropped."""
  tokens = np.asarray(tokens, np.int32)
  stride = stride or length
  if length < 1 or stride < 1:
    raise TextError(f"window length ({length}) and stride ({stride}) must be positive")
  if tokens.ndim != 1 or len(tokens) < length + 1:
    raise TextError(f"{name} has {tokens.size} tokens, shorter than one window of {length + 1} "
                    f"({length} read, each predicting the next)")
  starts = np.arange(0, len(tokens) - length, stride)
  return np.stack([tokens[s:s + length + 1] for s in starts])


def batched(windows_: np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
  """(batches (b, batch_size, length + 1), mask (b, batch_size)): the windows padded with
  masked copies of the first to whole batches, the form the evaluator reads."""
  n = len(windows_)
  b = -(-n // batch_size)
  pad = b * batch_size - n
  padded = np.concatenate([windows_, np.repeat(windows_[:1], pad, axis=0)])
  mask = np.arange(b * batch_size) < n
  return (padded.reshape(b, batch_size, -1),
          mask.reshape(b, batch_size).astype(np.float32))


def measures(logits: jax.Array, targets: jax.Array, intact_logp: jax.Array,
             mask: jax.Array) -> dict[str, jax.Array]:
  """Sums over the unmasked windows' tokens: loss, top-1 hits, KL(intact || variant), count.
  ``logits`` (batch, time, vocab); ``intact_logp`` the intact model's log-probabilities."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = evaluate.cross_entropy(logits.astype(jnp.float32), targets)  # the ResNets' loss
  hit = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  kl = jnp.sum(jnp.exp(intact_logp) * (intact_logp - logp), axis=-1)
  m = mask[:, None] * jnp.ones_like(nll)
  return {"loss": jnp.sum(nll * m), "top1": jnp.sum(hit * m), "kl": jnp.sum(kl * m),
          "count": jnp.sum(m)}


def make_variant_evaluator(model: GatedTransformer, reorder: bool = False) -> Callable:
  """``fn(variables, batches, mask, gates (G, 2M)) -> {loss, top1, kl, count}`` each (G,): the
  mean next-token loss, top-1 accuracy and KL from the intact model per variant over every
  predicted token (``count`` of them). With ``reorder``, ``fn(..., gates, orders (G, M))``.

  One compiled program per chunk shape: a scan over the batches, the intact model once per
  batch, the variants under ``vmap`` (gated variants share the weights; reordered ones each
  gather their own). ``batches``, ``mask``: ``batched``'s, resident on the device."""

  def one(variables, tokens, targets, mask, intact_logp, gates, order=None):
    logits = model.apply(variables, tokens, gates=gates, order=order)
    return measures(logits, targets, intact_logp, mask)

  variants = jax.vmap(one, in_axes=(None, None, None, None, None, 0) + ((0,) if reorder else ()))

  def evaluate(variables, batches, mask, gates, orders=None):
    def step(total, batch):
      windows_, m = batch
      tokens, targets = windows_[:, :-1], windows_[:, 1:]
      intact = jax.nn.log_softmax(model.apply(variables, tokens).astype(jnp.float32), axis=-1)
      extra = (orders,) if reorder else ()
      out = variants(variables, tokens, targets, m, intact, gates, *extra)
      return jax.tree.map(jnp.add, total, out), None

    g = gates.shape[0]
    zero = {k: jnp.zeros((g,), jnp.float32) for k in ("loss", "top1", "kl", "count")}
    total, _ = jax.lax.scan(step, zero, (batches, mask))
    count = total["count"]
    return {"loss": total["loss"] / count, "top1": total["top1"] / count,
            "kl": total["kl"] / count, "count": count}

  compiled = jax.jit(evaluate)

  def checked(variables, batches, mask, gates, orders=None):
    """Validates the variants (one line each) before the compiled program sees them."""
    gates = np.asarray(gates) if not isinstance(gates, jax.Array) else gates
    if (orders is None) == reorder:
      raise TypeError("orders are " + ("required" if reorder else "not taken") +
                      " (make_variant_evaluator(reorder=...))")
    runs = model.n_layers
    if reorder:
      if not isinstance(orders, jax.core.Tracer):
        o = np.asarray(orders)
        if o.ndim != 2 or o.shape[0] != gates.shape[0]:
          raise InputError(f"orders must have shape (variants, layers run) with {gates.shape[0]} "
                           f"variants; got {o.shape}")
        orders = np.stack([check_order(model.n_layers, row) for row in o])
      runs = orders.shape[1]
    if gates.ndim != 2 or gates.shape[1] != 2 * runs:
      raise InputError(f"gates must have shape (variants, {2 * runs}): one per branch of the "
                       f"{runs} layers run; got {gates.shape}")
    return compiled(variables, batches, mask, gates, orders)

  return checked
