"""Pretrained weights through the CLI flow on TFDS mock imagenet2012 (issue 8): --mode=all runs
E1, E3, E4, E6/E7 and the report with no training, the lesions evaluated over a stream of
validation batches; the streamed errors equal a direct evaluation of the same images."""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from safetensors import numpy as safetensors_numpy

from resnet_ensemble import (eval_batches, evaluate, imagenet, lesion, lesion_engine, pretrained,
                             restore)
from resnet_ensemble.sharding import make_mesh
from resnet_ensemble.surgery import permute_blocks

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCH, WIDTH, SIZE, BATCH = "resnet18", 4, 32, 4  # 8 blocks, downsampling 2, 4, 6
IMAGES, CAP, RIGHT = 10, 9, 6  # mock validation images; the analyses see 9, 6 classified right


# The tiny run's overrides: few draws, 9 of 10 images (3 batches, the last one part-masked).
OVERRIDES = {"arch": ARCH, "model.width": WIDTH, "data.image_size": SIZE,
             "eval.batch_size": BATCH, "eval.max_images": CAP, "lesion.max_k": 2,
             "lesion.draws": 2, "lesion.reorder_max_swaps": 1, "lesion.reorder_draws": 2,
             "lesion.chunk": 8, "paths.samples_per_k": 2, "paths.batch_size": BATCH,
             "paths.chunk": 6}

# The command line, with TFDS's mock imagenet2012 patched in (it cannot be from outside).
MOCKED_CLI = """
import sys
import tensorflow_datasets as tfds
from resnet_ensemble import __main__ as cli, imagenet
real, examples = imagenet.make_split, int(sys.argv.pop(1))

def mocked(*args, **kwargs):
  with tfds.testing.mock_data(num_examples=examples):
    return real(*args, **kwargs)

imagenet.make_split = mocked
cli.run()
"""


def run_cli(*args, examples=IMAGES):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-c", MOCKED_CLI, str(examples),
                         "--config=configs/imagenet_pretrained.py", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)


def pretrained_config(**overrides):
  spec = importlib.util.spec_from_file_location(
      "imagenet_pretrained", os.path.join(REPO, "configs", "imagenet_pretrained.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  for key, value in {**OVERRIDES, **overrides}.items():
    node = c
    *path, leaf = key.split(".")
    for p in path:
      node = node[p]
    node[leaf] = value
  return c


def _mock(make_split):
  def mocked(*args, **kwargs):  # mock only the dataset construction (see test_imagenet.py)
    with tfds.testing.mock_data(num_examples=IMAGES):
      return make_split(*args, **kwargs)
  return mocked


def _first_images():
  """The first CAP validation images and labels, read apart from the analyses' stream."""
  batches = list(imagenet.make_split("validation", batch_size=BATCH, train=False,
                                     image_size=SIZE))
  images, labels = (np.concatenate([b[i] for b in batches])[:CAP] for i in (0, 1))
  return images, labels


def _variables(model, images, labels):
  """Random weights with a head solved so that exactly the first RIGHT images are classified
  right by the intact network: errors are neither all 0 nor all 1, and lesions change them."""
  v = jax.tree.map(np.asarray, model.init(jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3))))
  dim = v["params"]["head"]["kernel"].shape[0]
  v["params"]["head"]["kernel"] = np.eye(dim, model.num_classes, dtype=np.float32)
  x = (images - np.asarray(imagenet.IMAGENET_MEAN)) / np.asarray(imagenet.IMAGENET_STD)
  features = np.asarray(model.apply(v, jnp.asarray(x, jnp.float32)))[:, :dim]  # pooled
  assert len(set(labels[:RIGHT].tolist())) == RIGHT, "mock labels repeat: pick other images"
  solve = np.linalg.pinv(features.astype(np.float64))  # features @ solve = identity (rank CAP)
  kernel = np.zeros((dim, model.num_classes), np.float32)
  for i in range(RIGHT):
    kernel[:, labels[i]] = 10.0 * solve[:, i]
  v["params"]["head"]["kernel"] = kernel
  return v


@pytest.fixture(scope="module")
def net(tmp_path_factory):
  """The tiny network, its weights as a safetensors file, the images it is evaluated on, and
  ``direct(variables, gates)``: their error as one resident batch (no stream)."""
  root = tmp_path_factory.mktemp("pretrained")
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(imagenet, "make_split", _mock(imagenet.make_split))
    images, labels = _first_images()
  model = pretrained.model_for(ARCH, width=WIDTH)
  variables = _variables(model, images, labels)
  weights = str(root / f"{ARCH}.safetensors")
  safetensors_numpy.save_file(pretrained.to_state_dict(ARCH, variables, width=WIDTH), weights)
  eval_fn = jax.jit(evaluate.make_eval_fn(model, imagenet.IMAGENET_MEAN, imagenet.IMAGENET_STD))
  one_batch = (images[None], labels[None], np.ones((1, CAP), np.float32))
  direct = lambda v, gates: float(eval_fn(v, *one_batch, gates)["error"])  # noqa: E731
  return dict(model=model, variables=variables, weights=weights, root=root, direct=direct,
              config=pretrained_config(weights=weights))


