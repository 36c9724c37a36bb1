"""The lesion engine: batched lesions equal lesions evaluated alone, one compilation."""

import itertools
import json
from pathlib import Path

import jax
import numpy as np
import pytest

from resnet_ensemble import (eval_batches, evaluate, lesion, lesion_engine, restore, shared_prefix,
                             train)
from resnet_ensemble.layout import BlockLayout, check_order
from resnet_ensemble.sharding import make_mesh
from resnet_ensemble.surgery import permute_blocks
from resnet_ensemble.workdir import ConfigMismatchError
from tests.conftest import tiny_config

LAYOUT = BlockLayout((3, 3, 3), (False, True, True))  # ResNet-20: downsampling 3 and 6


def _brute_force_tau(order):
  concordant = discordant = 0
  for i, j in itertools.combinations(range(len(order)), 2):
    if order[i] < order[j]:
      concordant += 1
    else:
      discordant += 1
  return (concordant - discordant) / (concordant + discordant)


def test_kendall_tau_is_exact():
  rng = np.random.default_rng(0)
  assert lesion.kendall_tau(range(10)) == 1.0
  assert lesion.kendall_tau(range(9, -1, -1)) == -1.0
  for _ in range(50):
    order = rng.permutation(rng.integers(2, 30))
    assert lesion.kendall_tau(order) == pytest.approx(_brute_force_tau(order), abs=1e-15)


def test_random_deletions_delete_exactly_k_eligible_blocks():
  rng = np.random.default_rng(0)
  for k in range(8):
    gates = lesion.random_deletion_gates(rng, LAYOUT, k, 200, exclude_downsampling=True)
    assert (np.sum(gates == 0, axis=1) == k).all()
    assert (gates[:, [3, 6]] == 1).all()
  gates = lesion.random_deletion_gates(rng, LAYOUT, 2, 4000)
  freq = np.mean(gates == 0, axis=0)  # each block deleted with probability 2/9
  assert np.allclose(freq, 2 / 9, atol=0.03)
  with pytest.raises(ValueError, match="k=8 blocks.*7 eligible"):
    lesion.random_deletion_gates(rng, LAYOUT, 8, 1, exclude_downsampling=True)
  with pytest.raises(ValueError, match="k=10 blocks.*9 eligible"):
    lesion.random_deletion_gates(rng, LAYOUT, 10, 1)


def test_random_swaps_stay_within_stages_and_keep_downsampling_blocks():
  rng = np.random.default_rng(1)
  orders = lesion.random_swap_orders(rng, LAYOUT, 5, 100)
  for order in orders:
    check_order(LAYOUT, order)  # raises if a block left its stage or a downsampling block moved
  assert any(lesion.kendall_tau(o) < 1 for o in orders)
  one = lesion.random_swap_orders(rng, LAYOUT, 1, 50)
  assert all((o != np.arange(9)).sum() == 2 for o in one)  # a single swap moves two blocks


@pytest.fixture(scope="module")
def trained_tiny(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("lesion"))
  config = tiny_config(**{"model.depth": 20, "train.num_steps": 20, "train.eval_every": 20,
                          "lesion.max_k": 3, "lesion.draws": 3, "lesion.reorder_max_swaps": 2,
                          "lesion.reorder_draws": 3, "lesion.chunk": 4})
  train.train_and_evaluate(config, workdir)
  return config, workdir


def _tiny_engine(trained_tiny):
  """The trained tiny net, its eval_fn and test batches, and a maker of fresh engines."""
  config, workdir = trained_tiny
  t = restore.load_trained(config, workdir)
  eval_fn = evaluate.make_eval_fn(t.model, t.dataset.mean, t.dataset.std)
  batches = t.dataset.padded_test(config.eval.batch_size)
  make = lambda source=t.dataset, **kw: lesion_engine.build_engine(  # noqa: E731
      t.model, t.variables, source, make_mesh(), batch_size=config.eval.batch_size, chunk=4,
      **kw)
  return t, eval_fn, batches, make


