"""Train-step throughput and compile time of a config, on synthetic resident data.

Prints one JSON line per measurement. Any config field can be overridden, so the same script
measures the paper's recipe, larger batches, bf16/unroll settings and the gate samplers:

    # CPU smoke check (tiny):
    python bench/train_step.py --config=configs/quickstart.py --calls=3
    # GPU (device tool), ResNet-110 at the paper's batch and at 1024, full vs gated steps:
    python bench/train_step.py --config=configs/cifar10_resnet110.py \
        --config.model.dtype=bfloat16 --config.model.unroll=0 --config.train.steps_per_call=50
    python bench/train_step.py --config=configs/cifar10_resnet110_effective.py ...  # E8 cost
"""

import json
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from resnet_ensemble import data as data_lib, gates as gates_lib, models, optim, train
from resnet_ensemble.sharding import make_mesh

config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
flags.DEFINE_integer("calls", 10, "Timed compiled calls (each runs train.steps_per_call steps).")
flags.DEFINE_integer("num_examples", 50_000, "Synthetic training set size.")
FLAGS = flags.FLAGS


def synthetic(config) -> data_lib.ImageDataset:
  """Random uint8 images of the configured dataset's shape: only model work is timed."""
  shape = {"digits": (8, 8, 1), "cifar10": (32, 32, 3)}.get(config.data.name, (32, 32, 3))
  rng = np.random.default_rng(0)
  n = FLAGS.num_examples
  x = rng.integers(0, 256, (n,) + shape, dtype=np.uint8)
  y = rng.integers(0, 10, n).astype(np.int32)
  return data_lib.ImageDataset("synthetic", x, y, x[:1000], y[:1000], 10, (128.0,) * shape[-1],
                               (64.0,) * shape[-1], "synthetic")


def main(_):
  c = FLAGS.config
  mesh = make_mesh()
  dataset = synthetic(c)
  model = models.build(c.model, dataset.num_classes)
  tx, _ = optim.make_optimizer(c.optim, c.train.num_steps)
  state = train.create_train_state(model, tx, c.seed, dataset.train_images.shape[1:], mesh)
  resident = train.put_resident(dataset, 1000, mesh)
  step = train.make_train_on_batch(
      model, tx, dataset.mean, dataset.std, 0.0, mesh,
      sample_gates=gates_lib.make_sampler(c.gates, model.layout, c.train.batch_size),
      gate_key=jax.random.key(0))
  k = c.train.steps_per_call
  fn = train.make_resident_train_fn(step, seed=c.seed, batch_size=c.train.batch_size,
                                    crop_padding=c.data.crop_padding, flip=c.data.flip,
                                    num_steps=k)
  t0 = time.perf_counter()
  compiled = jax.jit(fn, donate_argnums=0).lower(state, resident).compile()
  compile_s = time.perf_counter() - t0
  state, m = compiled(state, resident)  # warm-up
  jax.block_until_ready(m)
  t0 = time.perf_counter()
  for _ in range(FLAGS.calls):
    state, m = compiled(state, resident)
  jax.block_until_ready(m)
  seconds = (time.perf_counter() - t0) / (FLAGS.calls * k)
  print(json.dumps({
      "what": "train_step", "device": jax.devices()[0].device_kind, "devices": jax.device_count(),
      "model": f"{c.model.name}-{c.model.depth}", "dtype": c.model.dtype, "unroll": c.model.unroll,
      "batch": c.train.batch_size, "steps_per_call": k, "gates": c.gates.sampler,
      "ms_per_step": round(1000 * seconds, 3), "img_per_s": round(c.train.batch_size / seconds),
      "compile_s": round(compile_s, 2)}), flush=True)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
