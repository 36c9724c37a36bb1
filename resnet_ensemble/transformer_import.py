"""Hugging Face GPT-2 and Llama (Mistral, Qwen2) checkpoints as gated Flax transformers, and
a model trained here written back as such a folder (``save_folder``).

A model is a local folder in Hugging Face's layout: ``config.json`` and the weights, as
``model.safetensors`` (or its shards, ``model.safetensors.index.json``) or a PyTorch state dict
``pytorch_model.bin`` (read with ``torch.load(weights_only=True)``); the tokenizer is the
folder's ``tokenizer.json`` (the ``tokenizers`` package). The names map as

    GPT-2 (GPT2LMHeadModel)                 ours (params)
    [transformer.]wte.weight (V, d)          embed/embedding (also the tied head)
    [transformer.]wpe.weight (P, d)          pos_embed/embedding
    h.{l}.ln_1.{weight,bias}                 blocks/attn_norm/{scale,bias}[l]
    h.{l}.attn.c_attn.{weight,bias}          blocks/attn/{q,k,v}/{kernel,bias}[l] (split in 3)
    h.{l}.attn.c_proj.*                      blocks/attn/o/*[l]
    h.{l}.ln_2.*, h.{l}.mlp.c_fc.*, c_proj.*  blocks/mlp_norm/*, blocks/mlp/fc/*, mlp/proj/*
    ln_f.*                                   final_norm/*

    Llama (LlamaForCausalLM)                ours (params)
    model.embed_tokens.weight                embed/embedding
    model.layers.{l}.input_layernorm         blocks/attn_norm/scale[l]
    ....self_attn.{q,k,v,o}_proj             blocks/attn/{q,k,v,o}/kernel[l] (transposed)
    ....post_attention_layernorm             blocks/mlp_norm/scale[l]
    ....mlp.{gate,up,down}_proj              blocks/mlp/{gate,up,down}/kernel[l] (transposed)
    model.norm.weight, lm_head.weight        final_norm/scale, lm_head/kernel (transposed)

Mistral and Qwen2 use Llama's names; Mistral adds a sliding window (the same in every layer),
Qwen2 biases on q, k and v.

GPT-2's ``Conv1D`` weights are already (in, out), a torch ``Linear``'s are (out, in). Every
problem (an unknown architecture or config key, a missing or mismatched tensor, a missing
tokenizer, a hub name on a machine without internet) is a ``ModelFolderError``: one line
naming the file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
from typing import Any, Callable, Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np

from resnet_ensemble import transformer

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_FILE = "pytorch_model.bin"
TOKENIZER_FILE = "tokenizer.json"

# model_type -> its causal-LM architecture. Mistral and Qwen2 are Llama's layer with a sliding
# window (Mistral) or biases on q, k, v (Qwen2), and Llama's tensor names.
FAMILIES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM",
            "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}

# Families whose layers run attention and MLP side by side on the same input (GPT-J,
# Pythia/GPT-NeoX, Falcon's parallel_attn, Phi): a layer there is one node of the unraveled
# graph, so the 2L-branch layout does not describe them.
PARALLEL = ("gptj", "gpt_neox", "falcon", "phi")


class ModelFolderError(ValueError):
  """A model folder (or name) this importer cannot read: one line naming the file."""


# Config keys that do not change the forward computation in float32 inference: ids,
# dropout, training and generation settings, bookkeeping.
_HARMLESS = {
    "architectures", "model_type", "dtype", "torch_dtype", "transformers_version",
    "initializer_range", "use_cache", "tie_word_embeddings", "is_decoder", "is_encoder_decoder",
    "return_dict", "output_attentions", "output_hidden_states", "id2label", "label2id",
    "num_labels", "problem_type", "task_specific_params", "name_or_path", "chunk_size_feed_forward",
    "max_length", "min_length", "do_sample", "temperature", "top_k", "top_p",
}
_HARMLESS_SUFFIXES = ("_pdrop", "dropout", "_token_id", "_token_ids")
_HARMLESS_PREFIXES = ("_", "summary_")  # summary_*: GPT2DoubleHeadsModel's classifier head

# Per family: the keys read (with their defaults, Hugging Face's), and keys that must hold a
# value (the one this module computes) or be absent.
_LLAMA_KEYS = {
    "vocab_size": 32000, "hidden_size": 4096, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": None, "intermediate_size": 11008,
    "head_dim": None, "hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
    "rope_parameters": None, "rope_scaling": None, "max_position_embeddings": 2048}
_READ = {
    "gpt2": {"vocab_size": 50257, "n_embd": 768, "n_layer": 12, "n_head": 12, "n_inner": None,
             "n_positions": 1024, "layer_norm_epsilon": 1e-5, "activation_function": "gelu_new",
             "n_ctx": None, "reorder_and_upcast_attn": False},
    "llama": {**_LLAMA_KEYS, "attention_bias": False, "mlp_bias": False, "pretraining_tp": 1},
    "mistral": {**_LLAMA_KEYS, "sliding_window": None},
    "qwen2": {**_LLAMA_KEYS, "sliding_window": None, "max_window_layers": None},
}
_FIXED = {
    "gpt2": {"scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
             "add_cross_attention": False},
    "llama": {}, "mistral": {},
    # Qwen2's sliding window applies to some layers only: the layers would differ.
    "qwen2": {"use_sliding_window": False},
}
_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu",
                "silu": "silu", "swish": "silu", "relu": "relu"}


@dataclasses.dataclass(frozen=True)
class Imported:
  """A model folder as a gated Flax transformer: the module, its variables ({"params"}: float32
  numpy), the tokenizer (a ``tokenizers.Tokenizer``, or None when not asked for) and where
  they came from."""

  model: transformer.GatedTransformer
  variables: dict
  tokenizer: Any
  family: str
  folder: str


def _fail(message: str) -> None:
  raise ModelFolderError(" ".join(message.split()))


# ---------------------------------------------------------------------------------------------
# config.json -> the module.


def read_config(folder: str) -> dict:
  path = os.path.join(folder, CONFIG_FILE)
  if not os.path.isfile(path):
    _fail(f"{folder} has no {CONFIG_FILE}: a model folder holds config.json and "
          f"{SAFETENSORS_FILE} (or {TORCH_FILE}) in Hugging Face's layout")
  try:
    with open(path) as f:
      config = json.load(f)
  except (OSError, ValueError) as e:
    _fail(f"cannot read {path}: {e}")
  if not isinstance(config, dict):
    _fail(f"{path} holds a JSON {type(config).__name__}, not an object")
  return config


def family_of(config: Mapping[str, Any], path: str) -> str:
  """The model_type (a key of ``FAMILIES``) of a config, or a ModelFolderError saying why
  not."""
  kind = config.get("model_type")
  parallel = (kind in ("gptj", "phi") or (kind == "gpt_neox" and
              config.get("use_parallel_residual", True)) or config.get("parallel_attn")
              or config.get("use_parallel_residual"))
  if parallel:
    _fail(f"{path}: {kind} runs attention and MLP in parallel on the same input (a layer is one "
          f"branch of the unraveled graph, not two); parallel-residual models are not supported")
  if kind not in FAMILIES:
    _fail(f"{path}: unknown model_type {kind!r}; supported: {', '.join(FAMILIES)}")
  archs = config.get("architectures") or [FAMILIES[kind]]
  if FAMILIES[kind] not in archs:
    _fail(f"{path}: unknown architecture {', '.join(map(str, archs))} for model_type {kind!r}; "
          f"supported: {FAMILIES[kind]}")
  return kind


def _check_keys(config: Mapping[str, Any], family: str, path: str) -> None:
  for key, value in _FIXED[family].items():
    if key in config and config[key] != value:
      _fail(f"{path}: {key}={config[key]!r} is not supported (only {value!r})")
  kinds = set(config.get("layer_types") or ["full_attention"])
  if kinds != {"full_attention"}:
    _fail(f"{path}: layer_types {sorted(kinds)}: only full attention in every layer is supported "
          f"(the stacked layers must be interchangeable)")
  known = set(_READ[family]) | set(_FIXED[family]) | _HARMLESS | {"layer_types"}
  unknown = sorted(k for k in config if k not in known and not k.endswith(_HARMLESS_SUFFIXES)
                   and not k.startswith(_HARMLESS_PREFIXES))
  if unknown:
    _fail(f"{path}: unknown config key(s) {', '.join(unknown)} for model_type {family!r}: "
          f"this importer does not know what they change")


def _rope_theta(c: Mapping[str, Any], path: str) -> float:
  """rope_theta from ``rope_parameters`` (transformers 5) or the top level (4.x); scaled
  rotary positions (Llama 3's, YaRN, ...) are refused."""
  params = c.get("rope_parameters") or {}
  scaling = c.get("rope_scaling") or {}
  kind = params.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
  if kind != "default":
    _fail(f"{path}: rope type {kind!r} is not supported (only unscaled rotary positions)")
  return float(params.get("rope_theta", c.get("rope_theta", 10000.0)))


def model_from_config(config: Mapping[str, Any], path: str = CONFIG_FILE,
                      dtype: Any = jnp.float32) -> transformer.GatedTransformer:
  """The gated module a Hugging Face config describes (``path`` names it in errors)."""
  family = family_of(config, path)
  _check_keys(config, family, path)
  c = {**_READ[family], **config}
  tie = bool(config.get("tie_word_embeddings", family == "gpt2"))
  if family == "gpt2":
    act_key, act = "activation_function", c["activation_function"]
  else:
    act_key, act = "hidden_act", c["hidden_act"]
  if act not in _ACTIVATIONS:
    _fail(f"{path}: {act_key}={act!r} is not supported; valid: {', '.join(_ACTIVATIONS)}")
  try:
    if family == "gpt2":
      return transformer.gpt2(
          vocab_size=int(c["vocab_size"]), n_layers=int(c["n_layer"]), d_model=int(c["n_embd"]),
          n_heads=int(c["n_head"]), d_ff=c["n_inner"] and int(c["n_inner"]),
          max_positions=int(c["n_positions"]), norm_eps=float(c["layer_norm_epsilon"]),
          activation=_ACTIVATIONS[act], tie_embeddings=tie, dtype=dtype)
    # Qwen2 keeps sliding_window in its config while use_sliding_window is false (refused
    # when true): only Mistral's applies.
    window = c.get("sliding_window") if family == "mistral" else None
    bias = {"qwen2": (True, False, False)}.get(
        family, (bool(c.get("attention_bias")), bool(c.get("attention_bias")),
                 bool(c.get("mlp_bias"))))
    return transformer.llama(
        vocab_size=int(c["vocab_size"]), n_layers=int(c["num_hidden_layers"]),
        d_model=int(c["hidden_size"]), n_heads=int(c["num_attention_heads"]),
        d_ff=int(c["intermediate_size"]),
        n_kv_heads=int(c["num_key_value_heads"] or c["num_attention_heads"]),
        head_dim=c["head_dim"] and int(c["head_dim"]), norm_eps=float(c["rms_norm_eps"]),
        activation=_ACTIVATIONS[act], rope_theta=_rope_theta(c, path),
        qkv_bias=bias[0], out_bias=bias[1], mlp_bias=bias[2], tie_embeddings=tie,
        sliding_window=None if window is None else int(window), dtype=dtype)
  except (TypeError, ValueError) as e:
    if isinstance(e, ModelFolderError):
      raise
    _fail(f"{path}: {e}")


# ---------------------------------------------------------------------------------------------
# The name mapping.

_Transform = Callable[[np.ndarray], np.ndarray]
_SAME: _Transform = lambda a: a  # noqa: E731
_T: _Transform = lambda a: a.T  # noqa: E731


def _entries(model: transformer.GatedTransformer, family: str
             ) -> list[tuple[str, tuple[str, ...], int | None, tuple[int, ...], _Transform]]:
  """(torch key, our params path, stacked layer or None, torch shape, torch -> ours);
  ``family``: gpt2, or any Llama-named family."""
  d, v, ff = model.d_model, model.vocab_size, model.d_ff
  q, kv = model.n_heads * model.head_size, model.kv_heads * model.head_size
  out = []

  def add(key, path, layer, shape, fn=_SAME):
    out.append((key, path, layer, tuple(shape), fn))

  def linear(key, path, layer, n_in, n_out, bias):  # torch Linear: weight (out, in)
    add(f"{key}.weight", path + ("kernel",), layer, (n_out, n_in), _T)
    if bias:
      add(f"{key}.bias", path + ("bias",), layer, (n_out,))

  def conv1d(key, path, layer, n_in, n_out):  # GPT-2's Conv1D: weight (in, out), with bias
    add(f"{key}.weight", path + ("kernel",), layer, (n_in, n_out))
    add(f"{key}.bias", path + ("bias",), layer, (n_out,))

  def norm(key, path, layer):
    add(f"{key}.weight", path + ("scale",), layer, (d,))
    if model.norm == "layernorm":
      add(f"{key}.bias", path + ("bias",), layer, (d,))

  b = ("blocks",)
  if family == "gpt2":
    add("wte.weight", ("embed", "embedding"), None, (v, d))
    add("wpe.weight", ("pos_embed", "embedding"), None, (model.max_positions, d))
    for l in range(model.n_layers):
      h = f"h.{l}"
      norm(f"{h}.ln_1", b + ("attn_norm",), l)
      for i, name in enumerate("qkv"):
        add(f"{h}.attn.c_attn.weight", b + ("attn", name, "kernel"), l, (d, 3 * d),
            lambda a, i=i: a[:, i * d:(i + 1) * d])
        add(f"{h}.attn.c_attn.bias", b + ("attn", name, "bias"), l, (3 * d,),
            lambda a, i=i: a[i * d:(i + 1) * d])
      conv1d(f"{h}.attn.c_proj", b + ("attn", "o"), l, d, d)
      norm(f"{h}.ln_2", b + ("mlp_norm",), l)
      conv1d(f"{h}.mlp.c_fc", b + ("mlp", "fc"), l, d, ff)
      conv1d(f"{h}.mlp.c_proj", b + ("mlp", "proj"), l, ff, d)
    norm("ln_f", ("final_norm",), None)
  else:
    add("embed_tokens.weight", ("embed", "embedding"), None, (v, d))
    for l in range(model.n_layers):
      h = f"layers.{l}"
      norm(f"{h}.input_layernorm", b + ("attn_norm",), l)
      for name, n_out in (("q", q), ("k", kv), ("v", kv)):
        linear(f"{h}.self_attn.{name}_proj", b + ("attn", name), l, d, n_out, model.qkv_bias)
      linear(f"{h}.self_attn.o_proj", b + ("attn", "o"), l, q, d, model.out_bias)
      norm(f"{h}.post_attention_layernorm", b + ("mlp_norm",), l)
      for name in ("gate", "up"):
        linear(f"{h}.mlp.{name}_proj", b + ("mlp", name), l, d, ff, model.mlp_bias)
      linear(f"{h}.mlp.down_proj", b + ("mlp", "down"), l, ff, d, model.mlp_bias)
    norm("norm", ("final_norm",), None)
  if not model.tie_embeddings:
    add("lm_head.weight", ("lm_head", "kernel"), None, (v, d), _T)
  return out


# The base model's prefix in the ...ForCausalLM state dict, and buffers older versions saved.
_PREFIX = {"gpt2": "transformer.", "llama": "model.", "mistral": "model.", "qwen2": "model."}
_BUFFERS = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")


def _strip(state: Mapping[str, Any], family: str) -> dict[str, Any]:
  prefix = _PREFIX[family]
  out = {}
  for k, a in state.items():
    if k.endswith(_BUFFERS):
      continue
    out[k[len(prefix):] if k.startswith(prefix) else k] = a
  return out


def _abbreviated(keys: list[str], limit: int = 4) -> str:
  more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
  return ", ".join(keys[:limit]) + more


def variables_from_state_dict(model: transformer.GatedTransformer, family: str,
                              state: Mapping[str, Any], path: str) -> dict:
  """{"params": float32 numpy} of ``model`` from a Hugging Face state dict of ``family``
  (``path`` names it in errors). A tied head's ``lm_head.weight`` is ignored."""
  state = _strip(state, family)
  if model.tie_embeddings:
    state.pop("lm_head.weight", None)
  entries = _entries(model, family)
  expected = {key: shape for key, _, _, shape, _ in entries}
  missing = sorted(k for k in expected if k not in state)
  unexpected = sorted(k for k in state if k not in expected)
  mismatched = sorted(f"{k} is {tuple(np.shape(state[k]))}, config.json needs {expected[k]}"
                      for k in expected if k in state and tuple(np.shape(state[k])) != expected[k])
  if missing or unexpected or mismatched:
    parts = [f"{what} {_abbreviated(keys)}" for what, keys in
             (("missing", missing), ("unexpected", unexpected), ("shape", mismatched)) if keys]
    _fail(f"{path} does not match its config.json ({family}, {model.n_layers} layers, "
          f"d_model {model.d_model}): {'; '.join(parts)}")
  flat: dict[tuple[str, ...], Any] = {}
  for key, ours, layer, _, fn in entries:
    a = np.asarray(fn(np.asarray(state[key], np.float32)))
    if layer is None:
      flat[("params",) + ours] = np.ascontiguousarray(a)
    else:
      flat.setdefault(("params",) + ours, [None] * model.n_layers)[layer] = a
  flat = {p: np.stack(a) if isinstance(a, list) else a for p, a in flat.items()}
  abstract = flax.traverse_util.flatten_dict(
      jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))
  got = {p: a.shape for p, a in flat.items()}
  want = {p: a.shape for p, a in abstract.items()}
  if got != want:
    raise AssertionError(f"internal mapping error for {family}: "
                         f"{sorted(set(got.items()) ^ set(want.items()))}")
  return flax.traverse_util.unflatten_dict(flat)


