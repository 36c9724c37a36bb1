"""A gated pre-norm decoder transformer: the residual branches are gated like the ResNets'.

Each layer adds two residual branches to the stream, each multiplied by its gate:

    x = x + gate[2l]     * attn_l(norm(x))
    x = x + gate[2l + 1] * mlp_l(norm(x))

so in the unraveled view a transformer of L layers has n = 2L branches, numbered in forward
order (attn_0, mlp_0, attn_1, mlp_1, ...; ``TransformerLayout``). The gates are a run-time
array of shape ``(2M,)`` or ``(2M, batch)`` for a run of M layers; ``layer_gates`` turns
per-layer gates ``(M,)`` into branch gates.

The L identical layers are stacked on a leading parameter axis (``blocks``) and run with
``nn.scan``; ``order`` (an index array over that axis, M entries in 0..L-1) picks the layer run
at each position, so a permutation reorders the layers and a repeated index repeats one, with
no new model: the stacked parameters are gathered by ``order`` before the scan. The gates
index positions of that run, as for the ResNets' reordered blocks.

One module covers two families (``gpt2``, ``llama`` give their settings):

- GPT-2: LayerNorm, a GELU MLP, learned positions, biases everywhere, tied embeddings;
- Llama: RMSNorm, a SwiGLU MLP, rotary positions, grouped-query attention (``n_kv_heads``);
  Mistral adds a sliding window (``sliding_window``), Qwen2 biases on q, k and v.

Parallel attention + MLP blocks (GPT-J, Pythia/GPT-NeoX) are not this module: there both
branches read the same input, so a layer is one node of the unraveled graph, not two.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from resnet_ensemble import gates as gates_lib, models

Array = jax.Array

BRANCH_KINDS = ("attn", "mlp")
NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "swiglu")
POSITIONS = ("learned", "rotary")
ACTIVATIONS = ("gelu_tanh", "gelu", "silu", "relu")


class InputError(ValueError):
  """Gates, an order or tokens that do not fit the model (a user error: one line)."""


@dataclasses.dataclass(frozen=True)
class TransformerLayout:
  """The branch indexing: layer l's attention is branch 2l, its MLP branch 2l + 1."""

  n_layers: int

  @property
  def n_branches(self) -> int:
    return 2 * self.n_layers

  @property
  def branch_kinds(self) -> tuple[str, ...]:
    return BRANCH_KINDS * self.n_layers

  @property
  def branch_names(self) -> tuple[str, ...]:
    return tuple(f"{k}_{l}" for l in range(self.n_layers) for k in BRANCH_KINDS)

  def branch(self, layer: int, kind: str) -> int:
    """The branch index of ``kind`` ("attn" or "mlp") in ``layer``."""
    if kind not in BRANCH_KINDS:
      raise ValueError(f"unknown branch kind {kind!r}; valid: {', '.join(BRANCH_KINDS)}")
    if not 0 <= layer < self.n_layers:
      raise IndexError(f"layer {layer} is out of range: this model has {self.n_layers} layers "
                       f"(0..{self.n_layers - 1})")
    return 2 * layer + BRANCH_KINDS.index(kind)

  def layer_of(self, branch: int) -> int:
    if not 0 <= branch < self.n_branches:
      raise IndexError(f"branch {branch} is out of range: this model has {self.n_branches} "
                       f"branches (0..{self.n_branches - 1})")
    return branch // 2

  def describe(self) -> dict:
    """A JSON-friendly summary, written next to every result."""
    return {"n_layers": self.n_layers, "n_branches": self.n_branches,
            "branches": list(self.branch_names)}


def layer_gates(gates) -> Array:
  """Per-layer gates ``(M,)`` or ``(M, batch)`` -> branch gates ``(2M, ...)``: a layer's gate
  applies to both of its branches (deleting a layer deletes its attention and its MLP)."""
  return jnp.repeat(jnp.asarray(gates), 2, axis=0)


