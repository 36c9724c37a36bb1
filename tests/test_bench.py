"""The benchmarks keep running and their JSON lines keep their fields (no timing is asserted:
speed goals live in bench/ and BUILD_NOTES.md). Tiny sizes: each test takes seconds."""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
TINY = ["--config=configs/quickstart.py", "--config.stack=()"]  # one ResNet-20 width 8, digits


def run(args, out=None, timeout=300, env=None):
  """Runs a bench script; returns its JSON rows (from --out when given, else stdout)."""
  cmd = [sys.executable] + args + ([f"--out={out}"] if out else [])
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                        env=env or ENV)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = open(out).read().splitlines() if out else proc.stdout.splitlines()
  return [json.loads(l) for l in lines if l.startswith("{")]


def check_common(row, workload):
  assert row["workload"] == workload and row["impl"] == "jax"
  assert row["device"] and row["devices"] >= 1 and row["time"]
  assert row["compile_s"] > 0


def test_train_step_bench_prints_a_measurement(tmp_path):
  rows = run(["bench/train_step.py"] + TINY + [
      "--calls=1", "--num_examples=500", "--config.train.steps_per_call=2",
      "--config.gates.sampler=effective", "--config.gates.k=5"], out=tmp_path / "b.jsonl")
  assert len(rows) == 1
  row = rows[0]
  check_common(row, "train_effective")
  assert row["what"] == "train_step" and row["gates"] == "effective" and row["gates_k"] == 5
  assert row["batch"] == 64 and row["dtype"] == "float32" and row["steps"] == 2
  assert row["ms_per_step"] > 0 and row["img_per_s"] > 0
  assert row["config"] == "quickstart.py"


def test_eval_forward_bench_one_row_per_batch_size_and_groups(tmp_path):
  rows = run(["bench/eval_forward.py"] + TINY + [
      "--batch_sizes=50,128", "--groups=1,2", "--num_images=200", "--calls=2"],
      out=tmp_path / "b.jsonl")
  assert [(r["batch"], r["groups"]) for r in rows] == [(50, 1), (50, 2), (128, 1), (128, 2)]
  for row in rows:
    check_common(row, "eval")
    assert row["images"] == 200 and row["calls"] == 2 and row["img_per_s"] > 0
    assert row["variables"] == "random_init"
    # grouped convolutions over copies of the weights: the same network, the same numbers
    assert row["eval_error"] == pytest.approx(rows[0]["eval_error"], abs=1e-6)
    assert row["eval_loss"] == pytest.approx(rows[0]["eval_loss"], rel=1e-5)
  assert rows[2]["padded_images"] == 256  # two batches of 128 hold the 200 images


LESION = TINY + ["--num_images=100", "--config.eval.batch_size=50", "--chunk=4",
                 "--config.lesion.max_k=2", "--config.lesion.reorder_max_swaps=2",
                 "--config.lesion.reorder_draws=2"]


