"""Issue 6's table from a bench.jsonl: ours | the reference in the same call | target | ratio.

    python bench/table.py $OUT/bench.jsonl

Reads every JSON line (other lines are ignored); where a workload was measured twice the last
row wins. Where the same call has no PyTorch row (torch missing, a step cut by its timeout),
the reference cell shows the earlier measurement from the issue, marked "(earlier)". Ratios
say how many times faster ours is (> 1: ours faster); for the gated train steps, the step's
cost relative to the full step.
"""

from __future__ import annotations

import json
import sys

# The "reference measured here" (H100), used only when the same call has none.
EARLIER = {"compile1024": 29_500, "eager1024": 20_200, "eager128_ms": 26.7, "eval": 82_000,
           "lesion_E1": 7.2, "paths_E6": 1_357.0}


def read(path: str) -> list[dict]:
  rows = []
  with open(path) as f:
    for line in f:
      line = line.strip()
      if line.startswith("{"):
        try:
          rows.append(json.loads(line))
        except json.JSONDecodeError:
          pass
  return rows


def pick(rows: list[dict], **match) -> dict | None:
  """The last measured row (not skipped, not failed) whose fields equal ``match``."""
  for row in reversed(rows):
    if "skipped" in row or "error" in row:
      continue
    if all(row.get(k) == v for k, v in match.items()):
      return row
  return None


def by_batch(rows: list[dict], largest: bool, **match) -> dict | None:
  """Of the measured rows matching ``match``, the last one at the largest (or smallest) batch:
  the table's "batch 1024" and "batch 128" rows, whatever sizes a smoke run used."""
  found = [r for r in rows if "skipped" not in r and "error" not in r and "batch" in r
           and all(r.get(k) == v for k, v in match.items())]
  if not found:
    return None
  best = (max if largest else min)(r["batch"] for r in found)
  return [r for r in found if r["batch"] == best][-1]


def fastest(rows: list[dict], workload: str, key: str) -> tuple[dict | None, str]:
  """The JAX row of ``workload`` with the smallest ``key`` over the forms of the lesion
  variants' weights (one row per form), and a note on the other forms' values."""
  found = {}
  for r in rows:  # the last row of each form
    if r.get("impl") == "jax" and r.get("workload") == workload and key in r:
      found[r.get("variant_weights")] = r
  if not found:
    return None, ""
  best = min(found.values(), key=lambda r: r[key])
  others = "".join(f"; {projected(r, key)} {f}" for f, r in found.items()
                   if r is not best and f)
  return best, others


def groups(row: dict) -> str:
  """The eval row's convolution groups (``eval_forward.py --groups``), if more than one."""
  return f", {row['groups']} conv groups" if row.get("groups", 1) > 1 else ""


def form(row: dict, sep: str = "; ") -> str:
  """The lesion row's weights form (``lesion.variant_weights``), if it has one."""
  f = row.get("variant_weights")
  return f"{sep}weights {f.replace('_', ' ')}" if f else ""


def rate(v: float | None) -> str:
  if v is None:
    return "—"
  return f"{v / 1000:.1f}k img/s" if v >= 1000 else f"{v:.0f} img/s"


def secs(v: float | None) -> str:
  if v is None:
    return "—"
  return f"{v:,.0f} s" if v >= 100 else f"{v:.2f} s" if v < 10 else f"{v:.1f} s"


def times(a: float | None, b: float | None) -> float | None:
  """a / b, or None when either is missing."""
  return a / b if a and b else None


def ratio(r: float | None, what: str = "") -> str:
  return "—" if r is None else f"{r:.2f}x{(' ' + what) if what else ''}"


def met(ok: bool | None) -> str:
  return "" if ok is None else " ✅" if ok else " ❌"


def projected(row: dict | None, key: str = "projected_s") -> str:
  if row is None:
    return "—"
  s = secs(row.get(key, row.get("seconds")))
  return s if row.get("complete", True) else f"~{s} (projected)"


