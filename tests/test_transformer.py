"""The gated transformer and the Hugging Face import: gates, orders and logits against PyTorch.

The comparisons build tiny random GPT-2 and Llama (grouped-query) models with ``transformers``
(the ``lm`` extra, CPU torch): a zero gate equals the PyTorch model with that branch's output
zeroed by a forward hook, an index array equals its layer list reordered (or repeated).
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_ensemble import lm_eval, transformer, transformer_import as ti
from resnet_ensemble.transformer import InputError
from resnet_ensemble.transformer_import import ModelFolderError
from tests.conftest import reference_measures, write_tokenizer

TOL = 1e-4
VOCAB, SEQ, LAYERS = 100, 16, 3


def _tokens(batch=2, seed=0):
  return np.random.RandomState(seed).randint(0, VOCAB, (batch, SEQ)).astype(np.int32)


def _tiny(family: str):
  return (transformer.gpt2(VOCAB, LAYERS, 32, 4, max_positions=SEQ) if family == "gpt2" else
          transformer.llama(VOCAB, LAYERS, 32, 4, 48, n_kv_heads=2))


# ---------------------------------------------------------------------------------------------
# The module alone (no PyTorch).


def test_layout_names_both_granularities():
  layout = transformer.TransformerLayout(3)
  assert layout.n_branches == 6
  assert layout.branch_names == ("attn_0", "mlp_0", "attn_1", "mlp_1", "attn_2", "mlp_2")
  assert layout.branch_kinds[::2] == ("attn",) * 3
  assert layout.branch(2, "mlp") == 5 and layout.layer_of(5) == 2
  np.testing.assert_array_equal(transformer.layer_gates(jnp.array([1.0, 0.0, 1.0])),
                                [1, 1, 0, 0, 1, 1])
  np.testing.assert_array_equal(transformer.branch_gates(6, [1, 4]), [1, 0, 1, 1, 0, 1])
  with pytest.raises(IndexError, match="out of range"):
    layout.branch(3, "attn")


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_gates_and_orders_are_one_program(family):
  model = _tiny(family)
  tokens = jnp.asarray(_tokens())
  variables = model.init(jax.random.key(0), tokens)
  apply = jax.jit(lambda g, o: model.apply(variables, tokens, gates=g, order=o))
  intact = model.apply(variables, tokens)
  ones, identity = jnp.ones(2 * LAYERS), jnp.arange(LAYERS)
  np.testing.assert_allclose(apply(ones, identity), intact, atol=1e-6)
  # A traced order (one compiled program for every permutation) equals a concrete one.
  np.testing.assert_allclose(apply(ones, jnp.array([2, 0, 1])),
                             model.apply(variables, tokens, order=[2, 0, 1]), atol=1e-6)
  # The unrolled view: embed -> y + f_b(y) for each branch -> head; with every branch
  # deleted, embed -> head.
  parts = transformer.unroll(model, variables)
  y = parts.embed(tokens)
  np.testing.assert_allclose(model.apply(variables, tokens, gates=jnp.zeros(2 * LAYERS)),
                             parts.head(y), atol=1e-6)
  for f in parts.branches:
    y = y + f(y)
  np.testing.assert_allclose(parts.head(y), intact, atol=1e-5)
  # Per-example gates: each example gets its own network.
  g = jnp.stack([ones, ones.at[1].set(0.0)], axis=1)
  per = model.apply(variables, tokens, gates=g)
  np.testing.assert_allclose(per[1], model.apply(variables, tokens, gates=g[:, 1])[1], atol=1e-6)
  np.testing.assert_allclose(per[0], intact[0], atol=1e-6)


@pytest.mark.parametrize("gates,message", [
    (jnp.ones(5), r"shape \(6,\) or \(6, batch\)"),
    (jnp.ones((6, 3)), "batch size 3, the input has 2"),
])
def test_wrong_gates_are_one_line(gates, message):
  model = _tiny("gpt2")
  tokens = jnp.asarray(_tokens())
  variables = model.init(jax.random.key(0), tokens)
  with pytest.raises(InputError, match=message) as e:
    model.apply(variables, tokens, gates=gates)
  assert "\n" not in str(e.value)


@pytest.mark.parametrize("order,message", [
    ([0, 3, 1], r"indices \[3\] outside the 3 layers"),
    ([-1, 0, 1], r"indices \[-1\]"),
    ([[0, 1, 2]], "1-d index array"),
    ([], "1-d index array"),
    ([0.5, 1, 2], "integers"),
])
def test_invalid_order_is_one_line(order, message):
  model = _tiny("llama")
  tokens = jnp.asarray(_tokens())
  variables = model.init(jax.random.key(0), tokens)
  with pytest.raises(InputError, match=message) as e:
    model.apply(variables, tokens, order=order)
  assert "\n" not in str(e.value)


def test_order_sets_the_gate_count_and_windows_fit_the_positions():
  model = _tiny("gpt2")
  tokens = jnp.asarray(_tokens())
  variables = model.init(jax.random.key(0), tokens)
  # A repeat runs 4 layers: 8 gates.
  assert model.apply(variables, tokens, order=[0, 1, 1, 2], gates=jnp.ones(8)).shape == (
      2, SEQ, VOCAB)
  with pytest.raises(InputError, match=r"shape \(8,\)"):
    model.apply(variables, tokens, order=[0, 1, 1, 2], gates=jnp.ones(6))
  with pytest.raises(InputError, match="longer than the model's 16 learned positions"):
    model.apply(variables, jnp.zeros((1, SEQ + 1), jnp.int32))


# ---------------------------------------------------------------------------------------------
# Against PyTorch: tiny random models written by transformers.


def _torch_model(family: str):
  """A tiny random ``family`` (gpt2, llama, mistral with a window of 4 of the 16 tokens, or
  qwen2), grouped-query where the family has it (4 query, 2 key/value heads)."""
  import torch
  import transformers
  torch.manual_seed(sorted(FAMILIES).index(family))
  if family == "gpt2":
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=32, n_layer=LAYERS,
                                     n_head=4, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config)
  else:
    config_cls, model_cls, extra = {
        "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
        "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 4}),
        "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    }[family]
    config = getattr(transformers, config_cls)(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=LAYERS,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ,
        rms_norm_eps=1e-5, **extra)
    model = getattr(transformers, model_cls)(config)
  with torch.no_grad():  # every tensor away from its initial value (norm scales, biases too)
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  return model.eval()


FAMILIES = ("gpt2", "llama", "mistral", "qwen2")


@pytest.fixture(scope="module", params=FAMILIES)
def hf(request, tmp_path_factory):
  """(family, torch model, folder with model.safetensors + tokenizer.json, folder with
  pytorch_model.bin and no tokenizer)."""
  import torch
  family = request.param
  model = _torch_model(family)
  safe = tmp_path_factory.mktemp(f"{family}_safetensors")
  model.save_pretrained(safe)
  write_tokenizer(safe / ti.TOKENIZER_FILE, VOCAB)
  binary = tmp_path_factory.mktemp(f"{family}_bin")
  model.config.save_pretrained(binary)
  torch.save(model.state_dict(), binary / ti.TORCH_FILE)
  return family, model, safe, binary


def _reference(model, tokens, order=None, zero=None):
  """The PyTorch model's logits; ``order``: its layer list as that index array; ``zero``:
  (layer module, "attn" | "mlp") whose output a forward hook zeroes."""
  import torch
  family = model.config.model_type
  holder = model.transformer if family == "gpt2" else model.model
  name = "h" if family == "gpt2" else "layers"
  layers = getattr(holder, name)
  count, types = model.config.num_hidden_layers, getattr(model.config, "layer_types", None)
  hooks = []
  if zero is not None:
    layer, kind = zero
    attr = {"attn": "attn" if family == "gpt2" else "self_attn", "mlp": "mlp"}[kind]
    zeroed = lambda m, args, out: ((torch.zeros_like(out[0]),) + tuple(out[1:])  # noqa: E731
                                   if isinstance(out, tuple) else torch.zeros_like(out))
    hooks.append(getattr(layers[layer], attr).register_forward_hook(zeroed))
  if order is not None:
    setattr(holder, name, torch.nn.ModuleList([layers[i] for i in order]))
    model.config.num_hidden_layers = len(order)
    if types is not None:  # Qwen2 reads each layer's attention kind from this list
      model.config.layer_types = [types[i] for i in order]
  try:
    with torch.no_grad():
      return model(torch.as_tensor(tokens, dtype=torch.long), use_cache=False).logits.numpy()
  finally:
    setattr(holder, name, layers)
    model.config.num_hidden_layers = count
    if types is not None:
      model.config.layer_types = types
    for h in hooks:
      h.remove()


def test_logits_match_pytorch(hf):
  family, model, safe, binary = hf
  tokens = _tokens()
  want = _reference(model, tokens)
  for folder in (safe, binary):
    imported = ti.load(folder, tokenizer=folder == safe)
    assert imported.family == family
    got = np.asarray(imported.model.apply(imported.variables, jnp.asarray(tokens)))
    diff = float(np.abs(got - want).max())
    print(f"{family} {os.path.basename(folder)}: max |logit diff| {diff:.2e} "
          f"(logits up to {np.abs(want).max():.1f})")
    assert diff < TOL
  if family != "gpt2":
    assert imported.model.kv_heads == 2 and imported.model.n_heads == 4
  assert imported.model.sliding_window == (4 if family == "mistral" else None)
  if family == "mistral":  # the window matters: without it the logits differ
    full = imported.model.clone(sliding_window=None).apply(imported.variables, jnp.asarray(tokens))
    assert float(np.abs(np.asarray(full) - want).max()) > 1e-3
  assert imported.model.qkv_bias == (family in ("gpt2", "qwen2"))


def test_a_zero_gate_is_the_branch_zeroed_by_a_hook(hf):
  family, model, safe, _ = hf
  imported = ti.load(safe)
  m, tokens = imported.model, jnp.asarray(_tokens())
  layout = m.layout
  # Every single-branch deletion in one vmapped program.
  gates = jnp.ones((layout.n_branches, layout.n_branches)) - jnp.eye(layout.n_branches)
  got = jax.jit(jax.vmap(lambda g: m.apply(imported.variables, tokens, gates=g)))(gates)
  for b in range(layout.n_branches):
    want = _reference(model, tokens, zero=(layout.layer_of(b), layout.branch_kinds[b]))
    np.testing.assert_allclose(got[b], want, atol=TOL, err_msg=layout.branch_names[b])
  intact = _reference(model, tokens)
  assert np.abs(got[0] - intact).max() > 1e-2  # a deletion changes the output


@pytest.mark.parametrize("order", [[2, 0, 1], [1, 0, 2], [0, 1, 1, 2], [0, 2], [1, 1, 1]],
                         ids=["permutation", "swap", "repeat", "skip", "painters_repeat"])
def test_an_index_array_is_the_layer_list_reordered(hf, order):
  family, model, safe, _ = hf
  imported = ti.load(safe, tokenizer=False)
  tokens = _tokens()
  got = imported.model.apply(imported.variables, jnp.asarray(tokens), order=order)
  np.testing.assert_allclose(got, _reference(model, tokens, order=order), atol=TOL)


def test_reordered_and_gated_together(hf):
  family, model, safe, _ = hf
  imported = ti.load(safe, tokenizer=False)
  tokens = _tokens()
  order = [2, 0, 1]
  # Position 1 runs layer 0: its MLP is branch 3 of the run.
  gates = transformer.branch_gates(6, [3])
  got = imported.model.apply(imported.variables, jnp.asarray(tokens), gates=gates, order=order)
  import torch
  mlp = (model.transformer.h if family == "gpt2" else model.model.layers)[0].mlp
  hook = mlp.register_forward_hook(lambda m, a, out: torch.zeros_like(out))
  try:
    want = _reference(model, tokens, order=order)
  finally:
    hook.remove()
  np.testing.assert_allclose(got, want, atol=TOL)


def test_the_tokenizer_comes_from_the_folder(hf):
  _, _, safe, binary = hf
  tok = ti.load(safe).tokenizer
  ids = tok.encode("residual networks").ids
  assert ids and max(ids) < VOCAB
  with pytest.raises(ModelFolderError, match="has no tokenizer.json") as e:
    ti.load(binary)
  assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------
# Bad folders: one line each.


def _copy(src, dst, config=None, weights=True):
  dst.mkdir()
  c = json.loads((src / ti.CONFIG_FILE).read_text())
  c.update(config or {})
  (dst / ti.CONFIG_FILE).write_text(json.dumps(c))
  if weights:
    (dst / ti.SAFETENSORS_FILE).write_bytes((src / ti.SAFETENSORS_FILE).read_bytes())
  return dst


@pytest.mark.parametrize("change,message", [
    ({"model_type": "bert"}, "unknown model_type 'bert'; supported: gpt2, llama, mistral, qwen2"),
    ({"architectures": ["GPT2ForSequenceClassification"]}, "unknown architecture"),
    ({"frobnicate": 3}, "unknown config key(s) frobnicate"),
    ({"model_type": "gpt_neox", "use_parallel_residual": True},
     "parallel-residual models are not supported"),
    ({"model_type": "gptj"}, "parallel-residual models are not supported"),
    ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx=True"),
    ({"n_embd": 64}, "does not match its config.json"),
    ({"n_layer": 4}, "missing h.3.attn.c_attn.bias"),
    ({"n_layer": 2}, "unexpected h.2."),
])
def test_bad_gpt2_folders_are_one_line(tmp_path, change, message):
  src = _source(tmp_path, "gpt2")
  with pytest.raises(ModelFolderError) as e:
    ti.load(_copy(src, tmp_path / "bad", change), tokenizer=False)
  assert message in str(e.value)
  assert "\n" not in str(e.value)


def test_bad_llama_folders_are_one_line(tmp_path):
  src = _source(tmp_path, "llama")
  cases = [
      ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4}}, "rope type 'llama3'"),
      ({"num_key_value_heads": 4},
       "layers.0.self_attn.k_proj.weight is (16, 32), config.json needs (32, 32)"),
      ({"hidden_act": "tanhshrink"}, "hidden_act='tanhshrink' is not supported"),
      ({"layer_types": ["sliding_attention"] + ["full_attention"] * (LAYERS - 1)},
       "only full attention in every layer"),
      ({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "use_sliding_window": True},
       "use_sliding_window=True is not supported"),
      ({"model_type": "mistral", "architectures": ["LlamaForCausalLM"]},
       "unknown architecture LlamaForCausalLM for model_type 'mistral'"),
  ]
  for i, (change, message) in enumerate(cases):
    with pytest.raises(ModelFolderError) as e:
      ti.load(_copy(src, tmp_path / f"bad{i}", change), tokenizer=False)
    assert message in str(e.value) and "\n" not in str(e.value)


def _source(tmp_path, family):
  src = tmp_path / "src"
  _torch_model(family).save_pretrained(src)
  return src


def test_missing_files_and_hub_names_are_one_line(tmp_path, monkeypatch):
  src = _source(tmp_path, "gpt2")
  no_weights = _copy(src, tmp_path / "no_weights", weights=False)
  cases = [
      (lambda: ti.load(no_weights, tokenizer=False),
       "holds no weights: expected model.safetensors"),
      (lambda: ti.load(tmp_path, tokenizer=False), "has no config.json"),
      (lambda: ti.load(tmp_path / "absent" / "x", tokenizer=False), "is not a folder"),
  ]
  (tmp_path / "broken").mkdir()
  (tmp_path / "broken" / ti.CONFIG_FILE).write_text("{not json")
  cases.append((lambda: ti.load(tmp_path / "broken"), "cannot read"))
  import huggingface_hub as hub
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
  monkeypatch.setattr(hub.constants, "HF_HUB_OFFLINE", True, raising=False)
  cases.append((lambda: ti.load("some-org/some-model"), "pass the local folder"))
  for fn, message in cases:
    with pytest.raises(ModelFolderError) as e:
      fn()
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


# ---------------------------------------------------------------------------------------------
# Evaluation windows and the measures of many variants.

TEXT = ("Residual networks behave like ensembles of relatively shallow networks. "
        "Deleting a single layer barely changes the error. ") * 3


def test_byte_windows():
  tokens = lm_eval.byte_tokens(TEXT)
  assert tokens.dtype == np.int32 and bytes(tokens.astype(np.uint8)).decode() == TEXT
  w = lm_eval.windows(tokens, 8)
  assert w.shape == (len(tokens[:-1]) // 8, 9)
  np.testing.assert_array_equal(w[1], tokens[8:17])  # each token predicted once
  assert lm_eval.windows(tokens, 8, stride=4).shape[0] == (len(tokens) - 9) // 4 + 1
  batches, mask = lm_eval.batched(w, 4)
  assert batches.shape[1:] == (4, 9) and mask.sum() == len(w)
  with pytest.raises(lm_eval.TextError, match="has 5 tokens, shorter than one window of 9") as e:
    lm_eval.windows(lm_eval.byte_tokens("short"), 8)
  assert "\n" not in str(e.value)


@pytest.mark.parametrize("reorder", [False, True], ids=["gated", "reordered"])
def test_vmapped_variants_equal_one_at_a_time(reorder):
  model = transformer.gpt2(lm_eval.BYTE_VOCAB, LAYERS, 32, 4, max_positions=8)
  w = lm_eval.windows(lm_eval.byte_tokens(TEXT), 8)
  variables = model.init(jax.random.key(0), jnp.asarray(w[:1, :-1]))
  batches, mask = lm_eval.batched(w, 7)  # padded: len(w) = 45 is not a multiple of 7
  assert mask.min() == 0
  gates = np.stack([np.ones(6), transformer.branch_gates(6, [2]),
                    transformer.layer_gates(np.array([0.0, 1.0, 1.0]))]).astype(np.float32)
  orders = np.array([[0, 1, 2], [2, 1, 0], [0, 0, 2]]) if reorder else None
  fn = lm_eval.make_variant_evaluator(model, reorder=reorder)
  out = fn(variables, jnp.asarray(batches), jnp.asarray(mask), jnp.asarray(gates),
           *(() if orders is None else (jnp.asarray(orders),)))
  assert out["count"][0] == w.size - len(w)
  for g in range(len(gates)):
    want = reference_measures(model, variables, w, gates[g],
                               None if orders is None else orders[g])
    for k, v in want.items():
      np.testing.assert_allclose(out[k][g], v, rtol=1e-4, atol=1e-6, err_msg=f"{k} of {g}")
  assert abs(float(out["kl"][0])) < 1e-6  # the intact variant
  assert float(out["kl"][1]) > 0
  with pytest.raises(InputError, match=r"gates must have shape \(variants, 6\)"):
    fn(variables, batches, mask, gates[:, :4], *(() if orders is None else (orders,)))
  if reorder:
    with pytest.raises(InputError, match="outside the 3 layers"):
      fn(variables, batches, mask, gates, orders + 1)


def test_the_readme_example_runs(hf, capsys):
  """README.md's transformer example, on the tiny folder instead of a real GPT-2 or Llama."""
  _, _, safe, _ = hf
  with open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "README.md")) as f:
    readme = f.read()
  code = readme.split("<!-- transformer-example -->\n```python\n", 1)[1].split("```", 1)[0]
  assert '"models/gpt2"' in code
  exec(compile(code.replace('"models/gpt2"', repr(str(safe))), "README.md", "exec"), {})
  assert "'attn_0'" in capsys.readouterr().out


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_a_model_written_as_a_folder_reads_back_here_and_in_transformers(family, tmp_path):
  """``save_folder`` (a model trained here, published): our importer gets the same parameters
  back, and `transformers` computes the same logits from the folder."""
  import torch
  import transformers
  model = _tiny(family)
  variables = model.init(jax.random.key(3), _tokens())
  variables = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(4), a.shape),
                           variables)  # away from the initial values (norm scales, biases)
  ti.save_folder(model, variables, str(tmp_path))
  back = ti.load(tmp_path, tokenizer=False)
  assert back.family == family and back.model == model.clone(parent=None)
  for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(back.variables)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  torch_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
  with torch.no_grad():
    want = torch_model(torch.tensor(_tokens(), dtype=torch.long)).logits.numpy()
  got = np.asarray(model.apply(variables, jnp.asarray(_tokens())))
  assert float(np.abs(got - want).max()) < TOL


def test_settings_no_folder_describes_are_one_line():
  mixed = transformer.gpt2(VOCAB, 2, 32, 4, norm="rmsnorm")
  with pytest.raises(ModelFolderError, match="neither GPT-2's nor Llama's"):
    ti.config_of_model(mixed)
