"""Subprocess helper for tests: train a tiny config, save the final params as .npz.

Usage: python tests/_train_probe.py WORKDIR OUT.npz [key=value ...]  (XLA_FLAGS set by caller;
values are JSON, lists become tuples: seeds=[0,1] or stack=["a", "b:seed=1"] trains a stack)
"""

import json
import os
import sys

import jax
import numpy as np

sys.path.insert(0, __file__.rsplit("/", 2)[0])
from tests.conftest import tiny_config  # noqa: E402
from resnet_ensemble import checkpoint, stack, stopping, train  # noqa: E402


def main():
  workdir, out = sys.argv[1], sys.argv[2]
  overrides = dict(kv.split("=", 1) for kv in sys.argv[3:])
  config = tiny_config(**{k: tuple(v) if isinstance(v, list) else v
                          for k, v in ((k, json.loads(v)) for k, v in overrides.items())})
  from resnet_ensemble import sharding
  sharding.initialize_distributed()  # from JAX_COORDINATOR_ADDRESS etc. when set
  try:
    final = train.train_and_evaluate(config, workdir)
  except stopping.Stopped as e:  # SIGTERM: a checkpoint is saved, the run is not finished
    print(json.dumps({"stopped_at": e.step}), flush=True)
    sys.exit(e.exit_code)
  if os.environ.get("PROBE_LESION") == "1":  # then E1-E4 on the result (lesion.json)
    from resnet_ensemble import lesion
    lesion.run_study(config, workdir)
  if jax.process_count() > 1:  # process 0 wrote the metrics; params are compared through them
    print(json.dumps({"devices": jax.device_count(), "processes": jax.process_count(), **final}))
    return
  arrays = {}
  for run in stack.runs_of(config):
    state = checkpoint.restore_latest(
        checkpoint.make_manager(run.workdir(workdir)), None)
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    # a stack's runs by name: seed0['params']..., e8['params']...
    arrays.update({run.name + jax.tree_util.keystr(p): np.asarray(v) for p, v in leaves})
  np.savez(out, **arrays)
  final = {str(k): v for k, v in final.items()}
  print(json.dumps({"devices": jax.device_count(), **final}))


if __name__ == "__main__":
  main()