def table(rows: list[dict]) -> str:
  jax_ = lambda **m: pick(rows, impl="jax", **m)
  torch_ = lambda **m: pick(rows, impl="torch", **m)
  out = []
  # --- train, batch 1024
  ours = by_batch(rows, True, impl="jax", workload="train")
  tc = by_batch(rows, True, impl="torch", workload="train", compiled=True)
  te = by_batch(rows, True, impl="torch", workload="train", compiled=False, dtype="bfloat16")
  ref_c = tc["img_per_s"] if tc else EARLIER["compile1024"]
  ref_e = te["img_per_s"] if te else EARLIER["eager1024"]
  o = ours["img_per_s"] if ours else None
  ok = None if o is None else (o >= 45_000 and o >= 1.5 * ref_c)
  out.append(("train ResNet-110, batch 1024",
              f"{rate(o)} ({ours['ms_per_step']:.2f} ms/step)" if ours else "—",
              f"torch.compile {rate(ref_c)}{'' if tc else ' (earlier)'}; eager "
              f"{rate(ref_e)}{'' if te else ' (earlier)'}",
              f"≥ 45k img/s and ≥ 1.5x torch.compile{met(ok)}",
              f"{ratio(times(o, ref_c), 'torch.compile')}, {ratio(times(o, ref_e), 'eager')}"))
  # --- train, batch 128
  ours = by_batch(rows, False, impl="jax", workload="train")
  t32 = by_batch(rows, False, impl="torch", workload="train", dtype="float32", compiled=False)
  t16 = by_batch(rows, False, impl="torch", workload="train", dtype="bfloat16", compiled=False)
  ref = t32["ms_per_step"] if t32 else EARLIER["eager128_ms"]
  o = ours["ms_per_step"] if ours else None
  out.append(("train, batch 128 (paper recipe)",
              f"{o:.2f} ms/step ({rate(ours['img_per_s'])})" if ours else "—",
              f"eager fp32 {ref:.1f} ms/step{'' if t32 else ' (earlier)'}"
              + (f"; eager bf16 {t16['ms_per_step']:.1f} ms" if t16 else ""),
              f"≤ 5 ms/step{met(None if o is None else o <= 5)}",
              ratio(times(ref, o), "eager fp32")))
  # --- eval forward
  evals = [r for r in rows if r.get("impl") == "jax" and r.get("workload") == "eval"
           and "img_per_s" in r]
  ours = max(evals, key=lambda r: r["img_per_s"]) if evals else None
  t = torch_(workload="eval")
  ref = t["img_per_s"] if t else EARLIER["eval"]
  o = ours["img_per_s"] if ours else None
  out.append(("eval forward",
              f"{rate(o)} (batch {ours['batch']:,}{groups(ours)})" if ours else "—",
              f"{rate(ref)}{'' if t else ' (earlier)'}",
              f"≥ 250k img/s{met(None if o is None else o >= 250_000)}",
              ratio(times(o, ref))))
  # --- E1
  ours, others = fastest(rows, "lesion_E1", "seconds")
  t = torch_(workload="lesion_E1")
  ref = t["seconds"] if t else EARLIER["lesion_E1"]
  o = ours["seconds"] if ours else None
  out.append(("E1: 54 single-block lesions on 10k test images",
              f"{secs(o)} ({ours['variants_per_s']:.1f} variants/s{form(ours)}){others}"
              if ours else "—",
              f"{secs(ref)}{'' if t else ' (earlier)'}",
              f"≤ 1 s{met(None if o is None else o <= 1)}", ratio(times(ref, o))))
  # --- lesion suite
  ours, others = fastest(rows, "lesion_suite", "projected_s")
  o = ours["projected_s"] if ours else None
  out.append(("full lesion suite (E1 + E3 100 draws x 21 k + E4 50 x 30)",
              f"{projected(ours)}, {ours['variants']:,} variants{form(ours, ', ')}{others}"
              if ours else "—", "—", f"≤ 60 s{met(None if o is None else o <= 60)}", "—"))
  # --- E6
  ours = jax_(workload="paths_E6")
  t = torch_(workload="paths_E6")
  ref = t["projected_s"] if t else EARLIER["paths_E6"]
  if t and ours:  # the reference's time per path, for as many paths as ours sampled
    ref = t["s_per_path"] * ours["paths"]
  o = ours["projected_s"] if ours else None
  out.append(("E6: 55 lengths x 1,000 paths, batch 128",
              f"{projected(ours)} ({ours['paths_per_s']:,.0f} paths/s)" if ours else "—",
              f"≈ {secs(ref)} (one path per backward){'' if t else ' (earlier)'}",
              f"≤ 20 s{met(None if o is None else o <= 20)}", ratio(times(ref, o))))
  # --- compile
  compiles = {}
  for r in rows:
    if r.get("impl") == "jax" and r.get("compile_s") is not None and "skipped" not in r:
      batched = r["workload"].split("[")[0] in ("train", "eval")
      name = r["workload"] + (f"@{r['batch']}" if batched else "")
      name += f"/g{r['groups']}" if r.get("groups", 1) > 1 else ""
      name = "lesion" if name.startswith("lesion") else name
      compiles[name] = r["compile_s"]
  worst = max(compiles.values()) if compiles else None
  out.append(("compile time per program",
              (f"max {secs(worst)} (" + ", ".join(f"{k} {v:.1f}" for k, v in compiles.items())
               + ")") if compiles else "—", "—",
              f"≤ 30 s{met(None if worst is None else worst <= 30)}", "—"))
  # --- gated train steps vs the full step
  for workload, label in (
      ("train_effective", "effective paths (k=23) train step, batch 128"),
      ("train_effective_multiply", "the same, gated-off blocks computed (multiply form)"),
      ("train_stochastic_depth", "stochastic depth train step, batch 128"),
      ("train_stochastic_depth_multiply", "the same, gated-off blocks computed (multiply form)")):
    ours = by_batch(rows, False, impl="jax", workload=workload)
    full = ours and jax_(workload="train", batch=ours["batch"])
    out.append((label, f"{ours['ms_per_step']:.2f} ms/step" if ours else "—",
                f"full step {full['ms_per_step']:.2f} ms (ours)" if full else "—", "—",
                ratio(times(ours and ours["ms_per_step"], full and full["ms_per_step"]),
                      "the full step's time")))
  lines = ["| workload | ours | reference (same call) | target | ratio |",
           "| --- | --- | --- | --- | --- |"]
  lines += ["| " + " | ".join(cells) + " |" for cells in out]
  return "\n".join(lines)


