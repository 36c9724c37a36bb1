"""How far bf16 compute moves a residual network's loss gradient from the float32 one, with the
identity path in bf16 or in float32 (``model.stream_dtype``): a CPU-sized probe of the bf16
question in the ResNet-110 gap (DESIGN.md, "Precision").

At initialisation (or trained variables), training-mode BatchNorm, random (or real CIFAR-10)
images and labels; one JSON line per setting: the gradient's cosine similarity with the
float32 gradient, its relative L2 error, its norm ratio, the logits' relative error, and for
scale the cosine between the float32 gradients of two batches (SGD's own noise).

    python bench/precision.py                      # ResNet-110, width 16, 32 images 32x32 (~1 min CPU)
    python bench/precision.py --depth=8 --width=4 --batch=4 --size=8   # smoke
    python bench/precision.py --cifar=/tmp/cif --batch=128    # real images and labels
    python bench/precision.py --cifar=/tmp/cif --batch=128 \
        --variables=results/cifar10/resnet110_seed0/variables.msgpack   # the trained point
"""

import argparse
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from resnet_ensemble import data as data_lib, models, trained

SETTINGS = (("float32", ""), ("bfloat16", ""), ("bfloat16", "float32"))


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--depth", type=int, default=110)
  p.add_argument("--width", type=int, default=16)
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--size", type=int, default=32)
  p.add_argument("--block_form", default="preact")
  p.add_argument("--shortcut", default="projection")
  p.add_argument("--cifar", default="", help="a folder holding cifar-10-batches-bin/: real "
                 "training images and labels instead of random ones")
  p.add_argument("--variables", default="", help="an exported variables.msgpack of the same "
                 "network (e.g. results/cifar10/resnet110_seed0): the trained point, not init")
  a = p.parse_args()
  config = ml_collections.ConfigDict(dict(
      name="cifar_resnet", depth=a.depth, width=a.width, block_form=a.block_form,
      shortcut=a.shortcut, dtype="float32", stream_dtype="", unroll=1))
  if a.cifar:  # two disjoint batches of real images, normalised as in training
    images, train_labels = data_lib.read_cifar10_bin(a.cifar)[:2]
    mean, std = images.reshape(-1, 3).mean(0), images.reshape(-1, 3).std(0)
    pick = np.random.default_rng(0).choice(len(images), 2 * a.batch, replace=False)
    xs = jnp.asarray((images[pick] - mean) / std, jnp.float32)
    x, x2 = xs[:a.batch], xs[a.batch:]
    labels, labels2 = (jnp.asarray(train_labels[pick[:a.batch]], jnp.int32),
                       jnp.asarray(train_labels[pick[a.batch:]], jnp.int32))
  else:
    x = jax.random.normal(jax.random.key(1), (a.batch, a.size, a.size, 3))
    x2 = jax.random.normal(jax.random.key(2), x.shape)
    labels = labels2 = jnp.arange(a.batch) % 10
  variables = None
  if a.variables:
    variables = trained.read_variables(a.variables, models.build(config, 10), x.shape[1:])[0]
  out = {}
  for dtype, stream in SETTINGS:
    config.dtype, config.stream_dtype = dtype, stream
    net = models.build(config, 10)
    variables = variables or net.init(jax.random.key(0), x[:1])

    def loss(params, net=net):
      logits = net.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                         train=True, mutable=["batch_stats"])[0]
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), logits

    out[dtype, stream] = jax.jit(jax.grad(loss, has_aux=True))(variables["params"])
  ref_grad, ref_logits = out["float32", ""]
  # The scale of SGD's own noise: float32, the same network, another batch of as many images.
  config.dtype, config.stream_dtype = "float32", ""
  net = models.build(config, 10)
  other = jax.jit(jax.grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(
      net.apply({"params": p, "batch_stats": variables["batch_stats"]}, x2, train=True,
                mutable=["batch_stats"])[0], labels2).mean()))(variables["params"])
  flat_ref = jnp.concatenate([g.ravel() for g in jax.tree.leaves(ref_grad)])
  flat_other = jnp.concatenate([g.ravel() for g in jax.tree.leaves(other)])
  batch_cosine = float(jnp.vdot(flat_ref, flat_other)
                       / (jnp.linalg.norm(flat_ref) * jnp.linalg.norm(flat_other)))
  for (dtype, stream), (grad, logits) in out.items():
    flat, ref = jnp.concatenate([g.ravel() for g in jax.tree.leaves(grad)]), \
        jnp.concatenate([g.ravel() for g in jax.tree.leaves(ref_grad)])
    print(json.dumps({
        "workload": "precision", "model": f"cifar_resnet-{a.depth}", "width": a.width,
        "block_form": a.block_form, "batch": a.batch, "size": x.shape[1], "dtype": dtype,
        "data": "cifar10" if a.cifar else "random", "point": "trained" if a.variables else "init",
        "stream_dtype": stream or dtype,
        "grad_cosine": float(jnp.vdot(flat, ref) / (jnp.linalg.norm(flat) * jnp.linalg.norm(ref))),
        "grad_rel_error": float(jnp.linalg.norm(flat - ref) / jnp.linalg.norm(ref)),
        "grad_norm_ratio": float(jnp.linalg.norm(flat) / jnp.linalg.norm(ref)),
        "float32_other_batch_cosine": batch_cosine,
        "logits_rel_error": float(jnp.linalg.norm(logits - ref_logits)
                                  / jnp.linalg.norm(ref_logits))}), flush=True)


if __name__ == "__main__":
  main()