@pytest.mark.slow
def test_lesion_suite_bench_times_each_experiment_and_form_and_projects_capped_ones(tmp_path):
  # E3: 3 k x 8 draws = 24 variants; a 1 us cap stops it after one slice of 2 chunks (8).
  rows = run(["bench/lesion_suite.py"] + LESION + ["--config.lesion.draws=8",
                                                   "--time_cap_s=0.000001"],
             out=tmp_path / "b.jsonl")
  forwards = [r for r in rows if r["workload"] == "lesion_forward"]
  by = {(r["workload"], r["variant_weights"]): r for r in rows if r not in forwards}
  assert list(by) == [("lesion_E1", "per_variant"), ("lesion_E3", "per_variant"),
                      ("lesion_E4", "per_variant"), ("lesion_suite", "per_variant"),
                      ("lesion_E1", "shared"), ("lesion_E3", "shared"),
                      ("lesion_suite", "shared"),  # E4: one program in both forms, timed once
                      ("lesion_E1", "prefix"), ("lesion_E3", "prefix"),
                      ("lesion_E4", "prefix"), ("lesion_suite", "prefix")]
  # the plain forward, timed in the same process just before each experiment: the ratio's
  # denominator
  assert [(f["variant_weights"], f["before"]) for f in forwards] == [
      ("per_variant", "E1"), ("per_variant", "E3"), ("per_variant", "E4"), ("shared", "E1"),
      ("shared", "E3"), ("prefix", "E1"), ("prefix", "E3"), ("prefix", "E4")]
  for f in forwards:
    assert f["ms_per_img"] > 0 and f["images"] == 100 and f["calls"] == 3
    after = rows[rows.index(f) + 1]
    assert (after["workload"], after["variant_weights"]) == (f"lesion_{f['before']}",
                                                             f["variant_weights"])
    assert after["forward_ms_per_img"] == pytest.approx(f["ms_per_img"], abs=1e-4)
  for form in ("per_variant", "shared", "prefix"):
    e4 = by["lesion_E4", "prefix" if form == "prefix" else "per_variant"]
    assert e4["variants"] == e4["variants_done"] == 4 and e4["complete"]
    e1, e3, suite = (by[f"lesion_{name}", form] for name in ("E1", "E3", "suite"))
    for row in (e1, e3, e4):
      check_common(row, row["workload"])
      assert row["variants_per_s"] > 0 and row["img_per_s"] > 0
      assert row["chunk"] == 4 and row["images"] == 100 and row["n_blocks"] == 9
      # a variant-image over a forward image: s / (variants x images) / forward s per image
      assert row["x_forward"] == pytest.approx(
          row["seconds"] / (row["variants_done"] * 100) / (row["forward_ms_per_img"] / 1e3),
          rel=0.02)
    # the suite: its seconds over the forward-image seconds of all its variants
    forward_s = sum(r["variants"] * r["forward_ms_per_img"] / 1e3 for r in (e1, e3, e4)) * 100
    assert suite["x_forward"] == pytest.approx(suite["projected_s"] / forward_s, rel=0.02)
    assert e1["variants"] == e1["variants_done"] == 9 and e1["complete"]  # never capped
    assert e3["variants"] == 24 and e3["variants_done"] == 8 and not e3["complete"]
    assert e3["projected_s"] > e3["seconds"] > 0
    assert suite["variants"] == 37 and not suite["complete"]
    assert suite["projected_s"] == pytest.approx(
        e1["projected_s"] + e3["projected_s"] + e4["projected_s"], abs=0.02)
  faster = min((by["lesion_E1", f] for f in ("per_variant", "shared", "prefix")),
               key=lambda r: r["seconds"])
  table = load_table()
  cell = table.table(rows).split("\n")[5]  # the E1 row names the faster form
  assert cell.startswith("| E1") and f"weights {faster['variant_weights'].replace('_', ' ')}" in cell
  against = table.ratios(rows).splitlines()
  assert len(against) == 2 + 11 and against[2].startswith("| E1 | per_variant | 100 images")
  assert f"{e1['x_forward']:.2f}x" in against[-4]  # prefix's E1


def test_lesion_suite_bench_picks_experiments_and_forms():
  rows = run(["bench/lesion_suite.py"] + LESION + ["--config.lesion.draws=2",
                                                   "--experiments=E1", "--variant_weights=auto"])
  # E1 alone is not the suite: no lesion_suite row (table.py compares whole suites only)
  assert [r["workload"] for r in rows] == ["lesion_forward", "lesion_E1"]  # forward, then E1
  assert rows[1]["complete"] and rows[1]["variants"] == 9
  assert rows[1]["variant_weights"] == "prefix"  # auto on the CPU


def test_path_sampling_bench_projects_a_capped_run(tmp_path):
  rows = run(["bench/path_sampling.py"] + TINY + [
      "--config.paths.samples_per_k=4", "--config.paths.chunk=12",
      "--config.paths.batch_size=16", "--num_examples=200", "--time_cap_s=0.000001"],
      out=tmp_path / "b.jsonl")
  (row,) = rows
  check_common(row, "paths_E6")
  assert row["lengths"] == 10 and row["paths"] == 40 and row["batch"] == 16
  assert row["paths_done"] == 12 and not row["complete"]  # one chunk, then the cap
  assert row["paths_per_s"] > 0 and row["projected_s"] > row["seconds"]
  # a routed path over a plain forward + backward at the same batch, timed in the same process
  assert row["fwd_bwd_ms"] > 0
  assert row["x_fwd_bwd"] == pytest.approx(
      row["seconds"] / 12 / (row["fwd_bwd_ms"] / 1e3), rel=0.02)
  assert "| paths_E6 | — | batch 16, chunk 6 |" in load_table().ratios(rows)