@pytest.mark.parametrize("variant_weights", ["shared", "per_variant", "prefix"])
def test_batched_lesions_equal_lesions_evaluated_alone(trained_tiny, variant_weights):
  t, eval_fn, batches, make = _tiny_engine(trained_tiny)
  workdir = trained_tiny[1]
  engine = make(variant_weights=variant_weights)
  rng = np.random.default_rng(0)
  gates = np.concatenate([np.ones((1, 9), np.float32), lesion.single_deletion_gates(t.layout),
                          lesion.random_deletion_gates(rng, t.layout, 3, 4)])
  batched = engine.evaluate(gates)
  alone = jax.jit(eval_fn)
  for g, err in zip(gates, batched):
    assert err == pytest.approx(float(alone(t.variables, *batches, g)["error"]), abs=1e-6)
  with open(f"{workdir}/final_metrics.json") as f:  # all ones = the trained network's error
    assert batched[0] == pytest.approx(json.load(f)["eval_error"], abs=1e-6)
  orders = lesion.random_swap_orders(rng, t.layout, 1, 5)  # one swap: never the trained order
  reordered = engine.evaluate(orders=orders)
  for order, err in zip(orders, reordered):
    permuted = permute_blocks(t.variables, t.layout, order)
    assert err == pytest.approx(float(alone(permuted, *batches)["error"]), abs=1e-6)
  # Shared: gated variants share one program, reordered ones another. Per variant: one
  # program (weights of their own) serves both; so does the prefix form's own program.
  if variant_weights == "prefix":
    assert engine.form.name == "prefix" and engine.form.fn_prefix._cache_size() == 1
    assert not hasattr(engine.form, "fn")  # no whole-network program is even made
  else:
    form = engine.form
    assert form.name == variant_weights
    assert form.fn_gated._cache_size() == int(form.shared) and form.fn._cache_size() == 1


def test_variant_weights_auto_and_unknown(monkeypatch):
  """``auto`` on each platform (the device is stubbed, so this holds on any host)."""
  narrow = {"conv": {"kernel": np.zeros((3, 3, 16, 64))}}
  wide = {"conv": {"kernel": np.zeros((3, 3, 64, 256))}}

  class Device:
    platform = "cpu"

  monkeypatch.setattr(lesion_engine.jax, "devices", lambda: [Device()])
  assert lesion_engine.resolve_variant_weights("auto", narrow) == "prefix"
  assert lesion_engine.resolve_variant_weights("auto", wide) == "prefix"
  assert lesion_engine.resolve_variant_weights("per_variant", wide) == "per_variant"
  Device.platform = "gpu"
  assert lesion_engine.resolve_variant_weights("auto", narrow) == "per_variant"
  assert lesion_engine.resolve_variant_weights("auto", wide) == "shared"
  with pytest.raises(ValueError, match="lesion.variant_weights='grouped'; valid: auto"):
    lesion_engine.resolve_variant_weights("grouped")


def test_prefix_form_gives_every_variant_the_error_of_todays_engine(trained_tiny):
  """Every E1 deletion, E3 draws and E4 swaps, with stochastic-depth-like test-time gates and
  a memory budget that splits each eval batch: the same errors (and losses) as the shared /
  per-variant engine, which evaluates each variant as a full pass."""
  t, eval_fn, batches, make = _tiny_engine(trained_tiny)
  rng = np.random.default_rng(3)
  base = np.linspace(1.0, 0.5, 9).astype(np.float32)
  gates = np.concatenate([np.ones((1, 9), np.float32), lesion.single_deletion_gates(t.layout),
                          lesion.random_deletion_gates(rng, t.layout, 2, 6),
                          lesion.random_deletion_gates(rng, t.layout, 5, 6)])
  orders = lesion.random_swap_orders(rng, t.layout, 2, 6)
  today = make(variant_weights="per_variant", base_gates=base)
  kept = today.batches.batch_size * shared_prefix.kept_bytes_per_image(t.model,
                                                                        t.dataset.input_shape)
  prefix = make(variant_weights="prefix", base_gates=base, prefix_budget=kept // 3)
  assert prefix.batches.batch_size < today.batches.batch_size  # the budget split the batches
  np.testing.assert_array_equal(prefix.evaluate(gates), today.evaluate(gates))
  np.testing.assert_array_equal(prefix.evaluate(orders=orders), today.evaluate(orders=orders))
  both = (gates[10:16], orders)  # deletions and swaps in one variant
  np.testing.assert_array_equal(prefix.evaluate(*both), today.evaluate(*both))


def test_first_changed_position_of_each_variant():
  base = np.asarray([1.0, 0.5, 0.5, 1.0], np.float32)
  gates = np.asarray([base, base * [1, 1, 0, 1], base * [0, 1, 1, 1], base], np.float32)
  orders = np.asarray([[0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 3, 2]])
  np.testing.assert_array_equal(shared_prefix.first_changed(gates, orders, base), [4, 2, 0, 2])
  assert shared_prefix.batch_for_budget(1000, 2 << 20, 1 << 30) == 512
  assert shared_prefix.batch_for_budget(100, 10, 1 << 30, multiple=8) == 96
  assert shared_prefix.batch_for_budget(100, 1 << 40, 1, multiple=8) == 8


def test_prefix_form_on_a_plain_network_and_a_bottleneck_resnet():
  """The shared prefix for the other block kinds: max-pooling between stages (plain) and a
  downsampling first stage (bottleneck): each variant's numbers equal its full pass."""
  from resnet_ensemble import models, shared_prefix
  nets = [models.PlainNet(stage_sizes=(2, 3, 2), width=8),
          models.ResNet(stage_sizes=(2, 1, 2), widths=(4, 8, 8), block="bottleneck",
                        stem="cifar", stem_width=8)]
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (2, 16, 16, 16, 3), dtype=np.uint8)
  labels = rng.integers(0, 10, (2, 16)).astype(np.int32)
  mask = np.ones((2, 16), np.float32)
  mask[1, 10:] = 0
  for model in nets:
    layout = model.layout
    variables = model.init(jax.random.key(0), images[0].astype(np.float32))
    # moved running statistics, so that no block is close to the identity
    variables = jax.tree.map(lambda a: a + 0.2 * rng.standard_normal(a.shape).astype(a.dtype),
                             variables)
    n = layout.n_blocks
    base = np.linspace(1.0, 0.7, n).astype(np.float32)
    gates = np.concatenate([np.ones((1, n)), lesion.single_deletion_gates(layout),
                            lesion.random_deletion_gates(rng, layout, 2, 3)]).astype(np.float32)
    orders = np.tile(np.arange(n), (len(gates), 1))
    if any(len(layout.stacked_range(s)) >= 2 for s in range(layout.num_stages)):
      gates = np.concatenate([gates, np.ones((3, n), np.float32)])
      orders = np.concatenate([orders, lesion.random_swap_orders(rng, layout, 1, 3)])
    fn = jax.jit(shared_prefix.make_prefix_evaluator(model, (128.0,) * 3, (64.0,) * 3))
    out = fn(variables, images, labels, mask, base, gates * base, orders.astype(np.int32))
    alone = jax.jit(evaluate.make_eval_fn(model, (128.0,) * 3, (64.0,) * 3))
    for g, o, err, loss in zip(gates, orders, out["error"], out["loss"]):
      ref = alone(permute_blocks(variables, layout, o), images, labels, mask, g * base)
      assert float(err) == pytest.approx(float(ref["error"]), abs=1e-6)
      assert float(loss) == pytest.approx(float(ref["loss"]), rel=1e-5)
    assert len(set(np.round(np.asarray(out["loss"]), 4))) > len(gates) // 2  # variants differ


