"""E6 routed path gradients timed as ``path_gradients.run_study`` runs them: one shared forward per
chunk of paths (a new batch of training images each), the routed backward passes vmapped.

Timing does not need a trained net: random-init variables (or ``--variables``) and synthetic
images. One JSON line (see common.py); with ``--time_cap_s`` the rest is projected (every
chunk costs the same: path length only changes which branch a cotangent takes). The row also
carries the cost of one plain forward + backward of the same network on the same batch
(the loss's gradient with respect to the input images, inference-mode BatchNorm: the backward
E6 routes, no weight gradients), timed in the same process, and ``x_fwd_bwd``: seconds per routed path over that (1.0: a path costs one
forward + backward pass):

    # CPU smoke check (tiny):
    python bench/path_sampling.py --config=configs/quickstart.py --config.paths.samples_per_k=4 \
        --config.paths.chunk=12 --config.paths.batch_size=16
    # GPU: ResNet-110, bf16, 55 lengths x 1,000 paths at batch 128 (capped at 20 s, projected)
    python bench/path_sampling.py --config=configs/cifar10_resnet110.py \
        --config.model.dtype=bfloat16 --config.model.unroll=0 --time_cap_s=20
"""

import math
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

import common
from resnet_ensemble import augment, gates as gates_lib, models, path_gradients
from resnet_ensemble.evaluate import cross_entropy
from resnet_ensemble.sharding import make_mesh, put, put_tree, replicated, sharded

config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
flags.DEFINE_integer("num_examples", 50_000, "Synthetic training set size (batches drawn from it).")
flags.DEFINE_string("variables", "", "An exported variables.msgpack (default: random init).")
flags.DEFINE_bool("paired", True, "Route complementary pairs, as run_study does; --nopaired "
                  "times one path per routed backward (workload paths_E6[unpaired]).")
flags.DEFINE_integer("fwd_bwd_calls", 3, "Timed plain forward + backward passes (the fastest "
                     "is the ratio's denominator).")
flags.DEFINE_string("variant", "", "A setting under trial (e.g. a larger paths.chunk): the "
                    "row's workload becomes 'paths_E6[VARIANT]', listed apart in the table.")
FLAGS = flags.FLAGS


def fwd_bwd_seconds(model, variables, dataset, batch: int, gates) -> float:
  """The fastest of ``--fwd_bwd_calls`` plain forward + backward passes over one batch of
  ``batch`` training images (compiled first, not timed). The gradient is the input's, as in
  E6: on the CPU, XLA's weight-gradient convolutions are many times slower than the forward
  and would make any path look cheap."""
  def loss(variables, x, y):
    logits = model.apply(variables, x, gates=gates)
    return cross_entropy(logits, y).mean()

  grad = jax.jit(jax.grad(loss, argnums=1))
  x = augment.normalize(dataset.train_images[:batch], dataset.mean, dataset.std)
  y = dataset.train_labels[:batch]
  call = lambda: grad(variables, x, y)  # noqa: E731
  jax.block_until_ready(call())
  return common.best_call_s(call, FLAGS.fwd_bwd_calls)


