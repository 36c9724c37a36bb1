"""The lesion suite timed per experiment, through ``lesion_engine.LesionEngine`` (one compiled
program, chunks of variants vmapped over the resident test set).

E1 deletes each block once, E3 deletes k = 0..lesion.max_k random blocks (lesion.draws each),
E4 reorders by 1..lesion.reorder_max_swaps swaps (lesion.reorder_draws each): the issue's
suite, with the variants' weights shared, per variant, and the variants evaluated from the
intact network's shared prefix (``lesion.variant_weights``), side by side. Timing does not need
a trained net: random-init variables (or ``--variables``) and synthetic test images. One JSON
line per experiment, and one for the whole suite (when all three ran).

Each experiment is measured next to the plain forward of the same network on the same images,
timed in the same process just before it (a ``lesion_forward`` row): every row carries
``x_forward``, its cost per variant-image over the forward's cost per image, a number that
a noisy CPU and any GPU can compare (1.0: a variant costs one plain forward pass). The suite's
is its seconds over the forward-image seconds of all its variants.

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
from typing import Callable

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

import common
from resnet_ensemble import gates as gates_lib, lesion, lesion_engine, models
from resnet_ensemble.evaluate import make_eval_fn
from resnet_ensemble.sharding import make_mesh, put_tree, replicated

config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
SUITE = ("E1", "E3", "E4")
flags.DEFINE_list("experiments", list(SUITE), "Which experiments to time (the lesion_suite row "
                  "needs all three).")
flags.DEFINE_integer("chunk", 0, "Variants per compiled call (0: the config's lesion.chunk).")
flags.DEFINE_integer("num_images", 10_000, "Synthetic test images.")
flags.DEFINE_integer("slice_chunks", 2, "Chunks per engine call between time-cap checks.")
flags.DEFINE_string("variables", "", "An exported variables.msgpack (default: random init).")
flags.DEFINE_list("variant_weights", ["per_variant", "shared", "prefix"], "Forms of the "
                  "variants' weights to time side by side (lesion.variant_weights; E4 with the "
                  "first of shared/per_variant, again with prefix: a program of its own).")
flags.DEFINE_integer("forward_calls", 3, "Timed plain forward passes before each form (the "
                     "fastest is the ratio's denominator).")
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


def forward_row(forward, base: dict, form: str, before: str) -> float:
  """Times the plain forward (``evaluate.make_eval_fn`` over the same test batches, the network
  intact) and emits its row; returns seconds per image."""
  seconds = common.best_call_s(forward, FLAGS.forward_calls)
  per_image = seconds / FLAGS.num_images
  common.emit({"workload": "lesion_forward", **base, "variant_weights": form, "before": before,
               "calls": FLAGS.forward_calls,
               "seconds": round(seconds, 4), "ms_per_img": round(per_image * 1e3, 4),
               "img_per_s": round(1 / per_image)},
              human=f"plain forward (before {before}, {form}): {per_image * 1e3:.3f} ms/img "
                    f"({1 / per_image:,.0f} img/s)")
  return per_image


def time_form(c, form: str, engine, base: dict, layout, experiments,
              forward: Callable) -> tuple[dict, dict]:
  """Rows for one form of the variants' weights (``lesion.variant_weights``): E1 (its first
  pass also compiles) and the capped E3/E4. Each program is warmed up before it is timed
  (E4, weights per variant, compiles a program of its own under "shared"). Returns
  {experiment: (variants, projected s, complete, forward s per image)} and the compile
  fields. ``forward()``: one plain forward pass, timed before each experiment (the load of a
  shared machine drifts within minutes): the denominator of the row's ``x_forward``."""
  lc = c.lesion
  base = {**base, "variant_weights": form}
  e1 = lesion.single_deletion_gates(layout)
  common.progress(f"{form}: compiling (the first E1 pass)")
  t0 = time.perf_counter()
  evaluate(engine, e1, None)
  first_s = time.perf_counter() - t0
  engine.known.clear()  # the engine reuses what it evaluated: forget, to run E1 again
  t0 = time.perf_counter()
  evaluate(engine, e1, None)
  compile_s = max(first_s - (time.perf_counter() - t0), 0.0)
  common.progress(f"{form}: compiled in {compile_s:.1f} s")
  rng = np.random.default_rng(c.seed)
  measured = {}
  for name in experiments:
    engine.known.clear()
    gates, orders = variants(name, layout, lc, rng)
    count = len(gates) if gates is not None else len(orders)
    if name == "E4" and form != "prefix":  # warm-up: one chunk of reorders, untimed
      evaluate(engine, None, orders[-engine.chunk:])
      engine.known.clear()
    forward_s = forward_row(forward, base, form, name)
    cap = 0.0 if name == "E1" else FLAGS.time_cap_s  # E1 is one chunk: always whole
    done, seconds = time_experiment(engine, gates, orders, cap)
    rate = done / seconds
    full_s = seconds if done == count else count / rate
    measured[name] = (count, full_s, done == count, forward_s)
    common.emit({
        "workload": f"lesion_{name}", **base, "variants": count, "variants_done": done,
        "complete": done == count, "seconds": round(seconds, 3),
        "projected_s": round(full_s, 3), "variants_per_s": round(rate, 2),
        "img_per_s": round(rate * FLAGS.num_images), "compile_s": round(compile_s, 2),
        "forward_ms_per_img": round(forward_s * 1e3, 4),
        "x_forward": round(1 / (rate * FLAGS.num_images) / forward_s, 3)},
        human=f"lesion {name} ({form}): {count} variants {'in' if done == count else '~'} "
              f"{full_s:.2f} s ({rate:.1f} variants/s, {rate * FLAGS.num_images:,.0f} img/s"
              f"{'' if done == count else f', projected from {done}'}; "
              f"{1 / (rate * FLAGS.num_images) / forward_s:.2f}x a plain forward per image)")
  return measured, {"compile_s": round(compile_s, 2), "first_call_s": round(first_s, 2)}


