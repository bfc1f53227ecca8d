"""The benchmarks (run by hand, results in bench/RESULTS.md), importable as modules: ``from bench import
quality_powered``. Each script also runs as ``python bench/NAME.py``."""
