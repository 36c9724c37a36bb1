"""train.conv_groups: the batch as G slices over G weight copies (grouped convolutions) trains
the same function: the same losses, parameters and BatchNorm statistics step by step."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from resnet_ensemble import evaluate, gates as gates_lib, models, state as state_lib, train
from resnet_ensemble.config import base_config
from resnet_ensemble.sharding import make_mesh, replicated

NETS = {"resnet": models.ResNet(stage_sizes=(2, 2, 2), widths=(4, 8, 16)),
        "plain": models.PlainNet(stage_sizes=(2, 2), width=8)}
SAMPLERS = {"none": {}, "stochastic_depth_per_example": {"per_example": True},
            "effective_skip": {"k": 3}}


def _run(model, sampler: str, groups: int, steps: int = 3):
  gc = base_config().gates
  gc.sampler = sampler.split("_per")[0].replace("_skip", "")
  for key, value in SAMPLERS[sampler].items():
    setattr(gc, key, value)
  sample = gates_lib.make_stack_sampler([gc], model.layout, 16)
  tx = optax.sgd(0.1, momentum=0.9)
  mesh = make_mesh()
  images = jax.random.randint(jax.random.key(1), (16, 8, 8, 3), 0, 256).astype(jnp.uint8)
  labels = jnp.arange(16) % 10
  state = state_lib.create_train_state(model, tx, 0, (8, 8, 3), mesh)
  step = jax.jit(train.make_train_on_batch(model, tx, (128.0,) * 3, (64.0,) * 3, 0.0, mesh,
                                           sample_gates=sample,
                                           skip_compute=sampler.endswith("skip"),
                                           conv_groups=groups),
                 out_shardings=(replicated(mesh),) * 2)
  losses = []
  for _ in range(steps):
    state, m = step(state, images, labels, jax.random.key(3))
    losses.append(float(m.compute()["loss"]))
  return state, losses


# The plain net's gates are tested with the residual net's: the plain net runs ungated only.
@pytest.mark.parametrize("net,sampler", [("resnet", s) for s in SAMPLERS] + [("plain", "none")])
def test_grouped_convolutions_train_the_same_function(net, sampler):
  (s1, l1), (s4, l4) = (_run(NETS[net], sampler, g) for g in (1, 4))
  np.testing.assert_allclose(l4, l1, rtol=1e-5)
  for tree in ("params", "batch_stats"):
    for a, b in zip(jax.tree.leaves(getattr(s4, tree)), jax.tree.leaves(getattr(s1, tree))):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("net", NETS)
def test_grouped_eval_gives_the_same_numbers(net):
  model = NETS[net]
  state = state_lib.create_train_state(model, optax.sgd(0.1), 0, (8, 8, 3), make_mesh())
  variables = {"params": state.params, "batch_stats": jax.tree.map(
      lambda s: s + 0.3, state.batch_stats)}  # non-trivial statistics
  images = jax.random.randint(jax.random.key(1), (2, 16, 8, 8, 3), 0, 256).astype(jnp.uint8)
  labels = jnp.arange(32).reshape(2, 16) % 10
  mask = jnp.ones((2, 16)).at[1, 12:].set(0)
  gates = jnp.asarray([1.0, 0.0] * (model.layout.n_blocks // 2)
                      + [1.0] * (model.layout.n_blocks % 2))
  one, four = (jax.jit(evaluate.make_eval_fn(model, (128.0,) * 3, (64.0,) * 3, g))
               (variables, images, labels, mask, gates) for g in (1, 4))
  for key in ("loss", "accuracy", "count"):
    np.testing.assert_allclose(four[key], one[key], rtol=1e-5)


def test_grouped_apply_runs_grouped_convolutions():
  """The copies really become grouped convolutions (else the option would do nothing)."""
  model = NETS["resnet"]
  variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
  apply = evaluate.grouped_apply(model, 4, train=True)
  hlo = jax.jit(lambda v, x: apply(v, x, None, False)).lower(
      variables, jnp.zeros((16, 8, 8, 3))).as_text()
  assert "feature_group_count = 4" in hlo


def test_conv_groups_must_divide_the_batch():
  with pytest.raises(ValueError, match="train.conv_groups=3 must divide the batch size 16"):
    _run(NETS["resnet"], "none", 3, steps=1)


@pytest.mark.parametrize("skip", [False, True])
def test_per_example_gates_off_for_one_slice_only_move_statistics_as_one_batch(skip):
  """A block whose per-example gates are zero for slice 0's examples only is live for the
  batch: its BN statistics move as with groups=1, in either form (not slice 0's verdict)."""
  model = NETS["resnet"]
  variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
  x = jax.random.normal(jax.random.key(1), (16, 8, 8, 3))
  gates = np.ones((model.layout.n_blocks, 16), np.float32)
  gates[1, ::4] = 0  # slice 0 of 4 holds examples 0, 4, 8, 12
  gates[3] = 0       # off for the whole batch
  runs = [jax.jit(lambda v, x, g, a=evaluate.grouped_apply(model, groups, True): a(v, x, g, skip))(
      variables, x, jnp.asarray(gates)) for groups in (1, 4)]
  (l1, u1), (l4, u4) = runs
  np.testing.assert_allclose(l4, l1, rtol=1e-5, atol=1e-6)
  for a, b in zip(jax.tree.leaves(u4), jax.tree.leaves(u1), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
