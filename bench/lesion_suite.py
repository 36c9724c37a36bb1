"""The lesion suite timed per experiment, through ``lesion.LesionEngine`` (one compiled
program, chunks of variants vmapped over the resident test set).

E1 deletes each block once, E3 deletes k = 0..lesion.max_k random blocks (lesion.draws each),
E4 reorders by 1..lesion.reorder_max_swaps swaps (lesion.reorder_draws each): the issue's
suite. Timing does not need a trained net: random-init variables (or ``--variables``) and
synthetic test images. One JSON line per experiment, and one for the whole suite:

    # CPU smoke check (tiny):
    python bench/lesion_suite.py --config=configs/quickstart.py --num_images=100 \
        --config.eval.batch_size=50 --chunk=4 --config.lesion.draws=2 --config.lesion.max_k=2 \
        --config.lesion.reorder_max_swaps=2 --config.lesion.reorder_draws=2
    # GPU: ResNet-110, bf16, 10k images, chunk 64; E3/E4 capped at ~12 s each and projected
    python bench/lesion_suite.py --config=configs/cifar10_resnet110.py \
        --config.model.dtype=bfloat16 --config.model.unroll=0 --chunk=64 --time_cap_s=12
"""

import contextlib
import io
import time

import numpy as np
from absl import app, flags
from ml_collections import config_flags

import common
from resnet_ensemble import gates as gates_lib, lesion, models, train, trained
from resnet_ensemble.sharding import make_mesh

config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
flags.DEFINE_list("experiments", ["E1", "E3", "E4"], "Which experiments to time.")
flags.DEFINE_integer("chunk", 0, "Variants per compiled call (0: the config's lesion.chunk).")
flags.DEFINE_integer("num_images", 10_000, "Synthetic test images.")
flags.DEFINE_integer("slice_chunks", 2, "Chunks per engine call between time-cap checks.")
flags.DEFINE_string("variables", "", "An exported variables.msgpack (default: random init).")
FLAGS = flags.FLAGS


def variants(name: str, layout, lc, rng) -> tuple[np.ndarray | None, np.ndarray | None]:
  """(gates, orders) of one experiment, as ``lesion.run_study`` builds them."""
  n = layout.n_blocks
  if name == "E1":
    return lesion.single_deletion_gates(layout), None
  if name == "E3":
    ks = range(min(lc.max_k, n) + 1)
    return np.concatenate([lesion.random_deletion_gates(rng, layout, k, lc.draws) for k in ks]), None
  if name == "E4":
    ks = range(1, lc.reorder_max_swaps + 1)
    return None, np.concatenate([lesion.random_swap_orders(rng, layout, k, lc.reorder_draws)
                                 for k in ks])
  raise ValueError(f"unknown experiment {name!r}; valid: E1, E3, E4")


def evaluate(engine, gates, orders) -> None:
  """One engine call, its progress line swallowed (the bench prints its own)."""
  with contextlib.redirect_stdout(io.StringIO()):
    engine.evaluate(gates, orders)


def time_experiment(engine, gates, orders, cap_s: float) -> tuple[int, float]:
  """Evaluates the variants (in one call, or with a cap in slices until past ``cap_s``);
  returns (variants, seconds). A capped run takes the variants in a random order, so the
  timed share is a fair sample even if a variant's cost depends on where its damage is."""
  count = len(gates) if gates is not None else len(orders)
  step = count
  if cap_s:
    step = engine.chunk * max(FLAGS.slice_chunks, 1)
    perm = np.random.default_rng(0).permutation(count)
    gates = None if gates is None else gates[perm]
    orders = None if orders is None else orders[perm]
  done, t0 = 0, time.perf_counter()
  while done < count:
    stop = min(done + step, count)
    evaluate(engine, None if gates is None else gates[done:stop],
             None if orders is None else orders[done:stop])
    done = stop
    if cap_s and time.perf_counter() - t0 >= cap_s:
      break
  return done, time.perf_counter() - t0


def main(_):
  c = FLAGS.config
  lc = c.lesion
  mesh = make_mesh()
  dataset = common.synthetic(c, 1, FLAGS.num_images)
  model = models.build(c.model, dataset.num_classes)
  layout = model.layout
  variables, source = common.model_variables(model, c, dataset.test_images.shape[1:],
                                             FLAGS.variables)
  chunk = FLAGS.chunk or lc.chunk
  engine = lesion.LesionEngine(
      train.make_eval_fn(model, dataset.mean, dataset.std), layout, variables,
      *trained.padded_test_batches(dataset, c.eval.batch_size), mesh=mesh, chunk=chunk,
      base_gates=gates_lib.eval_gates(c.gates, layout))
  base = {**common.jax_info(), "config": common.config_name(),
          "model": f"{c.model.name}-{c.model.depth}", "width": c.model.width,
          "n_blocks": layout.n_blocks, "dtype": c.model.dtype, "unroll": c.model.unroll,
          "images": FLAGS.num_images, "batch": c.eval.batch_size, "chunk": engine.chunk,
          "variables": source}
  # Compile: the first E1 pass (compile + one run) minus a second, timed one.
  e1 = lesion.single_deletion_gates(layout)
  common.progress("compiling (the first E1 pass)")
  t0 = time.perf_counter()
  evaluate(engine, e1, None)
  first_s = time.perf_counter() - t0
  engine.known.clear()  # the engine reuses what it evaluated: forget, to run E1 again
  t0 = time.perf_counter()
  evaluate(engine, e1, None)
  compile_s = max(first_s - (time.perf_counter() - t0), 0.0)
  common.progress(f"compiled in {compile_s:.1f} s")
  engine.known.clear()
  rng = np.random.default_rng(c.seed)
  total_s, total_variants, complete = 0.0, 0, True
  for name in FLAGS.experiments:
    gates, orders = variants(name, layout, lc, rng)
    count = len(gates) if gates is not None else len(orders)
    cap = 0.0 if name == "E1" else FLAGS.time_cap_s  # E1 is one chunk: always whole
    done, seconds = time_experiment(engine, gates, orders, cap)
    rate = done / seconds
    full_s = seconds if done == count else count / rate
    total_s, total_variants = total_s + full_s, total_variants + count
    complete = complete and done == count
    common.emit({
        "workload": f"lesion_{name}", **base, "variants": count, "variants_done": done,
        "complete": done == count, "seconds": round(seconds, 3),
        "projected_s": round(full_s, 3), "variants_per_s": round(rate, 2),
        "img_per_s": round(rate * FLAGS.num_images), "compile_s": round(compile_s, 2)},
        human=f"lesion {name}: {count} variants {'in' if done == count else '~'} "
              f"{full_s:.2f} s ({rate:.1f} variants/s, {rate * FLAGS.num_images:,.0f} img/s"
              f"{'' if done == count else f', projected from {done}'})")
  common.emit({
      "workload": "lesion_suite", **base, "experiments": list(FLAGS.experiments),
      "variants": total_variants, "complete": complete, "projected_s": round(total_s, 2),
      "compile_s": round(compile_s, 2), "first_call_s": round(first_s, 2)},
      human=f"lesion suite {'+'.join(FLAGS.experiments)}: {total_variants} variants "
            f"{'in' if complete else '~'} {total_s:.1f} s (+ compile {compile_s:.1f} s)")

  def e1_again():
    engine.known.clear()
    evaluate(engine, e1, None)

  common.profile(e1_again, {"workload": "lesion_E1", "batch": c.eval.batch_size,
                            "chunk": engine.chunk})


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