# ---------------------------------------------------------------------------------------------
# Files.


def _load_safetensors(path: str) -> dict[str, np.ndarray]:
  from safetensors.flax import load_file  # jax arrays: bfloat16 checkpoints too
  try:
    return {k: np.asarray(v, np.float32) for k, v in load_file(path).items()}
  except Exception as e:  # noqa: BLE001 (safetensors raises its own error types)
    _fail(f"cannot read {path}: {e}")


def _load_torch(path: str) -> dict[str, np.ndarray]:
  try:
    import torch
  except ImportError:
    _fail(f"reading {path} needs PyTorch (pip install torch); or save the model with "
          f"safe_serialization=True ({SAFETENSORS_FILE}), which needs only numpy")
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    _fail(f"refusing to load {path}: torch.load(weights_only=True) rejected it (it holds Python "
          f"objects other than tensors, and unpickling can run code from the file): {e}")
  except Exception as e:  # noqa: BLE001 (a truncated or foreign file)
    _fail(f"cannot read {path}: {e}")
  if not isinstance(obj, Mapping):
    _fail(f"{path} holds a {type(obj).__name__}, not a state dict")
  bad = sorted(str(k) for k, a in obj.items() if not isinstance(a, torch.Tensor))
  if bad:
    _fail(f"{path}: entries that are not tensors: {_abbreviated(bad)}")
  return {k: a.detach().cpu().float().numpy() for k, a in obj.items()}