def main(_):
  c = FLAGS.config
  mesh = make_mesh()
  dataset = common.synthetic(c, 1, FLAGS.num_images)
  model = models.build(c.model, dataset.num_classes)
  layout = model.layout
  variables, source = common.model_variables(model, c, dataset.test_images.shape[1:],
                                             FLAGS.variables)
  chunk = FLAGS.chunk or c.lesion.chunk
  batches = dataset.padded_test(c.eval.batch_size)
  eval_fn = make_eval_fn(model, dataset.mean, dataset.std)
  base = {**common.jax_info(), "config": common.config_name(),
          "model": f"{c.model.name}-{c.model.depth}", "width": c.model.width,
          "n_blocks": layout.n_blocks, "dtype": c.model.dtype, "unroll": c.model.unroll,
          "images": FLAGS.num_images, "batch": c.eval.batch_size, "chunk": chunk,
          "variables": source}
  forms = [lesion_engine.resolve_variant_weights(f, variables) for f in FLAGS.variant_weights]
  forward = jax.jit(eval_fn)
  args = put_tree((variables, *batches), replicated(mesh))
  call = lambda: forward(*args)["error"]  # noqa: E731
  common.progress("compiling the plain forward")
  jax.block_until_ready(call())
  engine, shared_e4, timed_e4 = None, {}, False
  for form in dict.fromkeys(forms):
    engine = lesion_engine.build_engine(
        model, variables, dataset, mesh, batch_size=c.eval.batch_size, chunk=chunk,
        base_gates=gates_lib.eval_gates(c.gates, layout), variant_weights=form)
    # E4 runs the same program with shared and per-variant weights: timed with the first of
    # them, counted in each; the prefix form runs it in its own program.
    own_e4 = form == "prefix" or not timed_e4
    measured, compiled = time_form(c, form, engine, base, layout,
                                   [e for e in FLAGS.experiments if own_e4 or e != "E4"],
                                   call)
    if form != "prefix":
      timed_e4 = True
      shared_e4 = {k: v for k, v in measured.items() if k == "E4"} or shared_e4
      measured.update(shared_e4)
    if set(measured) != set(SUITE):  # a part of the suite is not the suite (table.py)
      continue
    total_s = sum(s for _, s, _, _ in measured.values())
    complete = all(done for _, _, done, _ in measured.values())
    variants_ = sum(n for n, _, _, _ in measured.values())
    forward_s = sum(n * f for n, _, _, f in measured.values()) / variants_  # per image
    common.emit({
        "workload": "lesion_suite", **base, "variant_weights": form,
        "experiments": list(measured), "variants": variants_, "complete": complete,
        "projected_s": round(total_s, 2), **compiled,
        "forward_ms_per_img": round(forward_s * 1e3, 4),
        "x_forward": round(total_s / (variants_ * FLAGS.num_images) / forward_s, 3)},
        human=f"lesion suite {'+'.join(measured)} ({form}): {variants_} variants "
              f"{'in' if complete else '~'} {total_s:.1f} s (+ compile "
              f"{compiled['compile_s']:.1f} s)")

  def e1_again():
    engine.known.clear()
    evaluate(engine, lesion.single_deletion_gates(layout), None)

  common.profile(e1_again, {"workload": "lesion_E1", "batch": c.eval.batch_size,
                            "chunk": engine.chunk, "variant_weights": form})


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
