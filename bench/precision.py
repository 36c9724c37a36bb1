"""How far bf16 compute moves a residual network's loss gradient from the float32 one, with the
identity path in bf16 or in float32 (``model.stream_dtype``): a CPU-sized probe of the bf16
question in the ResNet-110 gap (BUILD_NOTES, "The identity path's precision").

At initialisation, training-mode BatchNorm, random images and labels; one JSON line per
setting: the gradient's cosine similarity with the float32 gradient, its relative L2 error,
its norm ratio, and the same for the logits.

    python bench/precision.py                      # ResNet-110, width 16, 32 images 32x32 (~1 min CPU)
    python bench/precision.py --depth=8 --width=4 --batch=4 --size=8   # smoke
"""

import argparse
import json

import jax
import jax.numpy as jnp
import ml_collections
import optax

from resnet_ensemble import models

SETTINGS = (("float32", ""), ("bfloat16", ""), ("bfloat16", "float32"))


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--depth", type=int, default=110)
  p.add_argument("--width", type=int, default=16)
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--size", type=int, default=32)
  p.add_argument("--block_form", default="preact")
  p.add_argument("--shortcut", default="projection")
  a = p.parse_args()
  config = ml_collections.ConfigDict(dict(
      name="cifar_resnet", depth=a.depth, width=a.width, block_form=a.block_form,
      shortcut=a.shortcut, dtype="float32", stream_dtype="", unroll=1))
  x = jax.random.normal(jax.random.key(1), (a.batch, a.size, a.size, 3))
  labels = jnp.arange(a.batch) % 10
  variables = None
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
  for (dtype, stream), (grad, logits) in out.items():
    flat, ref = jnp.concatenate([g.ravel() for g in jax.tree.leaves(grad)]), \
        jnp.concatenate([g.ravel() for g in jax.tree.leaves(ref_grad)])
    print(json.dumps({
        "workload": "precision", "model": f"cifar_resnet-{a.depth}", "width": a.width,
        "block_form": a.block_form, "batch": a.batch, "size": a.size, "dtype": dtype,
        "stream_dtype": stream or dtype,
        "grad_cosine": float(jnp.vdot(flat, ref) / (jnp.linalg.norm(flat) * jnp.linalg.norm(ref))),
        "grad_rel_error": float(jnp.linalg.norm(flat - ref) / jnp.linalg.norm(ref)),
        "grad_norm_ratio": float(jnp.linalg.norm(flat) / jnp.linalg.norm(ref)),
        "logits_rel_error": float(jnp.linalg.norm(logits - ref_logits)
                                  / jnp.linalg.norm(ref_logits))}), flush=True)


if __name__ == "__main__":
  main()