def branch_gates(n_branches: int, off: Sequence[int] = (), dtype=jnp.float32) -> Array:
  """Ones, with zeros at the branches ``off`` (deleted)."""
  return jnp.ones((n_branches,), dtype).at[jnp.asarray(list(off), jnp.int32)].set(0.0)


def check_order(n_layers: int, order) -> np.ndarray:
  """Validates an index array over the stacked layers: 1-d, at least one entry, integers in
  0..n_layers-1 (repeats allowed: a layer run twice). Returns it as int32 numpy."""
  a = np.asarray(order)
  if a.ndim != 1 or a.size == 0:
    raise InputError(f"an order is a 1-d index array over the {n_layers} layers; got shape "
                     f"{a.shape}")
  if not (np.issubdtype(a.dtype, np.integer) or
          (np.issubdtype(a.dtype, np.floating) and np.all(a == np.round(a)))):
    raise InputError(f"an order holds layer indices (integers); got {a.dtype} values {a.tolist()}")
  bad = [int(i) for i in a if not 0 <= i < n_layers]
  if bad:
    raise InputError(f"order {a.astype(int).tolist()} holds indices {bad} outside the "
                     f"{n_layers} layers 0..{n_layers - 1}")
  return a.astype(np.int32)


def _gate(g: Array, like: Array) -> Array:
  """A gate of shape () or (batch,) broadcast against (batch, time, features)."""
  g = g.astype(like.dtype)
  return g.reshape(g.shape + (1,) * (like.ndim - g.ndim))


# ---------------------------------------------------------------------------------------------
# Positions.


def rotary_tables(positions: Array, head_dim: int, theta: float) -> tuple[Array, Array]:
  """(cos, sin), each (time, head_dim): the rotary embedding in Hugging Face's half-split
  convention (``rotate_half``: the first half of a head's features pairs with the second)."""
  inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
  freqs = positions.astype(jnp.float32)[:, None] * jnp.asarray(inv_freq)[None, :]
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def _rotate(x: Array, cos: Array, sin: Array) -> Array:
  """x (batch, time, heads, head_dim) rotated by the tables (time, head_dim)."""
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  cos, sin = cos[None, :, None, :].astype(x.dtype), sin[None, :, None, :].astype(x.dtype)
  return x * cos + rotated * sin


# ---------------------------------------------------------------------------------------------
# The layer.


def _activation(name: str):
  return {"gelu_tanh": lambda x: nn.gelu(x, approximate=True),
          "gelu": lambda x: nn.gelu(x, approximate=False),
          "silu": nn.silu, "relu": nn.relu}[name]


class Attention(nn.Module):
  """Causal multi-head attention with ``n_kv_heads`` key/value heads (grouped-query when
  fewer than ``n_heads``: query head h reads key/value head h // (n_heads / n_kv_heads))."""

  n_heads: int
  n_kv_heads: int
  head_dim: int
  features: int
  qkv_bias: bool
  out_bias: bool
  dtype: Any = jnp.float32
  sliding_window: int | None = None   # a query sees only the last ``sliding_window`` keys

  @nn.compact
  def __call__(self, x: Array, rotary: tuple[Array, Array] | None) -> Array:
    b, t, _ = x.shape
    def dense(n, bias, name):
      return nn.Dense(n, use_bias=bias, dtype=self.dtype, name=name)
    q = dense(self.n_heads * self.head_dim, self.qkv_bias, "q")(x)
    k = dense(self.n_kv_heads * self.head_dim, self.qkv_bias, "k")(x)
    v = dense(self.n_kv_heads * self.head_dim, self.qkv_bias, "v")(x)
    q = q.reshape(b, t, self.n_heads, self.head_dim)
    k = k.reshape(b, t, self.n_kv_heads, self.head_dim)
    v = v.reshape(b, t, self.n_kv_heads, self.head_dim)
    if rotary is not None:
      q, k = _rotate(q, *rotary), _rotate(k, *rotary)
    group = self.n_heads // self.n_kv_heads
    k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / np.sqrt(self.head_dim)
    causal = jnp.tril(jnp.ones((t, t), bool))
    if self.sliding_window is not None:
      q_pos, k_pos = jnp.arange(t)[:, None], jnp.arange(t)[None, :]
      causal &= k_pos > q_pos - self.sliding_window
    scores = jnp.where(causal, scores, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, t, self.n_heads * self.head_dim)
    return dense(self.features, self.out_bias, "o")(out)