def load_state_dict(folder: str) -> tuple[dict[str, np.ndarray], str]:
  """(state dict as float32 numpy, the file it came from): ``model.safetensors``, its shards
  (``model.safetensors.index.json``), or ``pytorch_model.bin``, in that order."""
  single = os.path.join(folder, SAFETENSORS_FILE)
  if os.path.isfile(single):
    return _load_safetensors(single), single
  index = os.path.join(folder, SAFETENSORS_INDEX)
  if os.path.isfile(index):
    try:
      with open(index) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
      _fail(f"cannot read the shard index {index}: {e}")
    state = {}
    for shard in shards:
      p = os.path.join(folder, shard)
      if not os.path.isfile(p):
        _fail(f"{index} names the shard {shard}, which {folder} does not hold")
      state.update(_load_safetensors(p))
    return state, index
  bin_path = os.path.join(folder, TORCH_FILE)
  if os.path.isfile(bin_path):
    return _load_torch(bin_path), bin_path
  _fail(f"{folder} holds no weights: expected {SAFETENSORS_FILE}, {SAFETENSORS_INDEX} or "
        f"{TORCH_FILE}")


def load_tokenizer(folder: str):
  """The folder's ``tokenizer.json`` as a ``tokenizers.Tokenizer``."""
  path = os.path.join(folder, TOKENIZER_FILE)
  if not os.path.isfile(path):
    _fail(f"{folder} has no {TOKENIZER_FILE}: the tokenizer comes from the model's folder "
          f"(save it with tokenizer.save_pretrained, or pass tokenizer=False)")
  try:
    from tokenizers import Tokenizer
  except ImportError:
    _fail(f"reading {path} needs the tokenizers package: pip install -e \".[lm]\"")
  try:
    return Tokenizer.from_file(path)
  except Exception as e:  # noqa: BLE001 (tokenizers raises a bare Exception)
    _fail(f"cannot read the tokenizer {path}: {e}")


