"""A transformer trained here: training lowers the held-out loss, a resumed run ends in the
parameters of an uninterrupted one, the analyses read the trained model, the built-in corpus
splits by paragraph, and bad input is one line."""

import json
import shutil

import jax
import numpy as np
import pytest

from resnet_ensemble import lm_corpus, lm_study, lm_train, workdir as workdir_lib
from tests.conftest import lm_cli, lm_tiny_config

TRAIN = "the gate of a residual block multiplies its branch; deleting it leaves the skip. " * 12
HELD_OUT = "the gate of a residual block multiplies its branch; a deleted block leaves its skip. " * 3


@pytest.fixture
def texts(tmp_path):
  (tmp_path / "train.txt").write_text(TRAIN)
  (tmp_path / "held.txt").write_text(HELD_OUT)
  return tmp_path


def _config(texts, **over):
  return lm_tiny_config(texts / "held.txt", **{
      "data.train_text": str(texts / "train.txt"), "train.steps": 12, "train.batch_size": 4,
      "train.warmup_steps": 2, "train.learning_rate": 3e-3, "train.log_every": 4,
      "train.eval_every": 6, "train.checkpoint_every": 6, **over})


def _train(config, workdir):
  s = lm_study.load(config, workdir, restore=False)
  with workdir_lib.lock(workdir):
    return lm_train.train(config, workdir, s.model, s.train_tokens, s.windows)


def test_training_lowers_the_held_out_loss(texts):
  c = _config(texts, **{"train.steps": 40})
  s = lm_study.load(c, restore=False)
  params = s.model.init(jax.random.key(c.seed), s.windows[:1, :-1])["params"]
  before = lm_train.make_held_out_eval(s.model, s.windows, 8)(params)["held_out_loss"]
  _, final = _train(c, str(texts / "w"))
  assert final["step"] == 40 and final["tokens_seen"] == 40 * 4 * c.data.window
  # bytes of a repeated sentence: far below the uniform 5.5 nats after 40 steps
  assert final["held_out_loss"] < before - 1.0, (before, final)
  rows = [json.loads(line) for line in open(texts / "w" / "metrics.jsonl")]
  assert [r["step"] for r in rows if "train_loss" in r] == [4, 8, 12, 16, 20, 24, 28, 32, 36, 40]
  assert [r["step"] for r in rows if "held_out_loss" in r] == [6, 12, 18, 24, 30, 36, 40]


def test_a_resumed_run_ends_in_the_parameters_of_an_uninterrupted_one(texts):
  c = _config(texts)
  whole, interrupted = str(texts / "whole"), str(texts / "cut")
  params, final = _train(c, whole)
  shutil.copytree(whole, interrupted)
  shutil.rmtree(f"{interrupted}/checkpoints/12")       # as if stopped after step 6's checkpoint
  (texts / "cut" / "final_metrics.json").unlink()
  resumed, resumed_final = _train(c, interrupted)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert resumed_final == final
  # the rows after step 6 were written once
  steps = [json.loads(line)["step"] for line in open(texts / "cut" / "metrics.jsonl")]
  assert steps == [json.loads(line)["step"] for line in open(texts / "whole" / "metrics.jsonl")]
  # the analyses read the trained parameters from the workdir
  restored = lm_study.load(c, whole).variables["params"]
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(restored)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_resuming_with_another_model_is_refused_and_keeps_the_run(texts):
  _train(_config(texts), str(texts / "w"))
  with pytest.raises(workdir_lib.ConfigMismatchError, match="model.d_model"):
    _train(_config(texts, **{"model.d_model": 32}), str(texts / "w"))
  assert workdir_lib.trained(str(texts / "w"), 12)


def test_the_analyses_refuse_an_unfinished_run(texts):
  c = _config(texts)
  with pytest.raises(ValueError, match="no finished training of 12 steps .*--mode=train"):
    lm_study.load(c, str(texts / "nothing"))


def test_python_docs_splits_every_tenth_distinct_paragraph():
  text = "\n\n".join(f"p{i}" for i in range(25)) + "\n\np9\n\np3\n\np25"  # p9, p3 repeated
  train, held = lm_corpus.split_paragraphs(text)
  assert held == "p9\n\np19\n" and train.split("\n\n")[-1] == "p25\n"
  assert "p9" not in train.split("\n\n") and train.count("p3\n") == 1
  corpus = lm_corpus.python_docs()
  a = corpus.about
  assert a["licence"].startswith("PSF") and a["train_bytes"] > 300_000
  assert 0.05 < a["held_out_bytes"] / (a["train_bytes"] + a["held_out_bytes"]) < 0.2
  held_paragraphs = set(corpus.held_out.split("\n\n"))
  assert not held_paragraphs & set(corpus.train.split("\n\n"))


