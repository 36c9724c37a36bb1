"""The experiments on a gated transformer: E1, E3, E4 (``lesion.json``), E6/E7 and the E5/E9
counts (``gradients.json``), and one hand-given variant (``variant.json``).

Each experiment is one compiled program: its variants (``lm_variants``) go through
``lm_eval.make_variant_evaluator`` in chunks of ``lesion.chunk`` (the last one padded), so every
call has the same shape. The measures per variant are the mean next-token loss, the top-1 error
and KL(intact || variant) over every predicted token of the held-out text.

E6 routes the gradient of the next-token loss along paths through the 2L branches with
``path_gradients``' machinery, at the embedding output (the stream the first layer reads): a
pre-norm layer's branch b maps y to (y, f_b(y)) and its merge is the identity.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from resnet_ensemble import (lm_corpus, lm_eval, lm_train, lm_variants, models, path_counts,
                             path_gradients, transformer, transformer_import,
                             workdir as workdir_lib)
from resnet_ensemble.lm_config import validate
from resnet_ensemble.progress import say

MEASURES = ("loss", "error", "kl")


@dataclasses.dataclass(frozen=True)
class Subject:
  """The model analysed and its held-out windows."""

  model: transformer.GatedTransformer
  variables: dict
  windows: np.ndarray          # (n, window + 1) tokens
  source: str                  # where the model came from
  tokenizer: str               # "bytes" or the tokenizer file
  corpus: dict = dataclasses.field(default_factory=dict)  # the texts (lm_corpus' description)
  train_tokens: np.ndarray | None = None                  # the training text (train.steps)

  @property
  def layout(self) -> transformer.TransformerLayout:
    return self.model.layout

  def describe(self) -> dict:
    return {"model_source": self.source, "tokenizer": self.tokenizer,
            "windows": int(len(self.windows)), "window": int(self.windows.shape[1] - 1),
            "tokens_predicted": int(self.windows[:, 1:].size), "layout": self.layout.describe(),
            "corpus": self.corpus}


def fresh_model(c) -> transformer.GatedTransformer:
  """The model of ``c.model`` (gpt2 or llama settings), not yet initialised."""
  m = c.model
  unroll = models.scan_unroll(m.unroll, m.n_layers)
  if m.name == "gpt2":
    return transformer.gpt2(m.vocab_size, m.n_layers, m.d_model, m.n_heads, m.d_ff,
                            max_positions=m.max_positions, unroll=unroll)
  return transformer.llama(m.vocab_size, m.n_layers, m.d_model, m.n_heads, m.d_ff,
                           unroll=unroll)


def _read_text(name: str, field: str) -> str:
  path = os.path.expanduser(name)
  if not os.path.isfile(path):
    raise ValueError(f"--config.data.{field}={name}: no such file")
  with open(path, "rb") as f:
    raw = f.read()
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise ValueError(f"--config.data.{field}={name} is not UTF-8 text: {e}") from None


def texts(config) -> tuple[str, str | None, dict]:
  """(held-out text, training text (None without ``train.steps``), the corpus's description)."""
  d = config.data
  if d.corpus:
    corpus = lm_corpus.load(d.corpus)
    return corpus.held_out, corpus.train, corpus.about
  train = _read_text(d.train_text, "train_text") if config.train.steps else None
  return _read_text(d.text, "text"), train, {"held_out": d.text, "train": d.train_text or None}


def load(config, workdir: str | None = None, restore: bool = True) -> Subject:
  """The model and the held-out windows of ``config.data``; every problem a one-line
  ValueError. The model is imported from ``config.weights``, trained here (``train.steps``:
  restored from ``workdir`` when ``restore``, else left for ``lm_train.train``: variables
  None) or freshly initialised with ``config.seed``."""
  validate(config)
  d = config.data
  text, train_text, corpus = texts(config)
  name = d.corpus or d.text
  train_tokens = None
  if config.weights:
    use_folder = d.tokenizer in ("auto", "folder")
    imported = transformer_import.load(config.weights, tokenizer=False)
    model, variables, source = imported.model, imported.variables, imported.folder
    if use_folder:
      try:
        tok = transformer_import.load_tokenizer(imported.folder)
      except transformer_import.ModelFolderError as e:
        raise transformer_import.ModelFolderError(
            f"{e} (--config.data.tokenizer=bytes reads the text as bytes instead)") from None
      tokens = lm_eval.tokenize(tok, text)
      tokenizer = os.path.join(imported.folder, transformer_import.TOKENIZER_FILE)
    else:
      tokens, tokenizer = lm_eval.byte_tokens(text), "bytes"
  else:
    if d.tokenizer == "folder":
      raise ValueError("--config.data.tokenizer=folder needs --config.weights (a model folder)")
    model, tokenizer = fresh_model(config), "bytes"
    tokens = lm_eval.byte_tokens(text)
    variables = None
    if config.train.steps:
      source = f"trained here ({config.train.steps} steps on {d.corpus or d.train_text})"
      train_tokens = lm_eval.byte_tokens(train_text)
      if len(train_tokens) < d.window + 1:
        raise lm_eval.TextError(f"the training text of {name} has {len(train_tokens)} tokens, "
                                f"fewer than one window of {d.window + 1}")
    else:
      source = f"init(seed={config.seed})"
  if tokens.size and int(tokens.max()) >= model.vocab_size:
    raise ValueError(f"the text's tokens ({tokenizer}) reach id {int(tokens.max())}, outside the "
                     f"model's vocabulary of {model.vocab_size}")
  if model.positions == "learned" and d.window > model.max_positions:
    raise ValueError(f"--config.data.window={d.window} is longer than the model's "
                     f"{model.max_positions} learned positions")
  windows = lm_eval.windows(tokens, d.window, name=f"the text {name}")
  if d.max_windows:
    windows = windows[:d.max_windows]
  if variables is None and config.train.steps:
    if restore:
      if workdir is None:
        raise ValueError("a model trained here (--config.train.steps) is read from its workdir")
      variables = lm_train.restore_params(config, workdir, model)
  elif variables is None:
    variables = jax.jit(model.init)(jax.random.key(config.seed), jnp.asarray(windows[:1, :-1]))
  return Subject(model, variables, windows, source, tokenizer, corpus, train_tokens)


class Evaluator:
  """Variants through one compiled program per variant shape, in chunks of ``chunk``."""

  def __init__(self, subject: Subject, batch_size: int, chunk: int):
    self.subject, self.chunk = subject, chunk
    batches, mask = lm_eval.batched(subject.windows, batch_size)
    self.batches, self.mask = jnp.asarray(batches), jnp.asarray(mask)
    self._fns = {reorder: lm_eval.make_variant_evaluator(subject.model, reorder)
                 for reorder in (False, True)}

  def __call__(self, gates: np.ndarray, orders: np.ndarray | None = None,
               desc: str = "") -> dict[str, np.ndarray]:
    """{loss, error, kl} (G,) each for the G variants."""
    gates = np.asarray(gates, np.float32)
    g, c = len(gates), self.chunk
    pad = -g % c
    gates = np.concatenate([gates, np.repeat(gates[:1], pad, 0)])
    if orders is not None:
      orders = np.concatenate([orders, np.repeat(orders[:1], pad, 0)]).astype(np.int32)
    fn = self._fns[orders is not None]
    out: dict[str, list] = {k: [] for k in MEASURES}
    for s in range(0, len(gates), c):
      extra = () if orders is None else (orders[s:s + c],)
      r = jax.device_get(fn(self.subject.variables, self.batches, self.mask, gates[s:s + c],
                            *extra))
      out["loss"].append(r["loss"])
      out["error"].append(1.0 - r["top1"])
      out["kl"].append(r["kl"])
    if desc:
      say(f"{desc}: {g} variants")
    return {k: np.concatenate(v)[:g].astype(np.float64) for k, v in out.items()}


def _rows(m: dict[str, np.ndarray], shape=None) -> dict[str, list]:
  return {k: (v.reshape(shape) if shape else v).tolist() for k, v in m.items()}


def _stats(m: dict[str, np.ndarray], ks: int) -> dict:
  """E3's per-k summaries (over the draws) of each measure, and the draws themselves."""
  out = {}
  for k, v in m.items():
    v = v.reshape(ks, -1)
    out[k] = v.tolist()
    out[f"{k}_mean"], out[f"{k}_std"] = v.mean(1).tolist(), v.std(1).tolist()
  return out


def run_lesion(config, workdir: str, subject: Subject | None = None) -> dict:
  """E1, E3 and E4 (with the painters interventions); writes and returns ``lesion.json``."""
  s = subject or load(config)
  lc, n_layers = config.lesion, s.layout.n_layers
  n = 2 * n_layers
  rng = np.random.default_rng(config.seed)
  ev = Evaluator(s, config.eval.batch_size, lc.chunk)
  # E1: the intact model, each branch, each layer (one program: gates only).
  gates = np.concatenate([np.ones((1, n), np.float32), lm_variants.single_branch_gates(n_layers),
                          lm_variants.single_layer_gates(n_layers)])
  e1 = ev(gates, desc="baseline and E1 (delete one branch, one layer)")
  pick = lambda m, a, b: {k: v[a:b] for k, v in m.items()}  # noqa: E731
  out: dict[str, Any] = {
      "config": workdir_lib.config_dict(config), **s.describe(), "seed": config.seed,
      "model_kind": "transformer",
      "baseline": {k: float(v[0]) for k, v in e1.items()},
      "single": {"branch": list(s.layout.branch_names),
                 "kind": list(s.layout.branch_kinds), **_rows(pick(e1, 1, 1 + n))},
      "single_layer": _rows(pick(e1, 1 + n, 1 + n + n_layers)),
  }
  # E3: k random branches, of all and of all but the first and last layer's.
  variants = [("random", False)]
  if lc.keep_ends_variant and n_layers >= 3:
    variants.append(("random_keep_ends", True))
  for name, keep_ends in variants:
    ks = list(range(min(lc.max_k, len(lm_variants.eligible_branches(n_layers, keep_ends))) + 1))
    if lc.draws == 0:
      continue
    gates = np.concatenate([lm_variants.random_deletion_gates(rng, n_layers, k, lc.draws,
                                                              keep_ends) for k in ks])
    m = ev(gates, desc=f"E3 delete k branches ({name})")
    out[name] = {"k": ks, "draws": lc.draws, "keep_ends": keep_ends, **_stats(m, len(ks))}
  # E4: adjacent swaps and k random swaps (one program: orders of L layers).
  if n_layers >= 2:
    adjacent = lm_variants.adjacent_swap_orders(n_layers)
    ks = list(range(1, lc.reorder_max_swaps + 1)) if lc.reorder_draws else []
    random = (np.concatenate([lm_variants.random_swap_orders(rng, n_layers, k, lc.reorder_draws)
                              for k in ks]) if ks else np.zeros((0, n_layers), np.int32))
    orders = np.concatenate([adjacent, random])
    m = ev(np.ones((len(orders), n), np.float32), orders, desc="E4 reorder layers")
    out["adjacent_swaps"] = {"pairs": [[i, i + 1] for i in range(n_layers - 1)],
                             "tau": lm_variants.kendall_taus(adjacent).tolist(),
                             **_rows(pick(m, 0, len(adjacent)))}
    if ks:
      rest = pick(m, len(adjacent), len(orders))
      out["reorder"] = {"k": ks, "draws": lc.reorder_draws,
                        "tau": lm_variants.kendall_taus(random).reshape(len(ks), -1).tolist(),
                        **_rows(rest, (len(ks), -1)),
                        "single_swaps": [np.flatnonzero(o != np.arange(n_layers)).tolist()
                                         for o in random[:lc.reorder_draws]]}
  # E4 painters: one program of L + 1 positions.
  if n_layers >= 3:
    p = lm_variants.painters(rng, n_layers, lc.shuffles)
    m = ev(p.gates, p.orders, desc="E4 painters (repeat, reverse, shuffle, skip)")
    out["painters"] = {
        "span": list(lm_variants.middle_span(n_layers)),
        "rows": [{"name": name, "order": run,
                  "tau": (_tau(run) if sorted(run) == list(range(n_layers)) else None),
                  **{k: float(m[k][i]) for k in MEASURES}}
                 for i, (name, run) in enumerate(zip(p.names, p.runs))]}
  workdir_lib.write_json(workdir, "lesion.json", out)
  return out


def _tau(order) -> float:
  return float(lm_variants.kendall_taus(np.asarray([order]))[0])


# ---------------------------------------------------------------------------------------------
# E6/E7: the gradient per path length at the embedding output.


def path_view(model: transformer.GatedTransformer, variables) -> models.Unrolled:
  """The transformer in ``path_gradients``' form: the input is the embedding output (embed is
  the identity), branch b maps y to (y, f_b(y)), merges are the identity, and the head gives
  (batch * time, vocab) logits, so the loss over flattened next tokens is the mean next-token
  loss."""
  u = transformer.unroll(model, variables)
  identity = lambda y: y  # noqa: E731
  branches = tuple((lambda y, f=f: (y, f(y))) for f in u.branches)
  return models.Unrolled(embed=identity, branches=branches, merges=(identity,) * len(branches),
                         head=lambda y: u.head(y).reshape(-1, model.vocab_size))


def make_gradient_fn(model: transformer.GatedTransformer):
  """``fn(variables, windows (B, T + 1), selections (P, 2L)) -> Scaled norms (2P,)``: the
  routed gradient norms at the embedding output of P paths and their complements (one
  compiled program)."""
  fn = path_gradients.make_path_gradient_fn(lambda v: path_view(model, v), paired=True)

  def norms(variables, windows_, selections):
    tokens, targets = windows_[:, :-1], windows_[:, 1:]
    y0 = transformer.unroll(model, variables).embed(tokens)
    return fn(variables, y0, targets.reshape(-1), selections)[0]

  return jax.jit(norms)


def run_gradients(config, workdir: str, subject: Subject | None = None) -> dict:
  """E6 and E7 (and the E5/E9 path counts over 2L branches); writes ``gradients.json``."""
  s = subject or load(config)
  pc, n = config.paths, s.layout.n_branches
  rng = np.random.default_rng(config.seed)
  selections, lengths = path_gradients.shuffled_pairs(rng, n, pc.samples_per_k)
  q, chunk = len(selections), max(1, -(-pc.chunk // 2))  # pairs per call
  fn = make_gradient_fn(s.model)
  windows = s.windows
  log10 = np.zeros((2, q))
  order = rng.permutation(len(windows))
  for i, start in enumerate(range(0, q, chunk)):
    # A new batch of windows for each chunk of paths, cycling through the text.
    take = order[(np.arange(pc.batch_size) + i * pc.batch_size) % len(windows)]
    sel = selections[start:start + chunk]
    padded = np.concatenate([sel, np.zeros((chunk - len(sel), n), np.float32)])
    norms = jax.device_get(fn(s.variables, jnp.asarray(windows[take]), jnp.asarray(padded)))
    log10[:, start:start + len(sel)] = norms.log10().reshape(2, chunk)[:, :len(sel)]
  say(f"E6 routed path gradients: {2 * q} paths")
  log10 = log10.reshape(2 * q)
  summary = path_gradients.summarise(n, np.stack([log10, log10], 1), lengths,
                                     pc.samples_per_k, pc.batch_size)
  g = summary["gradient"]
  for key in [k for k in g if k.endswith("_image")]:  # the input is the embedding output
    del g[key]
  out = {"n": n, "config": workdir_lib.config_dict(config), **s.describe(),
         "model_kind": "transformer", "gradient_at": "embedding output",
         "path_counts": path_counts.path_counts(n), **summary}
  workdir_lib.write_json(workdir, workdir_lib.GRADIENTS_FILE, out)
  return out


# ---------------------------------------------------------------------------------------------
# One variant given by hand.


def variant_of(config, n_layers: int) -> tuple[np.ndarray, np.ndarray]:
  """(order, gates) of ``config.variant``, validated (an InputError, one line)."""
  order = (transformer.check_order(n_layers, list(config.variant.order)) if config.variant.order
           else np.arange(n_layers, dtype=np.int32))
  gates = (np.asarray(config.variant.gates, np.float32) if config.variant.gates
           else np.ones(2 * len(order), np.float32))
  if gates.shape != (2 * len(order),):
    raise transformer.InputError(
        f"--config.variant.gates has {gates.size} entries; the order runs {len(order)} layers, "
        f"so it takes {2 * len(order)} (attention and MLP of each)")
  return order, gates


def run_variant(config, workdir: str, subject: Subject | None = None) -> dict:
  """The intact model and ``config.variant`` (an order and gates); writes ``variant.json``."""
  s = subject or load(config)
  order, gates = variant_of(config, s.layout.n_layers)
  ev = Evaluator(s, config.eval.batch_size, 1)
  m = ev(gates[None], order[None])
  out = {"config": workdir_lib.config_dict(config), **s.describe(),
         "order": order.tolist(), "gates": gates.tolist(),
         **{k: float(v[0]) for k, v in m.items()}}
  workdir_lib.write_json(workdir, "variant.json", out)
  return out
