"""Before / after table of offline-benchmark cells re-evaluated with new inference options.

When only a config's inference fields change (e.g. ``trajectory-diffuser.t_mid``), ``scripts/bench_offline.py``
evaluates a finished cell again with its trained weights and keeps the old result as ``result.superseded-0.json``.
This prints, per env x level x algorithm, the mean D4RL-normalised score over the seeds that have both results:

    python scripts/compare_superseded.py --out-dir runs/bench_offline_cpu
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from trajgen.bench.offline import format_score, score_summary


def paired_rows(out_dir: Path, superseded: str = "result.superseded-0.json") -> list[dict[str, Any]]:
    """One row per env/level/algo with superseded cells: ``{env, level, algo, seeds, changed, before, after}``;
    ``changed`` maps each differing config field to (before, after), ``before`` / ``after`` are per-seed means and
    ``before_scores`` / ``after_scores`` the per-episode scores of each seed.

    Raises ValueError when a pair was not trained identically (then it is not a re-evaluation)."""
    groups: dict[tuple[str, str, str], dict[str, Any]] = {}
    for old_file in sorted(out_dir.glob(f"cells/*/*/*/seed*/{superseded}")):
        old, new = json.loads(old_file.read_text()), json.loads((old_file.parent / "result.json").read_text())
        if old["train"] != new["train"]:
            raise ValueError(f"{old_file.parent}: the two results come from different trainings")
        before, after = old["signature"]["config"], new["signature"]["config"]
        changed = {k: (before.get(k), after.get(k)) for k in sorted(set(before) | set(after))
                   if before.get(k) != after.get(k)}
        row = groups.setdefault((new["env"], new["level"], new["algo"]),
                                {"seeds": [], "changed": changed, "before": [], "after": [], "before_scores": [],
                                 "after_scores": []})
        row["seeds"].append(new["seed"])
        for side, result in (("before", old), ("after", new)):
            scores = result["eval"]["scores"]["d4rl"]
            row[side].append(float(np.mean(scores)))
            row[f"{side}_scores"].append(scores)
    return [{"env": e, "level": lv, "algo": a, **row} for (e, lv, a), row in sorted(groups.items())]


def markdown(rows: list[dict[str, Any]]) -> str:
    """The rows as a markdown table (mean ± s.e. as the benchmark's table: over seeds, or episodes for one seed)."""
    lines = ["| dataset | algorithm | changed | seeds | before | after |", "|---|---|---|---|---|---|"]
    for r in rows:
        changed = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in r["changed"].items())
        lines.append(f"| {r['env']} {r['level']} | {r['algo']} | {changed} | {', '.join(map(str, r['seeds']))} | "
                     f"{format_score(score_summary(r['before_scores']))} | "
                     f"{format_score(score_summary(r['after_scores']))} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, required=True, help="the benchmark's results directory")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    rows = paired_rows(args.out_dir)
    print(markdown(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
