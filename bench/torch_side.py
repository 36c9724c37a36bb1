"""The PyTorch reference measured in the same device call, as JSON lines beside ours.

Imports the reference script (``--ref``, default ``bench/torch_resnet.py``, the PyTorch
ResNets of this repository; any script with the same ``ResNet``/``train_rate``/``eval_rate``
interface may be passed) and runs its measurements for the rows of the speed table, one JSON
line each (see common.py). Its
``train_rate``/``eval_rate`` are called as they are; the E1 lesion loop and the sampled-path
gradient live inside its ``main()``, so they are repeated here line for line. Rows run cheapest
first (``--rows``); ``--time_cap_s`` skips the rows not started in time, and ``compile1024``
(torch.compile, minutes of compiling) is best run last under its own timeout.

    python bench/torch_side.py --out=$OUT/bench.jsonl            # GPU (CUDA)
    python bench/torch_side.py --smoke                           # CPU: ResNet-8, tiny batches
    python bench/torch_side.py --cpu --depth=20 --rows=train128_fp32   # CPU, full sizes

Without torch, without CUDA (and no ``--smoke``) or without the reference file it writes one
``skipped`` row and exits 0.
"""

import importlib.util
import os
import time
import traceback

from absl import app, flags

import common

ROWS = ("train128_fp32", "train128_bf16", "train1024_bf16", "eval", "lesion_E1", "paths_E6",
        "compile1024")
flags.DEFINE_string("ref", os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                         "torch_resnet.py"),
                    "The PyTorch reference script to import.")
flags.DEFINE_list("rows", None, f"Rows to measure, in order (default: all of {', '.join(ROWS)}; "
                  "with --smoke all but compile1024).")
flags.DEFINE_bool("smoke", False, "Tiny sizes (ResNet-8, small batches); runs on the CPU.")
flags.DEFINE_bool("cpu", False, "Full sizes on the CPU (for rows beside the JAX side's CPU rows).")
flags.DEFINE_integer("depth", 110, "CIFAR ResNet depth 6n+2 (bench/torch_resnet.py).")
flags.DEFINE_integer("width", 16, "First stage's width.")
flags.DEFINE_bool("preact", False, "Pre-activation blocks (default: post-activation).")
flags.DEFINE_string("shortcut", "zero_pad", "zero_pad (option A) | projection.")
flags.DEFINE_integer("in_channels", 3, "Input channels.")
flags.DEFINE_integer("image", 32, "Input height and width.")
flags.DEFINE_integer("train_batch", 0, "Batch of the train128_* rows (0: 128).")
FLAGS = flags.FLAGS