def main(_):
  c = FLAGS.config
  pc = c.paths
  mesh = make_mesh()
  dataset = common.synthetic(c, FLAGS.num_examples, 1)
  model = models.build(c.model, dataset.num_classes)
  layout, n = model.layout, model.layout.n_blocks
  variables, source = common.model_variables(model, c, dataset.train_images.shape[1:],
                                             FLAGS.variables)
  per_row = 2 if FLAGS.paired else 1  # paths routed per selection row
  chunk = mesh.size * math.ceil(pc.chunk / per_row / mesh.size)  # rows per call
  rng = np.random.default_rng(c.seed)
  if FLAGS.paired:
    selections, _ = path_gradients.paired_selections(rng, n, pc.samples_per_k)
  else:
    selections = np.concatenate([path_gradients.sample_selections(rng, n, k, pc.samples_per_k)
                                 for k in range(n + 1)])
  rows = len(selections)
  total = (n + 1) * pc.samples_per_k  # paths the study reports
  mean, std = dataset.mean, dataset.std
  fn = path_gradients.make_path_gradient_fn(lambda v: models.unroll(model, v),
                                     scales=gates_lib.eval_gates(c.gates, layout),
                                     paired=FLAGS.paired)
  rep, split = replicated(mesh), sharded(mesh)
  jitted = jax.jit(lambda v, x, y, s: fn(v, augment.normalize(x, mean, std), y, s),
                   in_shardings=(rep, rep, rep, split), out_shardings=(rep, rep))
  variables = put_tree(variables, rep)
  n_train = len(dataset.train_labels)

  def args(c_: int, start: int):
    """Chunk c_'s batch and paths, from the host as run_study puts them."""
    idx = np.random.default_rng([c.seed, c_]).choice(n_train, pc.batch_size, replace=False)
    sel = selections[start:start + chunk]
    sel = np.concatenate([sel, np.zeros((chunk - len(sel), n), np.float32)])
    return (variables, put(dataset.train_images[idx], rep), put(dataset.train_labels[idx], rep),
            put(sel, split))

  common.progress("compiling")
  t0 = time.perf_counter()
  compiled = jitted.lower(*args(0, 0)).compile()
  compile_s = time.perf_counter() - t0
  common.progress(f"compiled in {compile_s:.1f} s")
  jax.block_until_ready(compiled(*args(0, 0)))  # warm-up
  done, t0 = 0, time.perf_counter()
  dispatched = ((start, compiled(*args(c_, start)))
                for c_, start in enumerate(range(0, rows, chunk)))
  for start, (y0, image) in path_gradients.one_ahead(dispatched):  # as run_study: one chunk ahead
    jax.device_get((y0, image))  # run_study reads every chunk back
    done = min(start + chunk, rows)
    if FLAGS.time_cap_s and time.perf_counter() - t0 >= FLAGS.time_cap_s:
      break
  seconds = time.perf_counter() - t0
  fwd_bwd_s = fwd_bwd_seconds(model, variables, dataset, pc.batch_size,
                              gates_lib.eval_gates(c.gates, layout))
  complete = done == rows
  rate = done * per_row / seconds  # paths routed per second
  full_s = seconds if complete else rows * per_row / rate
  done = total if complete else done * per_row
  tags = [t for t in (FLAGS.variant, "" if FLAGS.paired else "unpaired") if t]
  workload = "paths_E6" + (f"[{','.join(tags)}]" if tags else "")
  common.emit({
      "workload": workload, **common.jax_info(), "paired": FLAGS.paired, "config": common.config_name(),
      "model": f"{c.model.name}-{c.model.depth}", "width": c.model.width, "n_blocks": n,
      "dtype": c.model.dtype, "unroll": c.model.unroll, "batch": pc.batch_size, "chunk": chunk,
      "lengths": n + 1, "samples_per_k": pc.samples_per_k, "paths": total, "paths_done": done,
      "complete": complete, "seconds": round(seconds, 3), "projected_s": round(full_s, 2),
      "paths_per_s": round(rate, 1), "compile_s": round(compile_s, 2), "variables": source,
      "fwd_bwd_ms": round(fwd_bwd_s * 1e3, 3), "x_fwd_bwd": round(1 / rate / fwd_bwd_s, 3)},
      human=f"E6 {n + 1} lengths x {pc.samples_per_k} paths, batch {pc.batch_size}, chunk "
            f"{chunk}{' pairs' if FLAGS.paired else ''}: {'' if complete else '~'}{full_s:.1f} s "
            f"({rate:,.0f} paths/s{'' if complete else f', projected from {done}'}; "
            f"compile {compile_s:.1f} s; {1 / rate / fwd_bwd_s:.2f}x a plain forward + "
            f"backward of {fwd_bwd_s * 1e3:.1f} ms per path)")
  common.profile(lambda: compiled(*args(0, 0)), {"workload": workload,
                                                 "batch": pc.batch_size, "chunk": chunk})


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