@pytest.mark.slow
def test_torch_side_smoke_measures_every_row(tmp_path):
  """The PyTorch side runs from the repository alone (bench/torch_resnet.py)."""
  env = dict(ENV, CUDA_VISIBLE_DEVICES="")
  rows = run(["bench/torch_side.py", "--smoke"], out=tmp_path / "t.jsonl", env=env)
  assert rows[0]["workload"] == "torch_env" and "skipped" not in rows[0]
  by = {r["row"]: r for r in rows[1:]}
  assert list(by) == ["train128_fp32", "train128_bf16", "train1024_bf16", "eval", "lesion_E1",
                      "paths_E6"]
  for row in by.values():
    assert row["impl"] == "torch" and row["smoke"] and row["model"] == "torch-ResNet-8"
  assert by["train128_fp32"]["dtype"] == "float32" and by["train128_fp32"]["img_per_s"] > 0
  assert by["train1024_bf16"]["channels_last"] and by["train1024_bf16"]["ms_per_step"] > 0
  assert by["eval"]["img_per_s"] > 0
  assert by["lesion_E1"]["variants"] == 3 and by["lesion_E1"]["seconds"] > 0
  assert by["paths_E6"]["paths"] == 4000 and by["paths_E6"]["projected_s"] > 0


def test_torch_side_skips_without_a_reference(tmp_path):
  rows = run(["bench/torch_side.py", "--smoke", f"--ref={tmp_path}/missing.py"])
  assert len(rows) == 1 and rows[0]["workload"] == "torch_env" and rows[0]["skipped"]