def load(path: str):
  spec = importlib.util.spec_from_file_location("torch_ref", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


class Side:
  """The reference's model and loops at full (ResNet-110) or smoke sizes."""

  def __init__(self, ref, smoke: bool):
    import torch
    self.ref, self.torch, self.smoke = ref, torch, smoke
    self.n = 1 if smoke else (FLAGS.depth - 2) // 6  # blocks per stage
    self.dev = ref.dev
    # The shape flags, passed only where they differ from the reference's defaults (so a
    # reference script that knows only ResNet(n) still runs the paper's network).
    self.shape = {k: v for k, v in (("width", FLAGS.width), ("preact", FLAGS.preact),
                                    ("shortcut", FLAGS.shortcut),
                                    ("in_channels", FLAGS.in_channels))
                  if v != {"width": 16, "preact": False, "shortcut": "zero_pad",
                           "in_channels": 3}[k]}
    self.image = {"image": FLAGS.image} if FLAGS.image != 32 else {}

  def model(self, channels_last: bool):
    m = self.ref.ResNet(self.n, **self.shape).to(self.dev)
    return m.to(memory_format=self.torch.channels_last) if channels_last else m

  def batch(self, b: int) -> int:
    return min(b, 16) if self.smoke else b

  def train(self, batch: int, amp: bool, cl: bool, compiled: bool = False) -> dict:
    b = self.batch(FLAGS.train_batch or batch if batch == 128 else batch)
    steps, warm = (2, 1) if self.smoke else (40, 3 if compiled else 10)
    if FLAGS.cpu:
      steps, warm = 10, 3
    m = self.model(cl)
    if compiled:
      m = self.torch.compile(m)
    t0 = time.perf_counter()
    rate = self.ref.train_rate(m, b, amp, cl, steps=steps, warm=warm, **self.image)
    row = {"workload": "train", "batch": b, "dtype": "bfloat16" if amp else "float32",
           "channels_last": cl, "compiled": compiled, "img_per_s": round(rate),
           "ms_per_step": round(1000 * b / rate, 3)}
    if compiled:
      row["compile_and_warm_s"] = round(time.perf_counter() - t0 - steps * b / rate, 1)
    return row

  def eval(self) -> dict:
    b = 32 if self.smoke else (500 if FLAGS.cpu else 2000)
    amp = not FLAGS.cpu  # bf16 on a GPU; float32 on the CPU, as the JAX side's CPU rows
    rate = self.ref.eval_rate(self.model(True), b, amp, True,
                              steps=2 if self.smoke else (4 if FLAGS.cpu else 20),
                              **self.image)
    return {"workload": "eval", "batch": b, "dtype": "bfloat16" if amp else "float32",
            "channels_last": True, "img_per_s": round(rate)}

  def lesion_e1(self) -> dict:
    """torch_ref.main's sweep: one eval pass over the test images per deleted block."""
    torch, ref = self.torch, self.ref
    images, step = (64, 32) if self.smoke else ((500, 500) if FLAGS.cpu else (10_000, 2000))
    m = self.model(True).eval()
    nb = len(m.blocks)
    x = torch.randn(images, 3, 32, 32, device=self.dev).to(memory_format=torch.channels_last)
    ref.sync()
    t = time.perf_counter()
    with torch.no_grad(), torch.autocast(self._autocast_device(), dtype=torch.bfloat16):
      for k in range(nb):
        mask = [1.0] * nb
        mask[k] = 0.0
        for i in range(0, images, step):
          m(x[i:i + step], mask)
    ref.sync()
    seconds = time.perf_counter() - t
    return {"workload": "lesion_E1", "variants": nb, "images": images, "batch": step,
            "dtype": "bfloat16", "seconds": round(seconds, 3),
            "variants_per_s": round(nb / seconds, 2)}

  def paths_e6(self) -> dict:
    """The reference's sampled-path gradient: one path per backward pass (batch 128, fp32;
    the post-activation network's blocks)."""
    torch, F, ref = self.torch, self.torch.nn.functional, self.ref
    b = self.batch(128)
    m = self.model(False).train()
    nb = len(m.blocks)
    xb = torch.randn(b, 3, 32, 32, device=self.dev, requires_grad=True)
    yb = torch.randint(0, 10, (b,), device=self.dev)

    def one_path(k):
      sel = set(torch.randperm(nb)[:k].tolist())
      h = F.relu(m.bn(m.conv(xb)))
      for i, blk in enumerate(m.blocks):
        r = blk.b2(blk.c2(F.relu(blk.b1(blk.c1(h)))))
        s = blk.shortcut(h)
        z = s.detach() + r if i in sel else s + r.detach()
        h = F.relu(z)
      loss = F.cross_entropy(m.fc(h.mean((2, 3))), yb)
      g, = torch.autograd.grad(loss, xb)
      return g.norm().item()

    warm, n = (1, 3) if self.smoke else ((1, 10) if FLAGS.cpu else (5, 100))
    for _ in range(warm):
      one_path(min(20, nb))
    ref.sync()
    t = time.perf_counter()
    for j in range(n):
      one_path(j % (nb + 1))
    ref.sync()
    each = (time.perf_counter() - t) / n
    total = (nb + 1) * 1000
    return {"workload": "paths_E6", "batch": b, "dtype": "float32", "paths_done": n,
            "paths": total, "s_per_path": round(each, 5), "paths_per_s": round(1 / each, 1),
            "projected_s": round(each * total, 1), "complete": False}

  def _autocast_device(self) -> str:
    return "cuda" if self.dev == "cuda" else "cpu"

  def measure(self, name: str) -> dict:
    if name == "train128_fp32":
      return self.train(128, False, False)
    if name == "train128_bf16":
      return self.train(128, True, True)
    if name == "train1024_bf16":
      return self.train(1024, True, True)
    if name == "compile1024":
      return self.train(1024, True, True, compiled=True)
    if name == "eval":
      return self.eval()
    if name == "lesion_E1":
      return self.lesion_e1()
    if name == "paths_E6":
      return self.paths_e6()
    raise ValueError(f"unknown row {name!r}; valid: {', '.join(ROWS)}")


def main(_):
  base = {"impl": "torch", "smoke": FLAGS.smoke}
  try:
    import torch
  except ImportError:
    common.emit({"workload": "torch_env", **base, "skipped": "torch is not installed"},
                human="torch side skipped: torch is not installed")
    return
  cuda = torch.cuda.is_available()
  if not cuda and not (FLAGS.smoke or FLAGS.cpu):
    common.emit({"workload": "torch_env", **base, "torch": torch.__version__,
                 "skipped": "no CUDA device (use --smoke or --cpu on a CPU)"},
                human="torch side skipped: no CUDA device (use --smoke or --cpu on a CPU)")
    return
  if not os.path.exists(FLAGS.ref):
    common.emit({"workload": "torch_env", **base, "skipped": f"no reference at {FLAGS.ref}"},
                human=f"torch side skipped: no reference script at {FLAGS.ref}")
    return
  ref = load(FLAGS.ref)
  if not cuda:  # on the CPU: a reference may hard-code CUDA in two globals
    ref.dev, ref.sync = "cpu", lambda: None
  side = Side(ref, FLAGS.smoke)
  device = torch.cuda.get_device_name(0) if cuda else "cpu"
  base.update(device=device, torch=torch.__version__,
              model=f"torch-ResNet-{6 * side.n + 2}", cpu_full_size=FLAGS.cpu,
              threads=torch.get_num_threads())
  common.emit({"workload": "torch_env", **base, "ref": FLAGS.ref},
              human=f"torch {torch.__version__} on {device}: {FLAGS.ref}")
  rows = FLAGS.rows or [r for r in ROWS if not (FLAGS.smoke and r == "compile1024")]
  t0 = time.perf_counter()
  for name in rows:
    if FLAGS.time_cap_s and time.perf_counter() - t0 >= FLAGS.time_cap_s:
      common.emit({"workload": name, **base, "row": name, "skipped": "time cap"},
                  human=f"torch {name}: skipped (time cap {FLAGS.time_cap_s:.0f} s)")
      continue
    t = time.perf_counter()
    try:
      row = side.measure(name)
    except Exception as e:  # one failing row (OOM, compiler) must not lose the others
      traceback.print_exc()
      common.emit({"workload": name, **base, "row": name, "error": repr(e)[:300]},
                  human=f"torch {name}: failed ({type(e).__name__})")
      continue
    row = {**row, **base, "row": name, "wall_s": round(time.perf_counter() - t, 1)}
    value = (f"{row['img_per_s']:,} img/s" if "img_per_s" in row else
             f"{row.get('projected_s', row.get('seconds'))} s")
    common.emit(row, human=f"torch {name}: {value}")


if __name__ == "__main__":
  app.run(main)
