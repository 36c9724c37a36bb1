"""Gates are data: a zero gate removes a block, reordering is a permutation of stacked params."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from resnet_ensemble import blocks, models
from resnet_ensemble.layout import down_name, stacked_name
from resnet_ensemble.surgery import permute_blocks
from tests.conftest import RESNETS


def _variables(model, x, seed=0):
  """Initialised variables with non-trivial batch statistics (one train-mode pass)."""
  v = jax.jit(model.init)(jax.random.key(seed), x)
  train_apply = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))
  _, mut = train_apply(v, x * 2.0 + 0.5)
  return {"params": v["params"], "batch_stats": mut["batch_stats"]}


def _without_block(model, variables, index):
  """The same network built without block ``index`` (a stacked block), with its variables."""
  layout = model.layout
  s = layout.stage_of(index)
  r = layout.stacked_range(s)
  assert index in r, "only stacked blocks can be removed structurally"
  sizes = list(model.stage_sizes)
  sizes[s] -= 1
  smaller = model.clone(stage_sizes=tuple(sizes))
  out = {}
  for col, tree in variables.items():
    tree = dict(tree)
    name = stacked_name(s)
    if len(r) == 1:
      del tree[name]
    else:
      tree[name] = jax.tree.map(lambda a: np.delete(np.asarray(a), index - r.start, axis=0), tree[name])
    out[col] = tree
  return smaller, out




@pytest.fixture(scope="module")
def x():
  return jax.random.normal(jax.random.key(42), (5, 8, 8, 3))


@pytest.mark.parametrize("kind", list(RESNETS))
def test_zero_gate_equals_network_without_that_block(kind, x):
  model = RESNETS[kind]
  v = _variables(model, x)
  layout = model.layout
  apply = jax.jit(model.apply)
  first_and_last = [layout.stacked_range(0)[0], layout.stacked_range(layout.num_stages - 1)[-1]]
  for index in first_and_last:
    gates = jnp.ones(layout.n_blocks).at[index].set(0.0)
    lesioned = apply(v, x, gates=gates)
    smaller, v_small = _without_block(model, v, index)
    reference = jax.jit(smaller.apply)(v_small, x)
    np.testing.assert_allclose(lesioned, reference, rtol=1e-5, atol=1e-5, err_msg=f"block {index}")
    # and the lesion really changes the output (the block was doing something)
    assert not np.allclose(lesioned, apply(v, x), atol=1e-4)


def test_plain_zero_gate_is_identity_layer(x):
  model = models.PlainNet(stage_sizes=(2, 3, 1), width=8)
  v = _variables(model, x)
  for index in (0, 3):  # a stage keeps >= 1 layer after removal only for these
    gates = jnp.ones(model.layout.n_blocks).at[index].set(0.0)
    smaller, v_small = _without_block(model, v, index)
    np.testing.assert_allclose(jax.jit(model.apply)(v, x, gates=gates), jax.jit(smaller.apply)(v_small, x),
                               rtol=1e-5, atol=1e-5)


def test_zero_gate_on_downsampling_block_keeps_only_the_shortcut(x):
  # stem_width != widths[0]: stage 0's first block is a (non-scanned) downsampling block too,
  # so the input of block 1 is visible as block 0's captured output.
  model = models.ResNet(stage_sizes=(1, 2, 2), widths=(4, 8, 16), stem_width=2,
                        shortcut="zero_pad")
  v = _variables(model, x)
  assert model.layout.downsampling == (0, 1, 3)
  gates = jnp.ones(5).at[1].set(0.0)
  _, inter = model.apply(v, x, gates=gates, capture_intermediates=True)
  block_in = inter["intermediates"][down_name(0)]["__call__"][0]
  block_out = inter["intermediates"][down_name(1)]["__call__"][0]
  expected = jnp.pad(block_in[:, ::2, ::2, :], ((0, 0), (0, 0), (0, 0), (2, 2)))
  np.testing.assert_allclose(block_out, expected, rtol=1e-6, atol=1e-6)


def test_all_ones_gates_equal_no_gates_and_per_example_gates_act_per_example(x):
  model = RESNETS["preact"]
  v = _variables(model, x)
  n = model.layout.n_blocks
  apply = jax.jit(model.apply)
  np.testing.assert_allclose(apply(v, x, gates=jnp.ones(n)), apply(v, x), rtol=1e-6)
  rng = np.random.default_rng(0)
  per_example = (rng.random((n, x.shape[0])) > 0.5).astype(np.float32)
  joint = apply(v, x, gates=per_example)
  for b in range(x.shape[0]):
    alone = apply(v, x[b:b + 1], gates=per_example[:, b])
    np.testing.assert_allclose(joint[b], alone[0], rtol=1e-5, atol=1e-5)


def _forward_in_order(model, v, x, order):
  """Pre-activation CIFAR ResNet run block by block, in ``order``, from the stacked params."""
  layout = model.layout
  variables_of = lambda name: {"params": v["params"][name], "batch_stats": v["batch_stats"][name]}
  h = models.nn.Conv(model.widths[0], (3, 3), padding=1, use_bias=False).apply(
      {"params": v["params"]["stem_conv"]}, x)
  for pos in range(layout.n_blocks):
    src = order[pos]
    s = layout.stage_of(src)
    if src in layout.downsampling:
      block, sub = blocks.BasicBlock(model.widths[s], stride=2, down=True, norm=_eval_bn), variables_of(down_name(s))
    else:
      j = src - layout.stacked_range(s).start
      block = blocks.BasicBlock(model.widths[s], norm=_eval_bn)
      sub = jax.tree.map(lambda a: a[j], variables_of(stacked_name(s)))
    h = block.apply(sub, h, jnp.ones(()))
  h = _eval_bn("final_bn").apply(variables_of("final_bn"), h)
  h = jax.nn.relu(h).mean(axis=(1, 2))
  return models.nn.Dense(10).apply({"params": v["params"]["head"]}, h)


def _eval_bn(name):
  return models.nn.BatchNorm(use_running_average=True, momentum=0.9, epsilon=1e-5, name=name)


def test_permuting_stacked_params_runs_the_blocks_in_that_order(x):
  model = models.ResNet(stage_sizes=(3, 3, 2), widths=(4, 8, 16))
  v = _variables(model, x)
  identity = list(range(model.layout.n_blocks))
  apply = jax.jit(model.apply)
  np.testing.assert_allclose(apply(v, x), _forward_in_order(model, v, x, identity),
                             rtol=1e-5, atol=1e-5)
  order = [2, 0, 1, 3, 5, 4, 6, 7]  # blocks 3 and 6 are downsampling and stay put
  permuted = permute_blocks(v, model.layout, order)
  out = apply(permuted, x)
  np.testing.assert_allclose(out, _forward_in_order(model, v, x, order), rtol=1e-5, atol=1e-5)
  assert not np.allclose(out, apply(v, x), atol=1e-4)


def test_bad_orders_and_gates_are_clear_errors(x):
  model = RESNETS["preact"]
  v = _variables(model, x)
  with pytest.raises(ValueError, match="downsampling block"):
    permute_blocks(v, model.layout, [0, 1, 3, 2, 4, 5])
  with pytest.raises(ValueError, match="within their stage"):
    permute_blocks(v, model.layout, [0, 3, 2, 1, 4, 5])
  with pytest.raises(ValueError, match="permutation"):
    permute_blocks(v, model.layout, [0, 0, 2, 3, 4, 5])
  with pytest.raises(ValueError, match=r"shape \(6,\) or \(6, batch\).*got shape \(5,\)"):
    model.apply(v, x, gates=jnp.ones(5))
  with pytest.raises(ValueError, match="batch size 4"):
    model.apply(v, x, gates=jnp.ones((6, 4)))
  with pytest.raises(IndexError, match="out of range.*0..5"):
    model.layout.check_index(6)


def _model_config(**kw):
  c = ml_collections.ConfigDict(dict(name="cifar_resnet", depth=110, width=0, block_form="preact",
                                     shortcut="projection", dtype="float32", unroll=1,
                                     plain_stages=(5, 4, 4)))
  c.update(kw)
  return c


def test_paper_architectures_have_the_paper_block_indexing():
  r110 = models.build(_model_config(), 10).layout
  assert r110.n_blocks == 54 and r110.downsampling == (18, 36)  # paper: blocks 19 and 37
  r200 = models.build(_model_config(name="imagenet_resnet", depth=200), 1000).layout
  assert r200.n_blocks == 66 and r200.stage_sizes == (3, 24, 36, 3)
  assert r200.downsampling == (0, 3, 27, 63)
  r18 = models.build(_model_config(name="imagenet_resnet", depth=18), 1000).layout
  assert r18.downsampling == (2, 4, 6)  # stage 0 of a basic ResNet keeps 64 channels
  vgg = models.build(_model_config(name="plain"), 10).layout
  assert vgg.n_blocks == 13 and vgg.downsampling == ()


def test_parameter_counts_match_the_paper():
  x = jnp.zeros((1, 32, 32, 3))
  model = models.build(_model_config(depth=110, shortcut="zero_pad"), 10)
  params = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
  n = sum(np.prod(a.shape) for a in jax.tree.leaves(params))
  assert 1.70e6 < n < 1.74e6, n  # "1.7M parameters"


def test_unknown_names_are_clear_errors():
  with pytest.raises(ValueError, match="unknown model name 'resnet'; valid: cifar_resnet"):
    models.build(_model_config(name="resnet"), 10)
  with pytest.raises(ValueError, match="depth 6n\\+2"):
    models.build(_model_config(depth=100), 10)
  with pytest.raises(ValueError, match="unknown ImageNet ResNet depth 77"):
    models.build(_model_config(name="imagenet_resnet", depth=77), 10)
  with pytest.raises(ValueError, match="unknown model stream_dtype 'fp32'; valid: float32"):
    models.build(_model_config(stream_dtype="fp32"), 10)


@pytest.mark.parametrize("form", [("preact", "projection"), ("postact", "zero_pad")])
def test_a_float32_stream_keeps_the_identity_path_exact_under_bf16_compute(form):
  """model.stream_dtype: each block adds its bf16 residual to the float32 identity path in
  float32 (no rounding of the stream to bf16), while the branches compute in bf16; with
  float32 compute it changes nothing. Asserted exactly, not as a margin on a deep net's error
  (which depends on the XLA version's bf16 arithmetic)."""
  block_form, shortcut = form
  preact = block_form == "preact"
  x = jax.random.normal(jax.random.key(1), (4, 8, 8, 8), jnp.float32)  # not bf16-representable
  assert not np.array_equal(np.asarray(x.astype(jnp.bfloat16).astype(jnp.float32)), np.asarray(x))
  merge = (lambda z: z) if preact else jax.nn.relu
  for stream in (jnp.float32, None):
    x = x if stream is jnp.float32 else x.astype(jnp.bfloat16)  # the stream that enters
    block = blocks.BasicBlock(features=8, preact=preact, shortcut=shortcut,
                              norm=models._norm(False, jnp.bfloat16), dtype=jnp.bfloat16,
                              stream_dtype=stream)
    variables = block.init(jax.random.key(0), x, jnp.ones(()))
    y = block.apply(variables, x, jnp.ones(()))
    s, f = block.apply(variables, x, method=lambda m, x: m.branches(x))
    assert f.dtype == jnp.bfloat16  # the branch ran in bf16
    if stream is jnp.float32:
      assert y.dtype == jnp.float32 and s.dtype == jnp.float32
      np.testing.assert_array_equal(y, merge(x + f.astype(jnp.float32)))  # x kept exactly
    else:
      assert y.dtype == jnp.bfloat16  # a bf16 stream: every sum rounded to bf16
  # The whole net: with float32 compute the option changes nothing; under bf16 compute the
  # stream between blocks (the downsampling blocks' outputs, the scans' carries) is float32.
  config = ml_collections.ConfigDict(dict(
      name="cifar_resnet", depth=20, width=4, block_form=block_form, shortcut=shortcut,
      dtype="float32", stream_dtype="", unroll=1))
  images = jax.random.normal(jax.random.key(1), (16, 8, 8, 3))
  nets = {}
  for dtype, stream in (("float32", ""), ("float32", "float32"), ("bfloat16", "float32")):
    config.dtype, config.stream_dtype = dtype, stream
    nets[dtype, stream] = models.build(config, 10)
  variables = nets["float32", ""].init(jax.random.key(0), images)
  logits = {k: net.apply(variables, images, train=True, mutable=["batch_stats"])[0]
            for k, net in nets.items()}
  np.testing.assert_array_equal(logits["float32", "float32"], logits["float32", ""])
  _, inter = nets["bfloat16", "float32"].apply(variables, images, capture_intermediates=True,
                                               mutable=["intermediates"])
  for stage in ("stage1_down", "stage2_down"):
    block = inter["intermediates"][stage]
    assert block["__call__"][0].dtype == jnp.float32
    assert block["conv2"]["__call__"][0].dtype == jnp.bfloat16