@pytest.mark.slow
def test_cli_all_trains_analyses_and_reports_the_training(texts):
  w = texts / "run"
  args = ["--config=configs/lm_bytes.py", "--config.data.window=16", "--config.data.max_windows=8",
          "--config.model.n_layers=2", "--config.model.d_model=16", "--config.model.d_ff=32",
          "--config.model.max_positions=16", "--config.lesion.max_k=2", "--config.lesion.draws=2",
          "--config.lesion.reorder_max_swaps=1", "--config.lesion.reorder_draws=2",
          "--config.lesion.shuffles=1", "--config.paths.samples_per_k=2",
          f"--config.data.text={texts / 'held.txt'}",
          f"--config.data.train_text={texts / 'train.txt'}", "--config.train.steps=8",
          "--config.train.log_every=4", "--config.train.eval_every=4",
          "--config.train.warmup_steps=2", f"--workdir={w}"]
  early = lm_cli(*args, "--mode=lesion")
  assert early.returncode == 2 and "--mode=train" in early.stderr.strip().splitlines()[-1]
  proc = lm_cli(*args, "--mode=all")
  assert proc.returncode == 0, proc.stderr[-3000:]
  final = json.loads((w / "final_metrics.json").read_text())
  lesion = json.loads((w / "lesion.json").read_text())
  assert lesion["model_source"].startswith("trained here (8 steps")
  # the analyses' intact model is the trained one: its held-out loss is the training's last
  assert lesion["baseline"]["loss"] == pytest.approx(final["held_out_loss"], rel=1e-5)
  report = (w / "report.md").read_text()
  assert "## Training" in report and (w / "lm_training.png").stat().st_size > 0
  assert f"{final['held_out_loss']:.3f}" in report
  # the analyses alone, in a new process, restore the same model
  again = lm_cli(*args, "--mode=lesion")
  assert again.returncode == 0, again.stderr[-2000:]
  assert json.loads((w / "lesion.json").read_text())["baseline"] == lesion["baseline"]


@pytest.mark.parametrize("extra, message", [
    (["--config.weights=somewhere"], "set one of them"),
    (["--config.data.corpus=wikipedia"], "is not a corpus; valid: python_docs"),
    (["--config.data.corpus=python_docs"], "--config.data.text must be empty"),
    (["--config.data.train_text="], "needs a training text"),
    (["--config.data.window=128", "--config.model.max_positions=128"], "fewer than one window"),
])
def test_bad_training_input_is_one_line_and_exit_2(texts, extra, message):
  (texts / "short.txt").write_text("too short")
  args = ["--config=configs/lm_bytes.py", f"--config.data.text={texts / 'held.txt'}",
          f"--config.data.train_text={texts / 'short.txt'}", "--config.train.steps=4",
          f"--workdir={texts / 'w'}", "--mode=train", *extra]
  if "--config.data.window=128" not in extra:
    args[2] = f"--config.data.train_text={texts / 'train.txt'}"
  proc = lm_cli(*args)
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 2 and message in lines[-1], proc.stderr[-2000:]
  assert not (texts / "w").exists()


def test_the_published_model_reproduces_its_published_numbers():
  """results/lm_python_docs/model (the Hugging Face folder training wrote) read back by the
  importer gives the intact numbers lesion.json publishes, on the same held-out windows."""
  import os
  from resnet_ensemble import lm_eval, transformer_import
  from tests.conftest import REPO
  published = os.path.join(REPO, "results", "lm_python_docs")
  lesion = json.load(open(os.path.join(published, "lesion.json")))
  corpus = lm_corpus.python_docs()
  if corpus.about["held_out_sha256"] != lesion["corpus"]["held_out_sha256"]:
    pytest.skip(f"this Python's pydoc topics differ from those of the published run "
                f"({lesion['corpus']['source']})")
  model = transformer_import.load(os.path.join(published, "model"), tokenizer=False)
  window, n = lesion["window"], lesion["windows"]
  windows = lm_eval.windows(lm_eval.byte_tokens(corpus.held_out), window)[:n]
  got = lm_train.make_held_out_eval(model.model, windows, 32)(model.variables["params"])
  assert got["held_out_loss"] == pytest.approx(lesion["baseline"]["loss"], rel=1e-5)
  assert got["held_out_error"] == pytest.approx(lesion["baseline"]["error"], abs=1 / (n * window))
