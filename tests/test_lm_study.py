"""The transformer experiments: each vmapped variant equals the model called directly with that
branch deleted or that order, routed path gradients equal the chain of branch Jacobians, and the
command line writes every result and figure, or one line and exit 2 for bad input."""

import itertools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_ensemble import (lesion, lm_study, lm_variants, path_counts,
                             path_gradients, transformer)
from tests.conftest import (LM_LAYERS, LM_WINDOW, lm_cli, lm_tiny_config, reference_measures,
                            write_tokenizer)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQ, LAYERS = LM_WINDOW, LM_LAYERS
TEXT = ("Residual networks behave like ensembles of relatively shallow networks. "
        "Deleting a single layer barely changes the error. ") * 2


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def study(request, tmp_path_factory):
  """(subject, lesion.json, gradients.json) of a tiny random GPT-2 or Llama (rotary positions,
  SwiGLU, RMSNorm) on byte windows."""
  d = tmp_path_factory.mktemp("lm")
  (d / "text.txt").write_text(TEXT)
  c = lm_tiny_config(d / "text.txt", **{"model.name": request.param})
  s = lm_study.load(c)
  return s, lm_study.run_lesion(c, str(d / "w"), s), lm_study.run_gradients(c, str(d / "w"), s)


def _direct(s, gates, order=None):
  return reference_measures(s.model, s.variables, s.windows, np.asarray(gates, np.float32),
                             order)


def _close(got, want):
  for k in ("loss", "kl"):
    np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=1e-6, err_msg=k)
  np.testing.assert_allclose(got["error"], 1.0 - want["top1"], atol=1e-6)


def test_e1_equals_deleting_each_branch_and_layer_directly(study):
  s, out, _ = study
  n = 2 * LAYERS
  assert out["single"]["branch"] == list(s.layout.branch_names)
  assert out["baseline"]["kl"] == pytest.approx(0.0, abs=1e-6)
  for b in range(n):
    want = _direct(s, transformer.branch_gates(n, [b]))
    _close({k: out["single"][k][b] for k in ("loss", "kl", "error")}, want)
  for l in range(LAYERS):
    want = _direct(s, transformer.layer_gates(np.eye(LAYERS)[l] == 0))
    _close({k: out["single_layer"][k][l] for k in ("loss", "kl", "error")}, want)


def test_e3_deletes_k_branches_and_keeps_the_ends_when_asked():
  rng = np.random.default_rng(0)
  for keep in (False, True):
    g = lm_variants.random_deletion_gates(rng, 4, 3, 20, keep_ends=keep)
    assert (g.sum(1) == 8 - 3).all()
    if keep:
      assert (g[:, :2] == 1).all() and (g[:, -2:] == 1).all()
  with pytest.raises(ValueError, match="4 eligible"):
    lm_variants.random_deletion_gates(rng, 4, 5, 1, keep_ends=True)


def test_e4_swaps_and_painters_equal_the_order_applied_directly(study):
  s, out, _ = study
  ones = np.ones(2 * LAYERS)
  for pair, loss, kl in zip(out["adjacent_swaps"]["pairs"], out["adjacent_swaps"]["loss"],
                            out["adjacent_swaps"]["kl"]):
    order = list(range(LAYERS))
    order[pair[0]], order[pair[1]] = order[pair[1]], order[pair[0]]
    want = _direct(s, ones, order)
    assert loss == pytest.approx(want["loss"], rel=1e-4) and kl == pytest.approx(want["kl"],
                                                                                  rel=1e-4)
  # Painters variants are padded to L + 1 positions (a spare layer with gates 0): each row
  # equals its layers run on their own, unpadded.
  rows = out["painters"]["rows"]
  assert [r["name"].split()[0] for r in rows] == ["intact", "repeat", "reverse", "shuffle",
                                                  "skip"]
  assert rows[1]["order"] == [0, 1, 1, 2] and rows[-1]["order"] == [0, 2]
  for r in rows:
    want = _direct(s, np.ones(2 * len(r["order"])), r["order"])
    assert r["loss"] == pytest.approx(want["loss"], rel=1e-4), r["name"]
    assert r["kl"] == pytest.approx(want["kl"], rel=1e-4, abs=1e-6), r["name"]
  tau = np.asarray(out["reorder"]["tau"])
  assert tau.shape == (2, 2) and (tau < 1).all()


def test_kendall_tau_known_values():
  assert lesion.kendall_tau([0, 1, 2, 3]) == 1.0
  assert lesion.kendall_tau([3, 2, 1, 0]) == -1.0
  np.testing.assert_allclose(lm_variants.kendall_taus(lm_variants.adjacent_swap_orders(4)),
                             [2 / 3] * 3)  # one discordant pair of 6
  assert lesion.kendall_tau([1, 0, 3, 2]) == pytest.approx(1 / 3)
  orders = lm_variants.random_swap_orders(np.random.default_rng(0), 5, 3, 10)
  assert all(sorted(o) == list(range(5)) for o in orders)


