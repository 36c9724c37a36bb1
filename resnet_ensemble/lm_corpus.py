"""Texts a language model trains and is evaluated on, offline.

``python_docs``: the topics of the Python Language Reference and Library Reference that
CPython ships for ``help()`` (``pydoc_data.topics``: 79 topics, about 466 KB of English prose
with code examples in CPython 3.11; PSF License). Every Python installation has it, so a
machine without internet gets the same text; its bytes depend on the Python version, which is
why the corpus's description records the version and the SHA-256 of both halves.

The split is by paragraph: the topics in sorted order, cut at blank lines, each paragraph kept
once (the topics repeat whole paragraphs and tables: without that, 37 % of the held-out bytes
were paragraphs the model also trains on), then every tenth paragraph is held out. So the
held-out text covers every topic and shares no paragraph with the training text.
"""

from __future__ import annotations

import dataclasses
import hashlib
import platform

HELD_OUT_EVERY = 10       # every tenth paragraph is held out
CORPORA = ("python_docs",)


@dataclasses.dataclass(frozen=True)
class Corpus:
  train: str
  held_out: str
  about: dict          # name, source, licence, Python version, sizes and SHA-256 of each half


def _sha256(text: str) -> str:
  return hashlib.sha256(text.encode("utf-8")).hexdigest()


def split_paragraphs(text: str, every: int = HELD_OUT_EVERY) -> tuple[str, str]:
  """(train, held_out): the distinct paragraphs in order of first appearance; paragraph i goes
  to held_out when i % every == every - 1."""
  paragraphs = list(dict.fromkeys(p for p in text.split("\n\n") if p.strip()))
  held = [p for i, p in enumerate(paragraphs) if i % every == every - 1]
  train = [p for i, p in enumerate(paragraphs) if i % every != every - 1]
  return "\n\n".join(train) + "\n", "\n\n".join(held) + "\n"


def python_docs() -> Corpus:
  """The pydoc topics of this Python, split into training and held-out text."""
  from pydoc_data import topics  # part of CPython's standard library
  text = "\n\n".join(topics.topics[name] for name in sorted(topics.topics))
  train, held_out = split_paragraphs(text)
  about = {"name": "python_docs",
           "source": f"pydoc_data.topics of Python {platform.python_version()} "
                     f"({len(topics.topics)} topics of the Python documentation)",
           "licence": "PSF License (the Python documentation's)",
           "split": f"distinct paragraphs, every {HELD_OUT_EVERY}th held out",
           "train_bytes": len(train.encode("utf-8")), "held_out_bytes": len(held_out.encode("utf-8")),
           "train_sha256": _sha256(train), "held_out_sha256": _sha256(held_out)}
  return Corpus(train, held_out, about)


def load(name: str) -> Corpus:
  """The corpus called ``name``; a ValueError naming the valid ones otherwise."""
  if name == "python_docs":
    return python_docs()
  raise ValueError(f"--config.data.corpus={name!r} is not a corpus; valid: {', '.join(CORPORA)} "
                   "(or leave it empty and name text files in --config.data.text and "
                   "--config.data.train_text)")