def resolve(name_or_folder: str | os.PathLike) -> str:
  """A local folder as is; a hub name (``org/model``) fetched with ``huggingface_hub`` where
  the machine has internet, else a one-line error saying to pass a local folder."""
  name = os.fspath(name_or_folder)
  if os.path.isdir(name):
    return name
  if os.path.exists(name) or name.startswith((".", "/", "~")) or name.count("/") > 1:
    _fail(f"{name} is not a folder: pass a folder holding config.json and the weights")
  try:
    from huggingface_hub import snapshot_download
  except ImportError:
    _fail(f"no folder {name}, and fetching it as a Hugging Face hub name needs huggingface_hub "
          f"(pip install -e \".[lm]\"); or pass a local folder")
  try:
    return snapshot_download(name, allow_patterns=[CONFIG_FILE, "*.safetensors", SAFETENSORS_INDEX,
                                                   TOKENIZER_FILE])
  except Exception as e:  # noqa: BLE001 (network, missing repository, offline mode)
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    _fail(f"no folder {name}, and fetching it from the Hugging Face hub failed (this machine "
          f"may have no internet: download it elsewhere and pass the local folder): {first}")


def load(name_or_folder: str | os.PathLike, tokenizer: bool = True,
         dtype: Any = jnp.float32) -> Imported:
  """A Hugging Face GPT-2 or Llama folder (or hub name) as a gated Flax transformer.

  ``tokenizer``: also read the folder's tokenizer.json (an error if it has none).
  ``dtype``: the module's compute dtype; the variables stay float32."""
  folder = resolve(name_or_folder)
  config = read_config(folder)
  path = os.path.join(folder, CONFIG_FILE)
  model = model_from_config(config, path, dtype)
  family = family_of(config, path)
  tok = load_tokenizer(folder) if tokenizer else None
  state, weights = load_state_dict(folder)
  variables = variables_from_state_dict(model, family, state, weights)
  return Imported(model=model, variables=variables, tokenizer=tok, family=family, folder=folder)


