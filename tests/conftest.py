"""Shared fixtures: tiny configs that train in seconds on a 2-core CPU."""

import os
import sys

import pytest

# Tests are compile-bound (tiny models, few steps): XLA's CPU backend at optimisation level 0
# compiles them ~4x faster. Tests that run for long (the quickstart) unset it in their
# subprocess. Must be set before jax is imported.
FAST_COMPILE = "--xla_backend_optimization_level=0"
os.environ.setdefault("XLA_FLAGS", FAST_COMPILE)
# The suite's bounds (float32 to 1e-5 and tighter, one compilation per program, the forms the
# CPU picks) are the CPU's, where every test is meant to run: on a GPU host the tests run on
# its CPU too (a GPU's TF32 convolutions alone would miss those bounds). JAX_PLATFORMS set
# by hand overrides this.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def offline_data(*parts: str) -> tuple[str | None, str]:
  """(path, "") of a file or folder in the offline data folder ``$RESNET_ENSEMBLE_DATA``
  (README "Data": never committed), or (None, one line naming the variable and what is
  missing) to skip with where it is not there."""
  from resnet_ensemble import data
  folder, rel = data.data_folder(), "/".join(parts)
  if folder is None:
    return None, f"{data.DATA_ENV} is not set (the data folder that holds {rel})"
  path = os.path.join(folder, *parts)
  if not os.path.exists(path):
    return None, f"{data.DATA_ENV}={folder} holds no {rel}"
  return path, ""


def tiny_config(**overrides):
  """ResNet-8 (3 blocks) of width 4 on the embedded digits, float32, a few steps."""
  from resnet_ensemble.config import base_config, override
  c = base_config()
  c.model.depth = 8
  c.model.width = 4
  c.data.name = "digits"
  c.data.crop_padding = 1
  c.data.flip = True
  c.train.batch_size = 32
  c.train.num_steps = 6
  c.train.log_every = 2
  c.train.eval_every = 3
  c.train.progress_every_s = 0.0
  c.optim.warmup_steps = 2
  c.optim.boundaries = (4,)
  c.eval.batch_size = 120
  c.checkpoint.every = 3
  for key, value in overrides.items():
    override(c, key, value)
  return c


@pytest.fixture
def tiny():
  return tiny_config


# ----------------------------------------------------------------------------- shared helpers


def _resnets() -> dict:
  from resnet_ensemble import models
  return {
      "preact": models.ResNet(stage_sizes=(2, 2, 2), widths=(4, 8, 16)),
      "postact": models.ResNet(stage_sizes=(2, 2, 2), widths=(4, 8, 16), preact=False),
      "zero_pad": models.ResNet(stage_sizes=(2, 2, 2), widths=(4, 8, 16), shortcut="zero_pad"),
      "bottleneck": models.ResNet(stage_sizes=(2, 2), widths=(4, 8), block="bottleneck",
                                  stem="imagenet", stem_width=8),
  }


# Small ResNets of every block and shortcut kind, shared by the model and skip tests.
RESNETS = _resnets()


def run_train_probe(tmp_path, name: str, devices: int, *overrides: str, **extra_env):
  """Trains tiny_config in a fresh process on `devices` CPU devices (tests/_train_probe.py);
  returns its final metrics and its state's leaves, so runs on other device counts compare."""
  import json
  import subprocess

  import numpy as np
  env = dict(os.environ, JAX_PLATFORMS="cpu", **extra_env, XLA_FLAGS=(
      f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}"))
  out = tmp_path / f"{name}.npz"
  proc = subprocess.run([sys.executable, os.path.join(REPO, "tests", "_train_probe.py"),
                         str(tmp_path / name), str(out), *overrides],
                        env=env, capture_output=True, text=True, cwd=REPO, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1]), dict(np.load(out))


def saved_params(workdir):
  """The latest checkpoint's step and leaves: what a resumed run must match."""
  import jax

  from resnet_ensemble import checkpoint
  state = checkpoint.restore_latest(checkpoint.make_manager(str(workdir)), None)
  return state["step"], jax.tree.leaves(state)


class Payload:
  """Stands in for arbitrary pickled code."""

  def __init__(self):
    self.x = 1


def write_tokenizer(path, vocab_size: int = 100) -> None:
  """A tiny BPE tokenizer.json, so an imported folder can carry its own tokenizer."""
  import tokenizers
  tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="[UNK]"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  trainer = tokenizers.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["[UNK]"])
  tok.train_from_iterator(["residual networks behave like ensembles of shallow networks"] * 4,
                          trainer)
  tok.save(str(path))


def reference_measures(model, variables, w, gates, order=None) -> dict:
  """One variant at a time, in numpy: mean loss, top-1 accuracy, KL(intact || variant)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  tokens, targets = jnp.asarray(w[:, :-1]), w[:, 1:]
  logp = np.asarray(jax.nn.log_softmax(model.apply(variables, tokens, gates=gates, order=order)))
  intact = np.asarray(jax.nn.log_softmax(model.apply(variables, tokens)))
  nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
  kl = (np.exp(intact) * (intact - logp)).sum(-1)
  return {"loss": nll.mean(), "top1": (logp.argmax(-1) == targets).mean(), "kl": kl.mean()}


LM_WINDOW, LM_LAYERS = 16, 3


def lm_tiny_config(text_path, **over):
  """A tiny transformer study (3 layers, width 16, windows of 16 bytes) of ``text_path``;
  ``over``: dotted field -> value."""
  from resnet_ensemble import lm_config
  c = lm_config.base_config()
  c.data.text = str(text_path)
  c.data.window = LM_WINDOW
  c.model.n_layers, c.model.d_model, c.model.d_ff = LM_LAYERS, 16, 32
  c.model.max_positions = LM_WINDOW
  c.lesion.max_k, c.lesion.draws = 2, 2
  c.lesion.reorder_max_swaps, c.lesion.reorder_draws, c.lesion.shuffles = 2, 2, 1
  c.lesion.chunk = 4
  c.paths.samples_per_k, c.paths.batch_size, c.paths.chunk = 2, 4, 6
  for k, v in over.items():
    node = c
    *path, leaf = k.split(".")
    for p in path:
      node = node[p]
    node[leaf] = v
  return c


def lm_cli(*args, timeout=600):
  """``python -m resnet_ensemble.lm ARGS`` in the repository, on the CPU."""
  import subprocess
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  return subprocess.run([sys.executable, "-m", "resnet_ensemble.lm", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)
