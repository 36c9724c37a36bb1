"""The transformer experiments timed per experiment, through ``lm_study``'s programs: E1 (each
branch and each layer deleted), E3 (k = 0..lesion.max_k random branches, lesion.draws each),
E4 (adjacent swaps and 1..lesion.reorder_max_swaps random swaps), the painters variants (L + 1
positions) and E6 (routed path gradients at the embedding output).

Each experiment is measured next to the plain forward of the same model on the same windows,
timed in the same process just before it (an ``lm_forward`` row): every row carries
``x_forward``, its seconds per variant over the forward's seconds (1.0: a variant costs one
plain forward pass; for E6, per path, each path routed over ``paths.batch_size`` windows,
against the forward of as many windows). Timing needs no trained model: a seeded random one
of the config's size (or ``--config.weights``) on random byte windows.

    # CPU smoke check (tiny):
    python bench/lm_suite.py --config=configs/lm_bytes.py --num_windows=8 \
        --config.lesion.draws=2 --config.paths.samples_per_k=2
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

import common
from resnet_ensemble import lm_study, lm_variants, path_gradients, transformer_import

config_flags.DEFINE_config_file("config", None, "Config file (configs/lm_*.py).",
                                lock_config=True)
SUITE = ("E1", "E3", "E4", "painters", "E6")
flags.DEFINE_list("experiments", list(SUITE), "Which experiments to time.")
flags.DEFINE_integer("num_windows", 64, "Random byte windows of data.window tokens.")
flags.DEFINE_integer("calls", 2, "Timed calls per measurement (the fastest counts).")
FLAGS = flags.FLAGS


def subject(c) -> lm_study.Subject:
  rng = np.random.default_rng(0)
  if c.weights:
    imported = transformer_import.load(c.weights, tokenizer=False)
    model, variables, source = imported.model, imported.variables, imported.folder
  else:
    model, variables, source = lm_study.fresh_model(c), None, "random_init"
  windows = rng.integers(0, min(model.vocab_size, 256), (FLAGS.num_windows, c.data.window + 1))
  windows = windows.astype(np.int32)
  if variables is None:
    variables = jax.jit(model.init)(jax.random.key(c.seed), jnp.asarray(windows[:1, :-1]))
  return lm_study.Subject(model, variables, windows, source, "bytes")


def variants(name: str, c, n_layers: int, rng) -> tuple[np.ndarray, np.ndarray | None]:
  """(gates, orders) of one lesion experiment, as ``lm_study.run_lesion`` builds them."""
  lc, n = c.lesion, 2 * n_layers
  if name == "E1":
    return np.concatenate([np.ones((1, n), np.float32),
                           lm_variants.single_branch_gates(n_layers),
                           lm_variants.single_layer_gates(n_layers)]), None
  if name == "E3":
    return np.concatenate([lm_variants.random_deletion_gates(rng, n_layers, k, lc.draws)
                           for k in range(min(lc.max_k, n) + 1)]), None
  if name == "E4":
    orders = np.concatenate([lm_variants.adjacent_swap_orders(n_layers)] + [
        lm_variants.random_swap_orders(rng, n_layers, k, lc.reorder_draws)
        for k in range(1, lc.reorder_max_swaps + 1)])
    return np.ones((len(orders), n), np.float32), orders
  if name == "painters":
    p = lm_variants.painters(rng, n_layers, lc.shuffles)
    return p.gates, p.orders
  raise ValueError(f"unknown experiment {name!r}; valid: {', '.join(SUITE)}")


def forward_row(forward, base: dict, before: str) -> float:
  """Times the plain forward over every window and emits its row; returns its seconds."""
  seconds = common.best_call_s(forward, FLAGS.calls)
  common.emit({"workload": "lm_forward", **base, "before": before, "calls": FLAGS.calls,
               "seconds": round(seconds, 5),
               "ms_per_window": round(seconds / FLAGS.num_windows * 1e3, 4)},
              human=f"plain forward (before {before}): {seconds * 1e3:.2f} ms for "
                    f"{FLAGS.num_windows} windows")
  return seconds


def main(_):
  c = FLAGS.config
  s = subject(c)
  n_layers = s.layout.n_layers
  ev = lm_study.Evaluator(s, c.eval.batch_size, c.lesion.chunk)
  model = s.model

  def plain(variables, batches):
    def step(total, w):
      logits = model.apply(variables, w[:, :-1])
      logp = jax.nn.log_softmax(logits, axis=-1)
      return total - jnp.take_along_axis(logp, w[:, 1:, None], -1).sum(), None
    return jax.lax.scan(step, jnp.zeros(()), batches)[0]

  plain_jit = jax.jit(plain)
  forward = lambda: plain_jit(s.variables, ev.batches)  # noqa: E731
  common.progress("compiling the plain forward")
  jax.block_until_ready(forward())
  base = {**common.jax_info(), "config": common.config_name(),
          "model": f"{model.norm}-{n_layers}x{model.d_model}", "n_branches": 2 * n_layers,
          "windows": FLAGS.num_windows, "window": c.data.window, "batch": c.eval.batch_size,
          "chunk": c.lesion.chunk, "variables": s.source}
  rng = np.random.default_rng(c.seed)
  for name in FLAGS.experiments:
    if name == "E6":
      continue
    gates, orders = variants(name, c, n_layers, rng)
    t0 = time.perf_counter()
    ev(gates, orders)  # compiles (one program per experiment), then runs once
    first_s = time.perf_counter() - t0
    forward_s = forward_row(forward, base, name)
    seconds = common.best_call_s(lambda: ev(gates, orders)["loss"], FLAGS.calls)
    count = len(gates)
    ratio = seconds / count / forward_s
    common.emit({"workload": f"lm_{name}", **base, "variants": count,
                 "seconds": round(seconds, 4), "compile_s": round(max(first_s - seconds, 1e-3), 3),
                 "variants_per_s": round(count / seconds, 2),
                 "forward_s": round(forward_s, 5), "x_forward": round(ratio, 3)},
                human=f"lm {name}: {count} variants in {seconds:.3f} s "
                      f"({ratio:.2f}x a plain forward per variant)")
  if "E6" in FLAGS.experiments:
    pc, n = c.paths, 2 * n_layers
    selections, _ = path_gradients.shuffled_pairs(rng, n, pc.samples_per_k)
    chunk = max(1, -(-pc.chunk // 2))
    fn = lm_study.make_gradient_fn(model)
    w = jnp.asarray(s.windows[np.arange(pc.batch_size) % len(s.windows)])
    calls = [jnp.asarray(np.concatenate([selections[i:i + chunk], np.zeros(
        (chunk - len(selections[i:i + chunk]), n), np.float32)]))
             for i in range(0, len(selections), chunk)]

    def e6():
      return [fn(s.variables, w, sel).value for sel in calls]

    t0 = time.perf_counter()
    jax.block_until_ready(e6())
    first_s = time.perf_counter() - t0
    forward_s = forward_row(forward, base, "E6")
    seconds = common.best_call_s(e6, FLAGS.calls)
    paths = 2 * len(selections)
    per_window = forward_s / FLAGS.num_windows
    ratio = seconds / (paths * pc.batch_size) / per_window
    common.emit({"workload": "lm_E6", **base, "paths": paths, "paths_batch": pc.batch_size,
                 "seconds": round(seconds, 4), "compile_s": round(max(first_s - seconds, 1e-3), 3),
                 "paths_per_s": round(paths / seconds, 2),
                 "forward_s": round(forward_s, 5), "x_forward": round(ratio, 3)},
                human=f"lm E6: {paths} routed paths in {seconds:.3f} s ({ratio:.2f}x a plain "
                      f"forward per path and window)")


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