def test_painters_pad_to_one_program():
  p = lm_variants.painters(np.random.default_rng(0), 8, 2)
  assert lm_variants.middle_span(8) == (2, 6)
  assert p.orders.shape == (6, 9) and p.gates.shape == (6, 18)
  for run, order, gates in zip(p.runs, p.orders, p.gates):
    assert list(order[:len(run)]) == run and gates.sum() == 2 * len(run)
  assert p.runs[2] == [0, 1, 5, 4, 3, 2, 6, 7] and p.runs[-1] == [0, 1, 6, 7]
  with pytest.raises(ValueError, match="no middle span"):
    lm_variants.middle_span(2)


def test_e5_counts_paths_over_2l_branches(study):
  _, _, paths = study
  n = 2 * LAYERS
  assert paths["n"] == n and sum(paths["path_counts"]) == 2 ** n
  assert paths["path_counts"] == path_counts.path_counts(n)
  g = paths["gradient"]
  assert g["k"] == list(range(n + 1)) and all(v is not None for v in g["log10_mean_norm"])
  lo, hi = paths["effective_interval"]
  assert 0 <= lo <= hi <= n


def test_routed_paths_are_the_chain_of_branch_jacobians(study):
  """All 2^(2L) routed paths sum to the gradient at the embedding output; a path through one
  branch b alone is g_n pulled back through f_b's Jacobian at the stream it reads, by hand."""
  s, _, _ = study
  model, v = s.model, s.variables
  w = jnp.asarray(s.windows[:2])
  tokens, targets = w[:, :-1], w[:, 1:].reshape(-1)
  u = transformer.unroll(model, v)
  y0 = u.embed(tokens)
  n = 2 * LAYERS

  def loss_from(y, start=0):
    for f in u.branches[start:]:
      y = y + f(y)
    logp = jax.nn.log_softmax(u.head(y).reshape(-1, model.vocab_size))
    return -jnp.mean(jnp.take_along_axis(logp, targets[:, None], 1))

  view = lm_study.path_view(model, v)
  g_n, bv, mv, ev = path_gradients.linearize(view, y0, targets)
  every = np.asarray(list(itertools.product([0.0, 1.0], repeat=n)), np.float32)
  g0, _ = jax.jit(jax.vmap(lambda sel: path_gradients.routed_backward(g_n, bv, mv, ev, sel)))(
      every)
  np.testing.assert_allclose(g0.sum(0), jax.grad(loss_from)(y0), rtol=1e-4, atol=1e-7)
  # One path by hand: through branch b only.
  b = 3
  ys = [y0]
  for f in u.branches:
    ys.append(ys[-1] + f(ys[-1]))
  grad_out = jax.grad(lambda y: loss_from(y, n))(ys[-1])
  _, vjp = jax.vjp(u.branches[b], ys[b])
  (by_hand,) = vjp(grad_out)
  np.testing.assert_allclose(g0[1 << (n - 1 - b)], by_hand, rtol=1e-4, atol=1e-8)
  # The compiled E6 program's norms are those paths' norms.
  sel = every[[0, 1 << (n - 1 - b)]]
  norms = lm_study.make_gradient_fn(model)(v, w[:2], jnp.asarray(sel))
  np.testing.assert_allclose(norms.float64()[:2], [np.linalg.norm(g0[0]),
                                                   np.linalg.norm(by_hand)], rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# The command line.


SMALL = ["--config=configs/lm_bytes.py", f"--config.data.window={SEQ}",
         "--config.data.max_windows=8", "--config.model.n_layers=3", "--config.model.d_model=16",
         "--config.model.d_ff=32", f"--config.model.max_positions={SEQ}",
         "--config.lesion.draws=2", "--config.lesion.max_k=2",
         "--config.lesion.reorder_max_swaps=2", "--config.lesion.reorder_draws=2",
         "--config.lesion.shuffles=1",
         "--config.paths.samples_per_k=2"]


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory):
  """A tiny random GPT-2 of 3 layers on bytes (vocabulary 256), saved by transformers."""
  import torch
  import transformers
  torch.manual_seed(0)
  config = transformers.GPT2Config(vocab_size=256, n_positions=SEQ, n_embd=16, n_layer=LAYERS,
                                   n_head=2, bos_token_id=0, eos_token_id=0)
  folder = tmp_path_factory.mktemp("gpt2")
  transformers.GPT2LMHeadModel(config).save_pretrained(folder)
  (folder / "text.txt").write_text(TEXT)
  return folder


