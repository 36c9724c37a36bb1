"""Eval forward throughput: the test set resident on the device, evaluated by one compiled
program per eval batch size (``evaluate.make_eval_fn``: a scan over padded batches).

One JSON line per batch size (see common.py):

    # CPU smoke check (tiny):
    python bench/eval_forward.py --config=configs/quickstart.py --batch_sizes=50 --num_images=200
    # GPU: ResNet-110, bf16, 10k CIFAR-shaped images, batches of 1,000 and 10,000, plain and
    # as 8 convolution groups
    python bench/eval_forward.py --config=configs/cifar10_resnet110.py \
        --config.model.dtype=bfloat16 --config.model.unroll=0 --batch_sizes=1000,10000 \
        --groups=1,8
"""

import itertools
import time

import jax
from absl import app, flags
from ml_collections import config_flags

import common
from resnet_ensemble import evaluate, models
from resnet_ensemble.sharding import make_mesh, put, put_tree, replicated, sharded

config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
flags.DEFINE_list("batch_sizes", ["1000", "10000"], "Eval batch sizes (one program each).")
flags.DEFINE_integer("num_images", 10_000, "Synthetic test images (padded to whole batches).")
flags.DEFINE_integer("calls", 20, "Timed passes over the test set per batch size.")
flags.DEFINE_string("variables", "", "An exported variables.msgpack (default: random init).")
flags.DEFINE_list("groups", ["1"], "eval.conv_groups values: G > 1 evaluates each batch as "
                  "G slices vmapped over G copies of the weights, so every convolution becomes "
                  "one grouped convolution with G x the channels (the form of the lesion "
                  "engine's per-variant weights). Same numbers, another kernel.")
FLAGS = flags.FLAGS


def main(_):
  c = FLAGS.config
  common.progress(f"start on {jax.devices()[0].device_kind}")
  mesh = make_mesh()
  dataset = common.synthetic(c, 1, FLAGS.num_images)
  model = models.build(c.model, dataset.num_classes)
  variables, source = common.model_variables(model, c, dataset.test_images.shape[1:],
                                             FLAGS.variables)
  variables = put_tree(variables, replicated(mesh))
  runs = list(itertools.product(map(int, FLAGS.batch_sizes), map(int, FLAGS.groups)))
  for batch, groups in runs:  # before any compiling: a bad pair fails at once
    if batch % groups:
      raise ValueError(f"--groups={groups} must divide the batch size {batch}")
  for batch, groups in runs:
    eval_fn = jax.jit(evaluate.make_eval_fn(model, dataset.mean, dataset.std, groups),
                      out_shardings=replicated(mesh))
    images, labels, mask = dataset.padded_test(batch)
    args = [put(a, sharded(mesh, axis=1)) for a in (images, labels, mask)]
    common.progress(f"batch {batch}, groups {groups}: compiling")
    t0 = time.perf_counter()
    compiled = eval_fn.lower(variables, *args).compile()
    compile_s = time.perf_counter() - t0
    common.progress(f"batch {batch}, groups {groups}: compiled in {compile_s:.1f} s; "
                    "warm-up, timed calls")
    call = lambda: compiled(variables, *args)["error"]
    first = compiled(variables, *args)  # warm-up; the same numbers for any batch and groups
    error, loss = float(first["error"]), float(first["loss"])
    calls, seconds = common.timed(call, FLAGS.calls, FLAGS.time_cap_s)
    n = FLAGS.num_images
    common.emit({
        "workload": "eval", **common.jax_info(), "config": common.config_name(),
        "model": f"{c.model.name}-{c.model.depth}", "width": c.model.width,
        "dtype": c.model.dtype, "unroll": c.model.unroll, "batch": batch, "images": n,
        "groups": groups, "padded_images": int(mask.size), "calls": calls,
        "seconds": round(seconds, 4), "img_per_s": round(n * calls / seconds),
        "compile_s": round(compile_s, 2), "eval_error": error, "eval_loss": loss,
        "variables": source},
        human=f"eval {c.model.name}-{c.model.depth} {c.model.dtype} batch {batch} groups "
              f"{groups}: {n * calls / seconds:,.0f} img/s (compile {compile_s:.1f} s)")
    common.profile(call, {"workload": "eval", "batch": batch, "groups": groups,
                          "dtype": c.model.dtype, "images": n})


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