def test_mode_all_runs_every_analysis_on_the_streamed_images_without_training(net):
  """One test (one CLI run, on one xdist worker): the files, then the streamed errors against
  a direct evaluation of the same network on the same 9 images."""
  workdir = str(net["root"] / "w")
  proc = run_cli(f"--config.weights={net['weights']}", f"--workdir={workdir}", "--mode=all",
                 *(f"--config.{k}={v}" for k, v in OVERRIDES.items()))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "== all: lesion (1/2)" in proc.stdout  # lesion and routing only: no training step
  assert not os.path.exists(os.path.join(workdir, "checkpoints"))
  out = json.load(open(os.path.join(workdir, "lesion.json")))
  assert out["checkpoint_step"] == 0 and out["test_images"] == CAP
  assert out["layout"]["n_blocks"] == 8 and out["layout"]["downsampling"] == [2, 4, 6]
  assert len(out["single"]["error"]) == 8  # E1: every block
  assert out["random"]["k"] == [0, 1, 2] and np.shape(out["random"]["error"]) == (3, 2)
  assert out["random_no_downsampling"]["exclude_downsampling"] is True
  assert np.shape(out["reorder"]["error"]) == (1, 2)  # E4
  assert "imagenet2012 validation" in out["data_source"]
  pj = json.load(open(os.path.join(workdir, "gradients.json")))
  assert pj["n"] == 8 and pj["batches_from"] == "validation"
  assert len(pj["gradient"]["mean_norm"]) == 9 and np.all(np.isfinite(pj["gradient"]["mean_norm"]))
  md = open(os.path.join(workdir, "report.md")).read()
  assert os.path.getsize(os.path.join(workdir, "fig4_imagenet_single_block_deletion.png")) > 1000
  assert "resnet18 (pretrained)" in md and "downsampling blocks 3, 5, 7" in md
  assert "| ImageNet top-1 validation error | 33.33 %" in md
  missing = md.split("## Missing experiments")[1]
  assert "VGG" not in missing and "training results" not in missing

  direct = lambda gates: net["direct"](net["variables"], gates)  # noqa: E731
  assert out["baseline"]["error"] == pytest.approx(1 - RIGHT / CAP, abs=1e-6)
  assert out["baseline"]["error"] == pytest.approx(direct(np.ones(8, np.float32)), abs=1e-6)
  for gates, error in zip(lesion.single_deletion_gates(net["model"].layout),
                          out["single"]["error"]):
    assert error == pytest.approx(direct(gates), abs=1e-6)
  assert len({round(e, 6) for e in out["single"]["error"] + [out["baseline"]["error"]]}) > 1


@pytest.mark.parametrize("variant_weights", ["per_variant", "prefix"])
def test_streamed_engine_reorders_and_compiles_once(net, monkeypatch, tmp_path, variant_weights):
  """Each form over the validation stream: every variant's error that of a direct evaluation,
  the images counted from the stream, one program for both chunks."""
  monkeypatch.setattr(imagenet, "make_split", _mock(imagenet.make_split))
  config = pretrained_config(weights=net["weights"],
                             **{"lesion.variant_weights": variant_weights})
  t = restore.load_trained(config, str(tmp_path))
  engine = lesion_engine.make_engine(config, t, make_mesh())
  assert isinstance(engine.batches, eval_batches.Streamed) and engine.chunk == 8
  assert engine.form.name == variant_weights
  rng = np.random.default_rng(0)
  orders = lesion.random_swap_orders(rng, t.layout, 1, 10)  # one swap: never the trained order
  gates = lesion.random_deletion_gates(rng, t.layout, 1, 10)
  errors = engine.evaluate(gates, orders)
  for g, order, error in zip(gates, orders, errors):
    permuted = permute_blocks(net["variables"], t.layout, order)
    assert error == pytest.approx(net["direct"](permuted, g), abs=1e-6)
  assert engine.images == CAP
  if variant_weights == "prefix":
    assert engine.form.fn_prefix._cache_size() == 1  # two chunks, one program
  else:
    assert engine.form.fn._cache_size() == 1 and engine.form.fn_gated._cache_size() == 0


def test_cap_keeps_the_first_images_in_global_batch_order(monkeypatch):
  """Process 1 of 2 holds positions 2-3 of every global batch of 4: a cap of 7 keeps its 2, 3
  and 6, masks 7 (and padding), and stops reading before the batch starting at 8."""
  monkeypatch.setattr(imagenet.jax, "process_count", lambda: 2)
  monkeypatch.setattr(imagenet.jax, "process_index", lambda: 1)
  stream = [(np.full((2, 1), b), np.arange(2), np.array([1.0, 1.0 if b < 2 else 0.0]))
            for b in range(3)]  # this process's shares; its last image is padding
  kept = list(imagenet.capped(iter(stream), batch_size=4, max_images=7))
  assert [m.tolist() for _, _, m in kept] == [[1, 1], [1, 0]]
  assert list(imagenet.capped(iter(stream), 4, 12))[2][2].tolist() == [1, 0]  # padding stays 0


@pytest.mark.parametrize("flags, message", [
    (["--config.weights={missing}", "--mode=all"], "weights file not found: {missing}"),
    (["--config.weights={missing}", "--mode=train"], "not trained here: use --mode=all"),
    (["--mode=all"], "set --config.weights=PATH"),
])
def test_bad_input_is_a_clear_error(tmp_path, flags, message):
  missing = str(tmp_path / "nowhere" / "resnet50.safetensors")
  proc = run_cli(*(f.format(missing=missing) for f in flags), f"--workdir={tmp_path / 'w'}")
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert message.format(missing=missing) in proc.stderr
  assert "Traceback" not in proc.stderr
  assert not (tmp_path / "w" / "checkpoints").exists()  # nothing was trained
