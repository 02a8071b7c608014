"""Benchmarks: library code behind ``scripts/bench_*.py`` (each prints rich tables and writes JSON)."""

from trajgen.bench.solvers import print_solver_tables, run_solver_benchmark

__all__ = ["print_solver_tables", "run_solver_benchmark"]