# ---------------------------------------------------------------------------------------------
# Writing a folder: the model trained here, readable by this module and by `transformers`.

_ACTIVATION_NAMES = {"gelu_tanh": "gelu_new", "gelu": "gelu", "silu": "silu", "relu": "relu"}


def family_of_model(model: transformer.GatedTransformer) -> str:
  """gpt2 or llama: the family whose names and config describe ``model``; a ModelFolderError
  when its settings are neither's (mixed norms, positions or MLPs)."""
  gpt2 = transformer.gpt2(model.vocab_size, model.n_layers, model.d_model, model.n_heads,
                          model.d_ff)
  llama = transformer.llama(model.vocab_size, model.n_layers, model.d_model, model.n_heads,
                            model.d_ff)
  for family, preset in (("gpt2", gpt2), ("llama", llama)):
    if all(getattr(model, f) == getattr(preset, f) for f in
           ("norm", "mlp", "positions", "qkv_bias", "out_bias", "mlp_bias")):
      return family
  _fail(f"a model with norm={model.norm}, mlp={model.mlp}, positions={model.positions} is "
        "neither GPT-2's nor Llama's settings: no Hugging Face folder describes it")


def config_of_model(model: transformer.GatedTransformer) -> dict:
  """The Hugging Face ``config.json`` of ``model`` (``model_from_config`` reads it back)."""
  family = family_of_model(model)
  act = _ACTIVATION_NAMES[model.activation]
  if family == "gpt2":
    return {"architectures": [FAMILIES["gpt2"]], "model_type": "gpt2",
            "vocab_size": model.vocab_size, "n_positions": model.max_positions,
            "n_embd": model.d_model, "n_layer": model.n_layers, "n_head": model.n_heads,
            "n_inner": model.d_ff, "activation_function": act,
            "layer_norm_epsilon": model.norm_eps, "tie_word_embeddings": model.tie_embeddings,
            "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
            "bos_token_id": None, "eos_token_id": None}
  return {"architectures": [FAMILIES["llama"]], "model_type": "llama",
          "vocab_size": model.vocab_size, "hidden_size": model.d_model,
          "num_hidden_layers": model.n_layers, "num_attention_heads": model.n_heads,
          "num_key_value_heads": model.kv_heads, "head_dim": model.head_dim,
          "intermediate_size": model.d_ff, "hidden_act": act, "rms_norm_eps": model.norm_eps,
          "rope_theta": model.rope_theta, "tie_word_embeddings": model.tie_embeddings,
          "attention_bias": model.qkv_bias, "mlp_bias": model.mlp_bias}