def test_repeated_variants_are_evaluated_once(trained_tiny):
  t, _, _, make = _tiny_engine(trained_tiny)
  engine, chunks = make(), []
  run_chunk = engine._chunk_errors
  engine._chunk_errors = lambda g, o: chunks.append(1) or run_chunk(g, o)
  e1 = lesion.single_deletion_gates(t.layout)
  gates = np.concatenate([np.ones((3, 9), np.float32), e1, e1[:2]])  # 14 variants, 10 distinct
  errors = engine.evaluate(gates)
  assert len(chunks) == 3  # 10 distinct variants in chunks of 4
  alone = make().evaluate(np.concatenate([np.ones((1, 9), np.float32), e1]))
  np.testing.assert_array_equal(errors, np.concatenate([alone[[0, 0, 0]], alone[1:], alone[1:3]]))
  np.testing.assert_array_equal(engine.evaluate(e1[::-1]), alone[1:][::-1])
  assert len(chunks) == 3  # nothing new to evaluate


def test_lesion_study_writes_every_experiment(trained_tiny):
  config, workdir = trained_tiny
  out = lesion.run_study(config, workdir)
  assert out["layout"]["downsampling"] == [3, 6] and len(out["single"]["error"]) == 9
  assert out["random"]["k"] == [0, 1, 2, 3] and len(out["random"]["error"][3]) == 3
  assert out["random"]["mean"][0] == pytest.approx(out["baseline"]["error"])
  assert out["random_no_downsampling"]["exclude_downsampling"] is True
  assert np.asarray(out["reorder"]["tau"]).shape == (2, 3)
  for (i, j), tau in zip(out["reorder"]["single_swaps"], out["reorder"]["tau"][0]):
    stage = next(s for s in out["layout"]["stages"] if i in s)
    assert j in stage and i != j and {i, j}.isdisjoint(out["layout"]["downsampling"])
    order = np.arange(9)
    order[[i, j]] = order[[j, i]]
    assert lesion.kendall_tau(order) == pytest.approx(tau)  # the draw that was evaluated
  assert out["checkpoint_step"] == 20


