"""One-off measurement programs, kept out of the library: each is run as a script
(``python tools/jpeg_gap.py ...``, with the package installed) and reads the package's own
modules; the tests import them as ``tools.<name>`` from the repository root."""
