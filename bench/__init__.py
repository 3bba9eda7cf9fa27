"""Benchmarks: each module's ``main()`` prints a table and writes JSON under ``bench/results/``."""