def load_bench_module(name: str):
  spec = importlib.util.spec_from_file_location(f"bench_{name}",
                                                os.path.join(REPO, "bench", f"{name}.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def load_table():
  return load_bench_module("table")


def test_table_compares_ours_with_the_same_call_reference(tmp_path):
  j = {"impl": "jax", "device": "NVIDIA H100", "devices": 1, "jax": "0.11.2",
       "model": "cifar_resnet-110", "time": "2026-11-27T00:00:00+00:00"}
  t = {"impl": "torch", "device": "NVIDIA H100", "model": "torch_ref-ResNet-110"}
  rows = [
      {"workload": "torch_env", "impl": "torch", "torch": "2.11"},
      {"workload": "train", **t, "batch": 128, "dtype": "float32", "compiled": False,
       "img_per_s": 4800, "ms_per_step": 26.7},
      {"workload": "train", **t, "batch": 1024, "dtype": "bfloat16", "compiled": False,
       "img_per_s": 20_000, "ms_per_step": 51.2},
      {"workload": "eval", **t, "batch": 2000, "img_per_s": 80_000},
      {"workload": "lesion_E1", **t, "seconds": 7.0},
      {"workload": "paths_E6", **t, "s_per_path": 0.025, "projected_s": 1375.0},
      {"workload": "train", **j, "batch": 128, "ms_per_step": 5.0, "img_per_s": 25_600,
       "compile_s": 28.0},
      {"workload": "train", **j, "batch": 1024, "ms_per_step": 20.48, "img_per_s": 50_000,
       "compile_s": 31.0},
      {"workload": "eval", **j, "batch": 1000, "img_per_s": 200_000, "compile_s": 10.0},
      {"workload": "eval", **j, "batch": 10_000, "img_per_s": 300_000, "compile_s": 12.0},
      {"workload": "lesion_E1", **j, "seconds": 0.5, "variants_per_s": 108.0, "compile_s": 14},
      {"workload": "lesion_suite", **j, "projected_s": 90.0, "variants": 3654,
       "complete": False, "compile_s": 14},
      {"workload": "paths_E6", **j, "paths": 55_000, "projected_s": 27.5, "paths_per_s": 2000,
       "complete": False, "compile_s": 25.0},
      {"workload": "train_effective", **j, "batch": 128, "ms_per_step": 3.0, "compile_s": 27},
      {"workload": "step", "step": "torch_compile", "status": "timeout", "rc": 124,
       "wall_s": 60, "timeout_s": 60},
  ]
  path = tmp_path / "bench.jsonl"
  path.write_text("not json\n" + "".join(json.dumps(r) + "\n" for r in rows))
  table = load_table()
  text = table.table(table.read(str(path)))
  lines = {l.split(" | ")[0].lstrip("| "): l for l in text.splitlines()}
  b1024 = lines["train ResNet-110, batch 1024"]
  assert "50.0k img/s" in b1024 and "29.5k img/s (earlier)" in b1024  # no torch.compile row
  assert "1.69x torch.compile" in b1024 and "2.50x eager" in b1024 and "✅" in b1024
  b128 = lines["train, batch 128 (paper recipe)"]
  assert "5.00 ms/step" in b128 and "26.7 ms/step" in b128 and "5.34x" in b128 and "✅" in b128
  ev = lines["eval forward"]
  assert "300.0k img/s (batch 10,000)" in ev and "3.75x" in ev and "✅" in ev
  assert "14.00x" in lines["E1: 54 single-block lesions on 10k test images"]
  assert "~90.0 s (projected)" in lines[
      "full lesion suite (E1 + E3 100 draws x 21 k + E4 50 x 30)"] and "❌" in text
  assert "50.00x" in lines["E6: 55 lengths x 1,000 paths, batch 128"]  # 1,375 s / 27.5 s
  assert "max 31.0 s" in lines["compile time per program"]
  assert "0.60x the full step" in lines["effective paths (k=23) train step, batch 128"]
  assert "torch_compile: timeout" in table.notes(table.read(str(path)))
  assert "NVIDIA H100" in table.header(table.read(str(path)))


def test_run_all_smoke_runs_a_step_and_prints_the_table(tmp_path):
  # No step cap or budget a loaded machine could exceed: this test is about the rows, not speed.
  env = dict(ENV, OUT=str(tmp_path), STEPS="eval", PYTHON=sys.executable, BUDGET_S="86400",
             STEP_CAP_S="86400")
  proc = subprocess.run(["bash", "bench/run_all.sh", "--smoke"], cwd=REPO, capture_output=True,
                        text=True, env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = [json.loads(l) for l in (tmp_path / "bench.jsonl").read_text().splitlines()]
  assert [r["workload"] for r in rows] == ["eval"] * 4 + ["step"]  # 2 batches x 2 groups
  assert rows[-1]["step"] == "eval" and rows[-1]["status"] == "ok"
  # every step shares one compilation cache, fresh for the run and removed after it
  cache = rows[0]["compile_cache"]
  assert cache.startswith("/tmp/jax_cache_bench.") and not os.path.exists(cache)
  assert "| eval forward |" in (tmp_path / "table.md").read_text()
  assert "img/s" in proc.stdout and '{"workload"' not in proc.stdout  # human lines only


def test_run_all_skips_steps_past_the_budget(tmp_path):
  env = dict(ENV, OUT=str(tmp_path), STEPS="eval lesion", BUDGET_S="1", PYTHON=sys.executable)
  proc = subprocess.run(["bash", "bench/run_all.sh", "--smoke"], cwd=REPO, capture_output=True,
                        text=True, timeout=120, env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = [json.loads(l) for l in (tmp_path / "bench.jsonl").read_text().splitlines()]
  assert [(r["step"], r["status"]) for r in rows] == [("eval", "skipped"), ("lesion", "skipped")]
  assert "step eval: skipped" in proc.stdout


def _trace(kernels, steps_tid=7):
  """A minimal Chrome trace: one device with one stream thread, plus host events."""
  meta = [{"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/device:GPU:0"}},
          {"ph": "M", "pid": 1, "tid": steps_tid, "name": "thread_name",
           "args": {"name": "Stream #13(Compute)"}},
          {"ph": "M", "pid": 1, "tid": 9, "name": "thread_name", "args": {"name": "XLA Ops"}},
          {"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/host:CPU"}}]
  events = [{"ph": "X", "pid": 1, "tid": steps_tid, "ts": ts, "dur": dur, "name": name}
            for name, ts, dur in kernels]
  noise = [{"ph": "X", "pid": 1, "tid": 9, "ts": 0, "dur": 1000, "name": "fusion.1"},
           {"ph": "X", "pid": 2, "tid": 1, "ts": 0, "dur": 5000, "name": "PjitFunction"}]
  return meta + events + noise


def test_trace_summary_counts_device_kernels_busy_and_idle():
  trace_summary = load_bench_module("trace_summary")
  kernels = [("sm90_xmma_fprop_implicit_gemm", 0, 10), ("loop_multiply_fusion", 5, 10),
             ("input_reduce_fusion", 40, 20), ("sm90_xmma_fprop_implicit_gemm", 90, 10)]
  s = trace_summary.summarize(_trace(kernels), steps=2)
  assert s["kernels"] == 4 and s["kernels_per_step"] == 2
  assert s["window_ms"] == pytest.approx(0.1)  # 0 .. 100 us
  assert s["busy_ms"] == pytest.approx(0.045)  # [0, 15) + [40, 60) + [90, 100)
  assert s["idle_share"] == pytest.approx(0.55)
  assert s["share_by_category"] == {"conv": 0.4, "reduction": 0.4, "fusion": 0.2}
  assert s["top_kernels"][0] == {"name": "sm90_xmma_fprop_implicit_gemm", "count": 2,
                                 "ms": 0.02, "share": 0.4}
  assert "idle 55.0 %" in trace_summary.describe(s)
  assert trace_summary.summarize(_trace([]))["kernels"] == 0  # a CPU trace: nothing to rank
  row = {"workload": "profile", "impl": "jax", "of": {"workload": "train", "batch": 128}, **s}
  assert "| train batch 128 | 2 | 0.05 ms | 55 % |" in load_table().profiles([row])


def test_profile_flag_adds_a_profile_row(tmp_path):
  rows = run(["bench/eval_forward.py"] + TINY + [
      "--batch_sizes=50", "--num_images=100", "--calls=1",
      f"--profile_dir={tmp_path / 'prof'}"], out=tmp_path / "b.jsonl")
  assert [r["workload"] for r in rows] == ["eval", "profile"]
  assert rows[1]["of"]["workload"] == "eval" and rows[1]["of"]["batch"] == 50
  assert rows[1]["kernels"] == 0  # the CPU has no device streams; on a GPU: the kernels
  assert list((tmp_path / "prof" / "eval_50").rglob("perfetto_trace.json.gz"))


@pytest.mark.slow
def test_a_variant_row_names_its_setting_and_is_listed_apart(tmp_path):
  env = dict(ENV, XLA_FLAGS="--xla_cpu_enable_fast_math=false")
  rows = run(["bench/train_step.py"] + TINY + [
      "--calls=1", "--num_examples=500", "--config.train.steps_per_call=2", "--variant=probe",
      "--replicas=2"], out=tmp_path / "b.jsonl", env=env)
  assert rows[0]["workload"] == "train[probe,x2]" and rows[0]["replicas"] == 2
  assert rows[0]["xla_flags"] == "--xla_cpu_enable_fast_math=false"
  plain = dict(rows[0], workload="train", ms_per_step=2 * rows[0]["ms_per_step"])
  listed = load_table().variants([plain, rows[0]])
  assert "| train[probe,x2] batch 64 |" in listed and "| 2.00x |" in listed


@pytest.mark.slow
def test_concurrent_copies_time_one_window_and_add_up_in_the_table(tmp_path):
  out = tmp_path / "b.jsonl"
  proc = subprocess.run(
      ["bash", "bench/concurrent.sh", "2", "15", sys.executable, "bench/train_step.py"] + TINY
      + ["--calls=1", "--num_examples=300", "--config.train.steps_per_call=2", f"--out={out}"],
      cwd=REPO, capture_output=True, text=True, timeout=300, env=ENV)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = [json.loads(l) for l in out.read_text().splitlines()]
  assert [r["workload"] for r in rows] == ["train[2proc]"] * 2
  assert all(r["late_s"] is not None for r in rows)
  assert abs(rows[0]["timed_from"] - rows[1]["timed_from"]) < 15  # one common start (or both late)
  plain = dict(rows[0], workload="train", img_per_s=rows[0]["img_per_s"])
  listed = load_table().variants([plain] + rows)
  assert "the 2 copies together" in listed


def test_unpaired_e6_is_listed_against_the_paired_study():
  rows = [{"impl": "jax", "workload": "paths_E6", "batch": 128, "projected_s": 40.0,
           "paths_per_s": 1375},
          {"impl": "jax", "workload": "paths_E6[unpaired]", "batch": 128, "projected_s": 70.0,
           "paths_per_s": 784, "compile_s": 20}]
  assert "| 70.0 s (784 paths/s) | 40.0 s | 1.75x" in load_table().variants(rows)


def test_trace_summary_reads_device_lines_not_named_streams():
  trace_summary = load_bench_module("trace_summary")
  events = _trace([("kernel_a", 0, 10), ("kernel_b", 20, 10)])
  for e in events:  # a trace whose kernel line has another name
    if e.get("name") == "thread_name" and e["args"]["name"].startswith("Stream"):
      e["args"]["name"] = "Compute 13"
  s = trace_summary.summarize(events)
  assert s["kernels"] == 2 and s["kernel_lines"] == ["Compute 13"]  # "XLA Ops" left out


def test_precision_probe_compares_each_setting_with_float32():
  rows = run(["bench/precision.py", "--depth=8", "--width=4", "--batch=4", "--size=8"])
  assert [(r["dtype"], r["stream_dtype"]) for r in rows] == [
      ("float32", "float32"), ("bfloat16", "bfloat16"), ("bfloat16", "float32")]
  assert rows[0]["grad_rel_error"] == 0.0 and abs(rows[0]["grad_cosine"] - 1.0) < 1e-5
  assert all(0.0 < r["grad_rel_error"] for r in rows[1:])


@pytest.mark.parametrize("preact,shortcut", [(True, "projection"), (False, "zero_pad")])
def test_torch_resnet_is_the_jax_network(preact, shortcut):
  """The PyTorch side times the same network: as many parameters, block for block, as the
  JAX ResNet of the same form (ResNet-20, width 8, one input channel as the quickstart's)."""
  import jax
  import jax.numpy as jnp
  from resnet_ensemble import models
  torch_resnet = load_bench_module("torch_resnet")
  t = torch_resnet.ResNet(3, width=8, in_channels=1, preact=preact, shortcut=shortcut)
  m = models.ResNet(stage_sizes=(3, 3, 3), widths=(8, 16, 32), preact=preact, shortcut=shortcut)
  v = jax.eval_shape(lambda: m.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1))))
  count = lambda tree: sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))
  assert sum(p.numel() for p in t.parameters()) == count(v["params"])
  assert sum(b.numel() for b in t.buffers() if b.dtype.is_floating_point) == count(v["batch_stats"])