class Mlp(nn.Module):
  """GELU (``fc`` -> act -> ``proj``) or SwiGLU (``down(act(gate(x)) * up(x))``)."""

  kind: str
  hidden: int
  features: int
  activation: str
  bias: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    def dense(n, name):
      return nn.Dense(n, use_bias=self.bias, dtype=self.dtype, name=name)
    act = _activation(self.activation)
    if self.kind == "gelu":
      return dense(self.features, "proj")(act(dense(self.hidden, "fc")(x)))
    hidden = act(dense(self.hidden, "gate")(x)) * dense(self.hidden, "up")(x)
    return dense(self.features, "down")(hidden)


def _norm(kind: str, eps: float, name: str) -> nn.Module:
  if kind == "layernorm":
    return nn.LayerNorm(epsilon=eps, use_fast_variance=False, name=name)
  return nn.RMSNorm(epsilon=eps, name=name)


@dataclasses.dataclass(frozen=True)
class LayerConfig:
  """What one layer needs of ``GatedTransformer``'s fields."""

  d_model: int
  n_heads: int
  kv_heads: int
  head_size: int
  d_ff: int
  norm: str
  norm_eps: float
  mlp: str
  activation: str
  qkv_bias: bool
  out_bias: bool
  mlp_bias: bool
  dtype: Any
  sliding_window: int | None = None


class Layer(nn.Module):
  """One pre-norm layer: its two gated residual branches, attention then MLP."""

  cfg: LayerConfig

  def setup(self):
    c = self.cfg
    self.attn_norm = _norm(c.norm, c.norm_eps, "attn_norm")
    self.attn = Attention(c.n_heads, c.kv_heads, c.head_size, c.d_model, c.qkv_bias,
                          c.out_bias, c.dtype, c.sliding_window, name="attn")
    self.mlp_norm = _norm(c.norm, c.norm_eps, "mlp_norm")
    self.mlp = Mlp(c.mlp, c.d_ff, c.d_model, c.activation, c.mlp_bias, c.dtype, name="mlp")

  def attn_branch(self, x: Array, rotary=None) -> Array:
    """f_attn(x), the attention branch's output (before its gate)."""
    return self.attn(self.attn_norm(x).astype(self.cfg.dtype), rotary)

  def mlp_branch(self, x: Array) -> Array:
    """f_mlp(x), the MLP branch's output (before its gate)."""
    return self.mlp(self.mlp_norm(x).astype(self.cfg.dtype))

  def __call__(self, x: Array, gates: Array, rotary=None) -> Array:
    """``gates``: (2,) or (2, batch), this layer's attention and MLP gates."""
    x = x + _gate(gates[0], x) * self.attn_branch(x, rotary).astype(x.dtype)
    return x + _gate(gates[1], x) * self.mlp_branch(x).astype(x.dtype)


def _run_layers(layer: Layer, x: Array, gates: Array, rotary, unroll: int) -> Array:
  def body(mdl, carry, g, rot):
    return mdl(carry, g, rot), None

  n = gates.shape[0]
  scan = nn.scan(body, variable_axes={"params": 0}, split_rngs={"params": True},
                 in_axes=(0, nn.broadcast), length=n,
                 unroll=n if unroll <= 0 else min(unroll, n))
  return scan(layer, x, gates, rotary)[0]


