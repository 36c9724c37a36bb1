"""absl flag parsing for the command lines, with every problem (a mistyped config field, a
missing or broken config file, a value of the wrong type, a stray argument) as one line and
exit 2 instead of a traceback or the usage text. Imports neither jax nor the package's modules: flags are parsed before jax loads."""

from __future__ import annotations

import sys


def parse_or_exit(flags, argv: list[str], prog: str, exit_code: int = 2,
                  fields_in: str = "resnet_ensemble/config.py") -> list[str]:
  """``flags(argv)``; on any problem one line ``PROG: error: ...`` on stderr and ``exit_code``
  (``fields_in``: the file an unknown config field is looked up in)."""
  try:
    rest = flags(argv)
    flags.config.get("seed")  # a config file that failed to load raises here, not at first use
  except Exception as e:  # noqa: BLE001 (flags and ml_collections raise many types)
    _exit(prog, describe(e, argv, fields_in), exit_code)
  if len(rest) > 1:
    _exit(prog, f"unexpected argument(s) {' '.join(rest[1:])!r}: every option is a flag "
          "(--config=FILE, --workdir=DIR, --mode=MODE, --config.a.b=value; a value with "
          "spaces is quoted as one word)", exit_code)
  return rest


def _exit(prog: str, message: str, exit_code: int) -> None:
  print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
  sys.exit(exit_code)


def describe(e: Exception, argv: list[str], fields_in: str = "resnet_ensemble/config.py") -> str:
  """The one line that says what was wrong with the flags."""
  lines = [line.strip() for line in str(e).replace("\\n", "\n").splitlines() if line.strip()]
  path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), "?")
  if "get_config" in str(e):
    return (f"cannot load the config file --config={path}: it defines no get_config() (a "
            "config file is a Python file whose get_config() returns the config; see configs/)")
  if "Failed loading config file" in str(e) or "Configuration is not available" in str(e):
    return f"cannot load the config file --config={path}: {lines[-1] if lines else e}"
  if isinstance(e, (AttributeError, KeyError)):
    name = lines[0].strip("'\\\"") if lines else str(e)
    given = [a for a in argv if a.startswith("--config.") and
             name in a.split("=", 1)[0].split(".")]
    hint = " ".join(lines[1:]).strip("'\\\"")
    return (f"unknown config field {name!r}" + (f" in {given[0]}" if given else "")
            + (f": {hint}" if hint else f" (every field is in {fields_in})"))
  return " ".join(" ".join(lines).split()) or repr(e)
