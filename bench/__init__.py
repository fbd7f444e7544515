"""Benchmarks of PEFT Lab, run on demand (``python -m bench``); not part of the test suite."""