def test_cpu_ratios_pairs_each_jax_row_with_the_next_torch_row():
  ratios = load_bench_module("cpu_ratios")
  rows = [{"workload": "train[r20]", "impl": "jax", "model": "cifar_resnet-20", "batch": 128,
           "ms_per_step": 450.0},
          {"workload": "torch_env", "impl": "torch"},
          {"workload": "train", "impl": "torch", "batch": 128, "ms_per_step": 300.0},
          {"workload": "eval", "impl": "jax", "model": "cifar_resnet-110", "batch": 500,
           "img_per_s": 200},
          {"workload": "eval", "impl": "torch", "batch": 500, "skipped": "time cap"},
          {"workload": "paths_E6", "impl": "jax", "batch": 128, "paths_per_s": 1.5},
          {"workload": "paths_E6", "impl": "torch", "batch": 128, "paths_per_s": 1.2}]
  table = ratios.table(rows)
  assert "| train[r20] | cifar_resnet-20 | 128 | 450.0 ms_per_step | 300.0 | 1.50 |" in table
  assert "| paths_E6 |  | 128 | 1.5 paths_per_s | 1.2 | 0.80 |" in table
  assert "eval" not in table  # its PyTorch row was skipped: no ratio against another row


def test_lm_suite_bench_rows_each_experiment_against_a_plain_forward(tmp_path):
  rows = run(["bench/lm_suite.py", "--config=configs/lm_bytes.py", "--num_windows=8",
              "--config.data.window=16", "--config.model.max_positions=16",
              "--config.lesion.draws=2", "--config.paths.samples_per_k=2", "--calls=1"],
             out=tmp_path / "b.jsonl")
  forwards = [r for r in rows if r["workload"] == "lm_forward"]
  assert [f["before"] for f in forwards] == ["E1", "E3", "E4", "painters", "E6"]
  timed = [r for r in rows if r not in forwards]
  assert [r["workload"] for r in timed] == ["lm_E1", "lm_E3", "lm_E4", "lm_painters", "lm_E6"]
  for row in timed:
    check_common(row, row["workload"])
    assert row["x_forward"] > 0 and row["n_branches"] == 8
  assert timed[0]["variants"] == 1 + 8 + 4  # intact, each branch, each layer
  assert timed[-1]["paths"] == 2 * 9  # lengths 0..8, 2 each, routed in complementary pairs