class GatedTransformer(nn.Module):
  """A gated pre-norm decoder: ``__call__(tokens, gates=None, order=None) -> logits``.

  ``tokens`` (batch, time) int; ``order`` an index array over the ``n_layers`` stacked layers
  (None: 0..n_layers-1), validated when concrete (``check_order``); ``gates`` (2M,) or
  (2M, batch) for the M = len(order) layers run, branch 2p the attention at position p and
  2p + 1 its MLP. Logits are float32 (batch, time, vocab).
  """

  vocab_size: int
  n_layers: int
  d_model: int
  n_heads: int
  d_ff: int
  n_kv_heads: int | None = None      # None: n_heads (no grouped-query attention)
  head_dim: int | None = None        # None: d_model // n_heads
  norm: str = "layernorm"            # "layernorm" | "rmsnorm"
  norm_eps: float = 1e-5
  mlp: str = "gelu"                  # "gelu" (fc, act, proj) | "swiglu" (gate, up, down)
  activation: str = "gelu_tanh"      # gelu_tanh | gelu | silu | relu
  positions: str = "learned"         # "learned" (max_positions) | "rotary" (rope_theta)
  max_positions: int = 1024
  rope_theta: float = 10000.0
  qkv_bias: bool = True
  out_bias: bool = True
  mlp_bias: bool = True
  tie_embeddings: bool = True
  sliding_window: int | None = None  # Mistral's: a query attends to the last this many tokens
  dtype: Any = jnp.float32
  unroll: int = 1                    # scan unroll factor; <= 0 means fully unrolled

  def __post_init__(self):
    for value, valid, what in ((self.norm, NORMS, "norm"), (self.mlp, MLPS, "mlp"),
                               (self.positions, POSITIONS, "positions"),
                               (self.activation, ACTIVATIONS, "activation")):
      if value not in valid:
        raise ValueError(f"unknown {what} {value!r}; valid: {', '.join(valid)}")
    if self.n_heads % self.kv_heads:
      raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.kv_heads}")
    if self.sliding_window is not None and self.sliding_window < 1:
      raise ValueError(f"sliding_window must be positive or None; got {self.sliding_window}")
    if self.positions == "rotary" and self.head_size % 2:
      raise ValueError(f"rotary positions need an even head_dim; got {self.head_size}")
    super().__post_init__()

  @property
  def kv_heads(self) -> int:
    return self.n_kv_heads or self.n_heads

  @property
  def head_size(self) -> int:
    return self.head_dim or self.d_model // self.n_heads

  @property
  def layout(self) -> TransformerLayout:
    return TransformerLayout(self.n_layers)

  @property
  def layer_config(self) -> LayerConfig:
    return LayerConfig(self.d_model, self.n_heads, self.kv_heads, self.head_size, self.d_ff,
                       self.norm, self.norm_eps, self.mlp, self.activation, self.qkv_bias,
                       self.out_bias, self.mlp_bias, self.dtype, self.sliding_window)

  @nn.compact
  def __call__(self, tokens: Array, gates: Array | None = None, order=None) -> Array:
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2:
      raise InputError(f"tokens must have shape (batch, time); got {tokens.shape}")
    if order is not None and not isinstance(order, jax.core.Tracer):
      order = check_order(self.n_layers, order)
    runs = self.n_layers if order is None else order.shape[0]
    gates = gates_lib.check_shape(
        gates, 2 * runs, tokens.shape[0], self.dtype,
        f"(one per branch, attention and MLP, of the {runs} layers run)", InputError)
    if self.is_initializing():  # the stacked parameters: one per layer, in their own order
      order, runs, gates = None, self.n_layers, jnp.ones((2 * self.n_layers,), self.dtype)
    table = self._token_embedding()
    x = self.embed(tokens, table)
    rotary = None
    if self.positions == "rotary":
      rotary = rotary_tables(jnp.arange(tokens.shape[1]), self.head_size, self.rope_theta)
    gates = gates.reshape((runs, 2) + gates.shape[1:])
    run = _run_layers
    if order is not None:
      take = jnp.asarray(order)
      run = nn.map_variables(
          _run_layers, "params",
          trans_in_fn=lambda tree: jax.tree.map(lambda a: jnp.take(a, take, axis=0), tree))
    x = run(Layer(self.layer_config, name="blocks"), x, gates, rotary, self.unroll)
    return self.head(x, table)

  @nn.nowrap
  def embed(self, tokens: Array, table: nn.Embed | None = None) -> Array:
    """Tokens -> the stream the first layer reads (token plus learned position embedding).
    ``table``: the token embedding, when the caller made it (the tied head reads it too)."""
    x = (self._token_embedding() if table is None else table)(tokens)
    if self.positions == "learned":
      t = tokens.shape[1]
      if t > self.max_positions:
        raise InputError(f"a window of {t} tokens is longer than the model's "
                         f"{self.max_positions} learned positions")
      x = x + nn.Embed(self.max_positions, self.d_model, name="pos_embed")(jnp.arange(t))[None]
    return x

  @nn.nowrap
  def _token_embedding(self) -> nn.Embed:
    return nn.Embed(self.vocab_size, self.d_model, name="embed")

  @nn.nowrap
  def head(self, x: Array, table: nn.Embed | None = None) -> Array:
    """The last layer's output -> float32 logits (final norm, then the tied or own head)."""
    x = _norm(self.norm, self.norm_eps, "final_norm")(x)
    if self.tie_embeddings:
      table = self._token_embedding() if table is None else table
      logits = table.attend(x.astype(self.dtype))
    else:
      logits = nn.Dense(self.vocab_size, use_bias=False, dtype=self.dtype, name="lm_head")(x)
    return logits.astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class Unrolled:
  """A model as embed -> 2L residual branches -> head, each a pure function of the stream:
  ``y = x + f_b(x)`` for branch b in forward order (attn_0, mlp_0, ...), the view in which
  gradients are routed along paths."""

  embed: Callable[[Array], Array]
  branches: tuple[Callable[[Array], Array], ...]
  head: Callable[[Array], Array]