def test_a_study_cut_short_keeps_what_it_finished_and_resumes(trained_tiny, monkeypatch):
  config, workdir = trained_tiny
  (Path(workdir) / "lesion.json").write_text('{"earlier": "complete study"}')
  uninterrupted = lesion.run_study(config, workdir)
  (Path(workdir) / "lesion.json").write_text('{"earlier": "complete study"}')
  evaluate = lesion_engine.LesionEngine.evaluate
  evaluated = []

  def preempted_in_e4(self, gates=None, orders=None, desc=""):
    if orders is not None:
      raise KeyboardInterrupt("preempted")
    return evaluate(self, gates, orders, desc)

  monkeypatch.setattr(lesion_engine.LesionEngine, "evaluate", preempted_in_e4)
  with pytest.raises(KeyboardInterrupt):
    lesion.run_study(config, workdir)
  partial = json.loads((Path(workdir) / lesion.PARTIAL).read_text())
  assert len(partial["single"]["error"]) == 9 and partial["random_no_downsampling"]["k"]
  assert "reorder" not in partial
  assert json.loads((Path(workdir) / "lesion.json").read_text()) == {"earlier": "complete study"}

  def recorded(self, gates=None, orders=None, desc=""):
    evaluated.append(desc)
    return evaluate(self, gates, orders, desc)

  monkeypatch.setattr(lesion_engine.LesionEngine, "evaluate", recorded)
  out = lesion.run_study(config, workdir)  # resumes: E3 kept, E4 run; replaces both files
  assert not any(d.startswith("E3") for d in evaluated) and "E4 reorder blocks" in evaluated
  assert out == json.loads(json.dumps(uninterrupted))
  assert json.loads((Path(workdir) / "lesion.json").read_text())["reorder"] == out["reorder"]
  assert not (Path(workdir) / lesion.PARTIAL).exists()
  evaluated.clear()
  rechunked = config.copy_and_resolve_references()
  rechunked.lesion.chunk = 2  # execution settings: the same study
  rechunked.lesion.variant_weights = "per_variant"
  lesion.run_study(rechunked, workdir)  # nothing left to do but the baseline and E1
  assert evaluated == ["baseline and E1 (delete one block)"]
  other = config.copy_and_resolve_references()
  other.lesion.draws = 2  # another study: nothing kept
  assert len(lesion.run_study(other, workdir)["random"]["error"][1]) == 2


def test_lesion_errors_name_the_problem(trained_tiny, tmp_path):
  config, workdir = trained_tiny
  with pytest.raises(FileNotFoundError, match=f"no trained checkpoint in workdir .*{tmp_path.name}"):
    lesion.run_study(config, str(tmp_path))
  with pytest.raises(ConfigMismatchError, match="model.depth"):
    lesion.run_study(tiny_config(**{"model.depth": 14}), workdir)
  with pytest.raises(ValueError, match="lesion.max_k=10 is larger than the number of blocks"):
    lesion.run_study(tiny_config(**{"model.depth": 20, "lesion.max_k": 10}), workdir)


class _AsStream:
  """The tiny test split served as a stream, a batch at a time (as ImageNet validation is)."""

  def __init__(self, dataset):
    self.dataset = dataset
    self.mean, self.std, self.input_shape = dataset.mean, dataset.std, dataset.input_shape

  def eval_batches(self, batch_size, max_images, mesh, split=False):
    return eval_batches.Streamed(lambda: self.dataset.test_batches(batch_size, max_images),
                                 mesh, batch_size, split)


@pytest.mark.parametrize("variant_weights", ["shared", "per_variant", "prefix"])
def test_one_engine_over_resident_and_streamed_batches(trained_tiny, variant_weights):
  """The same test images as one stack on the device or as a stream of batches: each form
  gives every variant the same error (counts add up exactly), on all images or a cap that
  cuts a batch."""
  t, _, _, make = _tiny_engine(trained_tiny)
  rng = np.random.default_rng(5)
  gates = np.concatenate([np.ones((1, 9), np.float32), lesion.single_deletion_gates(t.layout),
                          lesion.random_deletion_gates(rng, t.layout, 3, 4)])
  orders = lesion.random_swap_orders(rng, t.layout, 1, 4)
  for cap in (0, 37):
    resident = make(variant_weights=variant_weights, max_images=cap)
    streamed = make(_AsStream(t.dataset), variant_weights=variant_weights, max_images=cap)
    assert isinstance(resident.batches, eval_batches.Resident)
    np.testing.assert_array_equal(streamed.evaluate(gates), resident.evaluate(gates))
    np.testing.assert_array_equal(streamed.evaluate(orders=orders),
                                  resident.evaluate(orders=orders))
    assert streamed.images == resident.images == (cap or len(t.dataset.test_labels))


def test_a_pass_without_images_is_an_error(trained_tiny):
  t, _, _, make = _tiny_engine(trained_tiny)
  empty = _AsStream(t.dataset)
  empty.eval_batches = lambda *a, **k: eval_batches.Streamed(lambda: iter(()), make_mesh(), 4)
  with pytest.raises(ValueError, match="the test pass held no batches"):
    make(empty, variant_weights="shared").evaluate(np.ones((1, 9), np.float32))