def header(rows: list[dict]) -> str:
  j = next((r for r in rows if r.get("impl") == "jax" and "device" in r), None)
  t = next((r for r in rows if r.get("workload") == "torch_env"), None)
  parts = []
  if j:
    parts.append(f"{j['device']} x{j.get('devices', 1)}, jax {j.get('jax', '?')}")
  if t:
    parts.append(f"torch {t['torch']}" if "torch" in t and "skipped" not in t
                 else f"torch: {t.get('skipped', '?')}")
  models = sorted({r["model"] for r in rows if "model" in r and "skipped" not in r})
  if models:
    parts.append("models " + ", ".join(models))
  stamps = sorted(r["time"] for r in rows if "time" in r)
  if stamps:
    parts.append(f"{stamps[0]} .. {stamps[-1]}")
  return "Measured on " + "; ".join(parts) if parts else "No measurements."


def notes(rows: list[dict]) -> str:
  """Steps that did not finish (from run_all.sh) and rows skipped or failed."""
  lines = []
  for r in rows:
    if r.get("workload") == "step" and r.get("status") != "ok":
      lines.append(f"- step {r['step']}: {r['status']} (rc {r.get('rc')}, {r.get('wall_s')} s "
                   f"of {r.get('timeout_s')} s)")
    elif "skipped" in r and r.get("workload") != "step":
      lines.append(f"- {r.get('impl', '')} {r.get('row', r['workload'])}: skipped ({r['skipped']})")
    elif "error" in r:
      lines.append(f"- {r.get('impl', '')} {r.get('row', r['workload'])}: {r['error'][:200]}")
  return "\n".join(lines)