def unroll(model: GatedTransformer, variables) -> Unrolled:
  """The per-branch view of ``model`` with ``variables`` (layers in their stacked order)."""
  params = variables["params"]
  layer = Layer(model.layer_config)

  def tree(l):
    return {"params": jax.tree.map(lambda a: a[l], params["blocks"])}

  def attn(x, t):
    rotary = None
    if model.positions == "rotary":
      rotary = rotary_tables(jnp.arange(x.shape[1]), model.head_size, model.rope_theta)
    return layer.apply(t, x, rotary, method=Layer.attn_branch).astype(x.dtype)

  def mlp(x, t):
    return layer.apply(t, x, method=Layer.mlp_branch).astype(x.dtype)

  branches = []
  for l in range(model.n_layers):
    t = tree(l)
    branches += [functools.partial(attn, t=t), functools.partial(mlp, t=t)]

  def part(fn, names):
    return functools.partial(models.Part(fn).apply, {"params": {k: params[k] for k in names
                                                          if k in params}})

  embed = part(model.embed, ("embed", "pos_embed"))
  head = part(model.head, ("embed", "final_norm", "lm_head"))
  return Unrolled(embed=embed, branches=tuple(branches), head=head)


def gpt2(vocab_size: int, n_layers: int, d_model: int, n_heads: int, d_ff: int | None = None,
         **kwargs) -> GatedTransformer:
  """GPT-2's settings: LayerNorm, GELU (tanh) MLP, learned positions, tied embeddings."""
  return GatedTransformer(vocab_size=vocab_size, n_layers=n_layers, d_model=d_model,
                          n_heads=n_heads, d_ff=d_ff or 4 * d_model, **kwargs)


def llama(vocab_size: int, n_layers: int, d_model: int, n_heads: int, d_ff: int,
          n_kv_heads: int | None = None, **kwargs) -> GatedTransformer:
  """Llama's settings: RMSNorm, SwiGLU, rotary positions, grouped-query attention, no biases,
  an untied head."""
  kw = dict(norm="rmsnorm", norm_eps=1e-6, mlp="swiglu", activation="silu",
            positions="rotary", qkv_bias=False, out_bias=False, mlp_bias=False,
            tie_embeddings=False)
  kw.update(kwargs)
  return GatedTransformer(vocab_size=vocab_size, n_layers=n_layers, d_model=d_model,
                          n_heads=n_heads, d_ff=d_ff, n_kv_heads=n_kv_heads, **kw)
