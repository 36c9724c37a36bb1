"""Train-step throughput and compile time of a config, on synthetic resident data.

One JSON line per run (see common.py). Any config field can be overridden, so the same script
measures the paper's recipe, larger batches, bf16/unroll settings and the gate samplers:

    # CPU smoke check (tiny):
    python bench/train_step.py --config=configs/quickstart.py --calls=3
    # GPU, ResNet-110 at the paper's batch and at 1024, then the gated steps (E8, E10):
    R110="--config.model.dtype=bfloat16 --config.model.unroll=0 --config.train.steps_per_call=50"
    python bench/train_step.py --config=configs/cifar10_resnet110.py $R110
    python bench/train_step.py --config=configs/cifar10_resnet110.py $R110 --config.train.batch_size=1024
    python bench/train_step.py --config=configs/cifar10_resnet110_effective.py $R110
    python bench/train_step.py --config=configs/cifar10_resnet110_sd.py $R110
"""

import time

import jax
from absl import app, flags
from ml_collections import config_flags

import common
from resnet_ensemble import (blocks, conv, feeds, gates as gates_lib, models, optim, state as state_lib,
                             train)
from resnet_ensemble.sharding import make_mesh
from resnet_ensemble.stack import RunStack, runs_of

config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
flags.DEFINE_integer("calls", 10, "Timed compiled calls (each runs train.steps_per_call steps).")
flags.DEFINE_integer("num_examples", 50_000, "Synthetic training set size.")
flags.DEFINE_string("variant", "", "A setting under trial (e.g. XLA flags in the environment): "
                    "the row's workload becomes 'train[VARIANT]', listed apart in the table.")
flags.DEFINE_integer("replicas", 1, "Models trained at once: the step vmapped over replicas "
                     "with their own seed (init, batches, augmentation); rows give the time per "
                     "model-step and the variant 'xR'. Tells whether a launch-bound step gets "
                     "several seeds or samplers for the price of one. With --config.stack: "
                     "its runs (mixed samplers) instead.")
flags.DEFINE_float("start_at", 0.0, "Wall-clock time (epoch s) to start timing at, after the "
                   "warm-up: aligns the timed windows of copies run at once (concurrent.sh).")
FLAGS = flags.FLAGS


def main(_):
  c = FLAGS.config
  common.progress(f"start on {jax.devices()[0].device_kind}")
  mesh = make_mesh()
  dataset = common.synthetic(c, FLAGS.num_examples, 1000)
  model = models.build(c.model, dataset.num_classes)
  tx, _ = optim.make_optimizer(c.optim, c.train.num_steps)
  # As train_and_evaluate does for a stack of runs: one vmapped program over the replicas.
  if not c.stack:
    c.seeds = tuple(c.seed + r for r in range(FLAGS.replicas))
  stack = RunStack(runs_of(c), mesh)
  replicas = len(stack)
  shape = dataset.train_images.shape[1:]
  state = stack.init(lambda seed: state_lib.create_train_state_unsharded(model, tx, seed, shape))
  resident = feeds.put_train(dataset, mesh)
  sample_gates = gates_lib.make_stack_sampler([r.config.gates for r in stack.runs],
                                              model.layout, c.train.batch_size)
  skip = blocks.should_skip(c.gates.skip_compute, sampled=sample_gates is not None,
                            vmapped=stack.stacked)
  step = train.make_train_on_batch(
      model, tx, dataset.mean, dataset.std, 0.0, mesh, sample_gates=sample_gates,
      skip_compute=skip, conv_groups=c.train.conv_groups)
  k = c.train.steps_per_call
  # As the feed does: on the CPU a call runs k compiled steps of one (conv.loops_are_slow).
  per_program = 1 if conv.loops_are_slow() else k
  fn = stack.vmap(feeds.make_resident_train_fn(
      step, batch_size=c.train.batch_size, crop_padding=c.data.crop_padding, flip=c.data.flip,
      num_steps=per_program), (0, None, 0, 0))
  args = (stack.seed_arg, stack.index_arg)
  common.progress("state and data resident; compiling")
  t0 = time.perf_counter()
  compiled = jax.jit(fn, donate_argnums=0).lower(state, resident, *args).compile()
  compile_s = time.perf_counter() - t0
  common.progress(f"compiled in {compile_s:.1f} s; warm-up call")
  box = [state]

  def call():
    for _ in range(k // per_program):
      box[0], m = compiled(box[0], resident, *args)
    return m

  common.timed(call, 1, 0.0)  # warm-up
  wait = FLAGS.start_at - time.time()
  if FLAGS.start_at:
    common.progress(f"waiting {wait:.1f} s for the common start" if wait > 0 else
                    f"late for the common start by {-wait:.1f} s")
    time.sleep(max(wait, 0.0))
  common.progress("timed calls")
  timed_from = time.time()
  calls, seconds = common.timed(call, FLAGS.calls, FLAGS.time_cap_s)
  per_step = seconds / (calls * k * replicas)  # per model-step
  gates = "mixed" if c.stack else c.gates.sampler  # a stack of runs of their own samplers
  # Gated steps skip the blocks gated off (gates.skip_compute) unless told otherwise.
  workload = ("train" if gates == "none" else f"train_{gates}"
              + ("" if skip else "_multiply"))
  variant = ",".join(v for v in (FLAGS.variant, f"x{replicas}" * (replicas > 1)) if v)
  workload += f"[{variant}]" if variant else ""
  common.emit({
      "workload": workload, "what": "train_step", **common.jax_info(),
      "config": common.config_name(), "model": f"{c.model.name}-{c.model.depth}",
      "width": c.model.width, "n_blocks": model.layout.n_blocks, "dtype": c.model.dtype,
      "unroll": c.model.unroll, "batch": c.train.batch_size, "steps_per_call": k,
      "replicas": replicas, "conv_groups": c.train.conv_groups,
      "timed_from": round(timed_from, 3),
      "late_s": round(max(-wait, 0.0), 2) if FLAGS.start_at else None,
      "gates": gates, "gates_k": c.gates.k if gates == "effective" else None,
      "skip_compute": skip if gates != "none" else None,
      "steps": calls * k, "seconds": round(seconds, 3),
      "ms_per_step": round(1000 * per_step, 3), "steps_per_s": round(1 / per_step, 2),
      "img_per_s": round(c.train.batch_size / per_step), "compile_s": round(compile_s, 2)},
      human=f"{workload} {c.model.name}-{c.model.depth} {c.model.dtype} batch "
            f"{c.train.batch_size}: {1000 * per_step:.2f} ms/step, "
            f"{c.train.batch_size / per_step:,.0f} img/s (compile {compile_s:.1f} s)")
  common.profile(call, {"workload": workload, "batch": c.train.batch_size,
                        "dtype": c.model.dtype, "steps_per_call": k}, steps=k)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