def state_dict_of_variables(model: transformer.GatedTransformer, variables) -> dict[str, np.ndarray]:
  """The Hugging Face state dict (float32 numpy, the ...ForCausalLM names) of ``variables``:
  ``variables_from_state_dict`` inverted (GPT-2's q, k and v joined into ``c_attn`` again)."""
  family = family_of_model(model)
  params = flax.traverse_util.flatten_dict(jax.device_get(variables["params"]))
  parts: dict[str, list] = {}
  for key, ours, layer, shape, fn in _entries(model, family):
    a = np.asarray(params[ours], np.float32)
    a = a if layer is None else a[layer]
    parts.setdefault(key, []).append((a.T if fn is _T else a, shape))
  state = {}
  for key, arrays in parts.items():
    a = arrays[0][0] if len(arrays) == 1 else np.concatenate([x for x, _ in arrays], axis=-1)
    if a.shape != arrays[0][1]:
      raise AssertionError(f"internal mapping error: {key} is {a.shape}, not {arrays[0][1]}")
    name = key if key == "lm_head.weight" else _PREFIX[family] + key
    state[name] = np.ascontiguousarray(a)
  return state


def save_folder(model: transformer.GatedTransformer, variables, folder: str) -> list[str]:
  """Writes ``model`` with ``variables`` as a Hugging Face folder (``config.json``,
  ``model.safetensors``): ``load(folder)`` reads it back, and so does ``transformers``'
  ``from_pretrained``. Returns the files written."""
  from safetensors.numpy import save_file
  os.makedirs(folder, exist_ok=True)
  config_path = os.path.join(folder, CONFIG_FILE)
  with open(config_path, "w") as f:
    json.dump(config_of_model(model), f, indent=2, sort_keys=True)
    f.write("\n")
  weights = os.path.join(folder, SAFETENSORS_FILE)
  save_file(state_dict_of_variables(model, variables), weights, metadata={"format": "pt"})
  return [config_path, weights]
