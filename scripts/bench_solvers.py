"""Solver benchmark: accuracy vs an exact ODE solution, per-step overhead vs diffusers, end-to-end cost.

    python scripts/bench_solvers.py --quick --out bench_solvers.json
    python scripts/bench_solvers.py --device cuda --out bench_solvers_cuda.json

Prints rich tables and writes the numbers as JSON (see trajgen.bench.solvers.run_solver_benchmark).
"""

from __future__ import annotations

import argparse

from trajgen.bench.solvers import print_solver_tables, run_solver_benchmark


def main(argv: list[str] | None = None) -> dict:
    """Parse the command line, run the benchmark, print its tables; returns the result dict."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small batch and few repeats (< 1 minute)")
    parser.add_argument("--out", metavar="FILE", default=None, help="write the JSON result here")
    parser.add_argument("--device", default="cpu", help="device of the end-to-end part: cpu or cuda")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for accuracy and CPU end-to-end (overhead always uses 1)")
    args = parser.parse_args(argv)
    result = run_solver_benchmark(quick=args.quick, out=args.out, device=args.device, threads=args.threads)
    print_solver_tables(result)
    if args.out:
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