def variants(rows: list[dict]) -> str:
  """Train steps under trial settings (``train_step.py --variant``) beside the plain step."""
  lines = []
  for r in rows:
    w = r.get("workload", "")
    if "[" not in w or "skipped" in r or "error" in r:
      continue
    base = pick(rows, impl="jax", workload=w.split("[")[0], batch=r["batch"])
    if "paths_per_s" in r:  # E6: the plain row is the paired one
      lines.append(f"| {w} batch {r['batch']} | {secs(r['projected_s'])} "
                   f"({r['paths_per_s']:,.0f} paths/s) | "
                   f"{secs(base['projected_s']) if base else '—'} | "
                   f"{ratio(times(r['projected_s'], base and base['projected_s']))} (the plain "
                   f"row's speed-up over this) | {r.get('compile_s', 0):.1f} s | "
                   f"`{r.get('xla_flags') or '—'}` |")
      continue
    if "ms_per_step" not in r:
      continue
    ref = f"{base['ms_per_step']:.2f} ms" if base else "—"
    lines.append(f"| {w} batch {r['batch']} | {r['ms_per_step']:.2f} ms ({rate(r['img_per_s'])}) "
                 f"| {ref} | {ratio(times(base and base['ms_per_step'], r['ms_per_step']))} "
                 f"| {r.get('compile_s', 0):.1f} s | `{r.get('xla_flags') or '—'}` |")
  together = {}  # concurrent.sh copies: their throughput adds up
  for r in rows:
    if "proc]" in r.get("workload", "") and "img_per_s" in r and "skipped" not in r:
      together.setdefault((r["workload"], r["batch"]), []).append(r["img_per_s"])
  for (w, batch), rates in together.items():
    base = pick(rows, impl="jax", workload=w.split("[")[0], batch=batch)
    lines.append(f"| {w} batch {batch}: the {len(rates)} copies together | {rate(sum(rates))} "
                 f"| {rate(base and base['img_per_s'])} "
                 f"| {ratio(times(sum(rates), base and base['img_per_s']))} | — | — |")
  if not lines:
    return ""
  return "\n".join(["| variant | step | plain step | speed-up | compile | XLA_FLAGS |",
                    "| --- | --- | --- | --- | --- | --- |"] + lines)


def ratios(rows: list[dict]) -> str:
  """Each analysis over the plain pass it is made of, both timed in the same process: E1/E3/E4
  and the suite per variant-image over the forward per image (``x_forward``), E6 per path over
  a forward + backward (``x_fwd_bwd``). Comparable across a noisy CPU and any GPU."""
  lines = []
  for r in rows:
    if r.get("impl") != "jax" or "skipped" in r or "error" in r:
      continue
    w = r.get("workload", "")
    if "x_forward" in r:
      lines.append(f"| {w.replace('lesion_', '')} | {r.get('variant_weights', '—')} "
                   f"| {r.get('images', '—')} images, chunk {r.get('chunk', '—')} "
                   f"| {r['forward_ms_per_img']:.3f} ms/img forward | {r['x_forward']:.2f}x"
                   f"{'' if r.get('complete', True) else ' (projected)'} |")
    elif "x_fwd_bwd" in r:
      lines.append(f"| {w} | — | batch {r['batch']}, chunk {r['chunk']} "
                   f"| {r['fwd_bwd_ms']:.2f} ms forward + backward | {r['x_fwd_bwd']:.2f}x |")
  if not lines:
    return ""
  return "\n".join(["| analysis | form | size | plain pass (same process) | cost per variant-image"
                    " (E6: per path) / plain pass |", "| --- | --- | --- | --- | --- |"] + lines)


def profiles(rows: list[dict]) -> str:
  """One line per ``profile`` row (run_all.sh with PROFILE_DIR): where the device time goes."""
  lines = []
  for r in rows:
    if r.get("workload") != "profile" or not r.get("kernels"):
      continue
    of = r["of"]
    kinds = ", ".join(f"{k} {100 * v:.0f} %" for k, v in list(r["share_by_category"].items())[:3])
    top = r["top_kernels"][0] if r["top_kernels"] else {"name": "—", "share": 0}
    what = f"{of['workload']} batch {of.get('batch', '—')}{groups(of)}{form(of, ', ')}"
    lines.append(f"| {what} | {r['kernels_per_step']:.0f} "
                 f"| {r['ms_per_step_window']:.2f} ms | {100 * r['idle_share']:.0f} % "
                 f"| {r['median_kernel_us']:.1f} us | {kinds} | {top['name'][:60]} "
                 f"({100 * top['share']:.0f} %) |")
  if not lines:
    return ""
  return "\n".join(["| profiled call | kernels/step | device window/step | idle | median "
                    "kernel | time by kind | top kernel |",
                    "| --- | --- | --- | --- | --- | --- | --- |"] + lines)


def main(argv: list[str]) -> int:
  if len(argv) != 2:
    print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
    return 2
  rows = read(argv[1])
  print(header(rows) + "\n\n" + table(rows))
  against = ratios(rows)
  if against:
    print("\nAnalyses over the plain pass they are made of (same process):\n\n" + against)
  tried = variants(rows)
  if tried:
    print("\nSettings tried on the train step (same call):\n\n" + tried)
  profiled = profiles(rows)
  if profiled:
    print("\nWhere the device time goes (one traced call each, bench/trace_summary.py):\n\n"
          + profiled)
  extra = notes(rows)
  if extra:
    print("\n" + extra)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
