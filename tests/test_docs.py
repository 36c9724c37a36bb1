"""The docs name code that exists: every backticked `module.name` in README.md, DESIGN.md,
launch/README.md and bench/README.md that starts with a module of the package (or with
`tools.`, the measurement programs beside it) resolves to a top-level name of that module (or
a method of its class), unless it is a config field (`train.num_steps`, `config.stack`:
sections share names with modules)."""

import ast
import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "resnet_ensemble")
DOCS = ("README.md", "DESIGN.md", "launch/README.md", "bench/README.md")
TOKEN = re.compile(r"`([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)+)(?:\(\))?`")


def _module_file(parts: list[str]) -> str | None:
  base = os.path.join(REPO if parts[0] == "tools" else PACKAGE, *parts)
  for path in (base + ".py", os.path.join(base, "__init__.py")):
    if os.path.isfile(path):
      return path
  return None


def _names(path: str) -> dict[str, ast.AST]:
  """Top-level names a module defines (functions, classes, assignments, imports)."""
  tree = ast.parse(open(path).read())
  names: dict[str, ast.AST] = {}
  for node in tree.body:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
      names[node.name] = node
    elif isinstance(node, (ast.Assign, ast.AnnAssign)):
      targets = node.targets if isinstance(node, ast.Assign) else [node.target]
      for t in targets:
        for n in ast.walk(t):
          if isinstance(n, ast.Name):
            names[n.id] = node
    elif isinstance(node, (ast.Import, ast.ImportFrom)):
      for alias in node.names:
        names[(alias.asname or alias.name).split(".")[0]] = node
  return names


def cited() -> list[tuple[str, str]]:
  """(doc, `module.name`) for every citation whose first part is a module of the package."""
  out = []
  for doc in DOCS:
    text = open(os.path.join(REPO, doc)).read()
    for token in TOKEN.findall(text):
      parts = token.split(".")
      if parts[0] == "resnet_ensemble":
        parts = parts[1:]
      if parts and _module_file(parts[:1]) and parts[-1] not in ("py", "json", "md", "log"):
        out.append((doc, ".".join(parts)))
  return sorted(set(out))


def config_fields() -> set[str]:
  """Every config field and section, as dotted paths (the ResNet and the transformer configs)."""
  import importlib.util
  from resnet_ensemble import config as config_lib, lm_config
  configs = [config_lib.base_config(), lm_config.base_config()]
  for name in ("cifar10_pretrained", "imagenet_pretrained"):  # their own fields (weights, arch)
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "configs", name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    configs.append(module.get_config())
  fields = set()
  for c in configs:
    for key in config_lib.flatten(c):
      parts = key.split(".")
      fields.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
  return fields


def resolves(name: str) -> bool:
  field = name[len("config."):] if name.startswith("config.") else name
  if field in FIELDS:
    return True
  parts = name.split(".")
  for split in range(len(parts), 0, -1):  # the longest module prefix
    path = _module_file(parts[:split])
    if path is None:
      continue
    rest = parts[split:]
    if not rest:
      return True
    node = _names(path).get(rest[0])
    if node is None:
      return False
    if len(rest) == 1:
      return True
    if isinstance(node, ast.ClassDef) and len(rest) == 2:
      return any(getattr(n, "name", None) == rest[1] or
                 any(isinstance(t, ast.Name) and t.id == rest[1]
                     for t in getattr(n, "targets", []) + [getattr(n, "target", None)] if t)
                 for n in node.body)
    return False
  return False


def test_the_docs_cite_names():
  assert len(cited()) > 30  # the check reads the docs' citations, not nothing


FIELDS = config_fields()


@pytest.mark.parametrize("doc,name", cited())
def test_every_cited_module_name_exists(doc, name):
  assert resolves(name), f"{doc} cites `{name}`, which the package does not define"


# Tolerances README quotes, each beside the test that holds the bound: (README's words with the
# number as a group, the test file, the test's words with the same number as a group).
TOLERANCES = [
    (r"statistics within a relative (\S+), the momentum trace within (\S+)\)", "test_stack.py",
     r'"rtol": (\S+), "atol": (\S+) if "\[\'trace\'\]" in key'),
    (r"logits equal to `transformers`' within (\S+) in float32", "test_transformer.py",
     r"^TOL = (\S+)$"),
]


@pytest.mark.parametrize("readme,test_file,test_words", TOLERANCES)
def test_readme_tolerances_are_the_tests_bounds(readme, test_file, test_words):
  said = re.search(readme, open(os.path.join(REPO, "README.md")).read())
  held = re.search(test_words, open(os.path.join(REPO, "tests", test_file)).read(), re.M)
  assert said and held, (readme, test_words)
  assert [float(x.rstrip(",;")) for x in said.groups()] == [float(x) for x in held.groups()]