FIGURES = ["lm_e1_single.png", "lm_e3_delete_k.png", "lm_e4_reorder.png",
           "fig6a_path_lengths.png", "fig6b_gradient_per_length.png", "fig6c_total_gradient.png",
           "fig7_deletion_removes_long_paths.png"]


@pytest.mark.slow
def test_cli_all_on_an_imported_gpt2_writes_every_result_and_figure(gpt2_folder, tmp_path):
  w = tmp_path / "w"
  text = gpt2_folder / "text.txt"
  proc = lm_cli(*SMALL, f"--config.weights={gpt2_folder}", "--config.data.tokenizer=bytes",
             f"--config.data.text={text}", f"--workdir={w}", "--mode=all")
  assert proc.returncode == 0, proc.stderr[-3000:]
  lesion_json = json.loads((w / "lesion.json").read_text())
  assert lesion_json["model_source"] == str(gpt2_folder)
  assert set(lesion_json) >= {"baseline", "single", "single_layer", "random", "random_keep_ends",
                              "adjacent_swaps", "reorder", "painters"}
  assert json.loads((w / "gradients.json").read_text())["gradient_at"] == "embedding output"
  report = (w / "report.md").read_text()
  for name in FIGURES:
    assert (w / name).stat().st_size > 1000 and name in report, name
  assert "painters interventions" in report and "Missing" not in report
  # One variant by hand: layers 2, 1, 0 with the first attention deleted.
  proc = lm_cli(*SMALL, f"--config.weights={gpt2_folder}", "--config.data.tokenizer=bytes",
             f"--config.data.text={text}", f"--workdir={w}", "--mode=eval",
             "--config.variant.order=(2, 1, 0)", "--config.variant.gates=(0, 1, 1, 1, 1, 1)")
  assert proc.returncode == 0, proc.stderr[-3000:]
  variant = json.loads((w / "variant.json").read_text())
  assert variant["order"] == [2, 1, 0] and variant["kl"] > 0


def _bad_folder(gpt2_folder, tmp_path, change):
  import shutil
  folder = tmp_path / "bad"
  shutil.copytree(gpt2_folder, folder)
  config = json.loads((folder / "config.json").read_text())
  config.update(change)
  (folder / "config.json").write_text(json.dumps(config))
  return folder


@pytest.mark.parametrize("case,args,message", [
    ("architecture", ["--config.model.name=bert"], "'bert' is not an architecture"),
    ("config key", ["--config.model.nlayers=3"], "unknown config field 'nlayers'"),
    ("folder architecture", [{"model_type": "bert"}], "bert"),
    ("shapes", [{"n_embd": 32}], "shape"),
    ("tokenizer", [{}], "has no tokenizer.json"),  # auto: the folder's
    ("short text", ["--config.data.window=60", "--config.model.max_positions=64",
                    "SHORT"], "shorter than one window"),
    ("gates", ["--mode=eval", "--config.variant.gates=(1., 0., 1.)"],
     "variant.gates has 3 entries"),
    ("order", ["--mode=eval", "--config.variant.order=(0, 3)"], "outside the 3 layers"),
])
def test_bad_input_is_one_line_and_exit_2(gpt2_folder, tmp_path, case, args, message):
  text = gpt2_folder / "text.txt"
  extra = []
  for a in args:
    if isinstance(a, dict):  # an imported folder, changed
      folder = _bad_folder(gpt2_folder, tmp_path, a) if a else gpt2_folder
      extra.append(f"--config.weights={folder}")
      if case != "tokenizer":
        extra.append("--config.data.tokenizer=bytes")
    elif a == "SHORT":
      (tmp_path / "short.txt").write_text("too short")
      text = tmp_path / "short.txt"
    else:
      extra.append(a)
  w = tmp_path / "w"
  proc = lm_cli(*SMALL, f"--config.data.text={text}", f"--workdir={w}", *extra)
  assert proc.returncode == 2, (case, proc.stderr[-3000:])
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("resnet_ensemble.lm: error: "), lines
  assert message in lines[0], lines[0]
  assert not w.exists()


def test_an_imported_folder_reads_the_text_with_its_own_tokenizer(gpt2_folder, tmp_path):
  import shutil
  from resnet_ensemble import lm_eval, transformer_import as ti
  folder = tmp_path / "with_tokenizer"
  shutil.copytree(gpt2_folder, folder)
  write_tokenizer(folder / ti.TOKENIZER_FILE)
  s = lm_study.load(lm_tiny_config(gpt2_folder / "text.txt", weights=str(folder), **{
      "data.window": 8}))
  assert s.tokenizer == str(folder / ti.TOKENIZER_FILE) and s.model.n_layers == LAYERS
  want = lm_eval.tokenize(ti.load_tokenizer(str(folder)), TEXT)
  np.testing.assert_array_equal(s.windows[0], want[:9])
