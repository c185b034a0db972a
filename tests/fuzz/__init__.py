"""Fuzz targets for every parser of untrusted bytes (``targets.py``), how one input is judged (``engine.py``),
and the long run: ``python -m tests.fuzz --minutes 30`` (``__main__.py``). ``tests/test_fuzz.py`` runs each
target for a short fixed budget in every test run."""
