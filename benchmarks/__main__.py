"""``python -m benchmarks [--quick] [--repeat N] [--out DIR]``: run the core benchmark,
print its table and keep its raw results."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from benchmarks import core, report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description="The core benchmark of datafabric.")
    parser.add_argument(
        "--quick", action="store_true", help="a 256 MiB array instead of 1 GiB, fewer repetitions and names"
    )
    parser.add_argument("--repeat", type=int, help="timed repetitions after one warm-up (default 10; --quick 5)")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results", help="default: benchmarks/results"
    )
    args = parser.parse_args(argv)
    params = {
        "nbytes": (256 if args.quick else 1024) * core.MiB,
        "repeat": args.repeat or (5 if args.quick else 10),
        "calls": 10_000,
        "fresh_names": 50 if args.quick else 200,
    }
    env = report.environment()
    t0 = time.perf_counter()
    raw = core.run(**params)
    params["run_seconds"] = time.perf_counter() - t0
    table = report.rows(raw, params["nbytes"])
    text = report.markdown(env, params, table)
    print(text)
    path = report.save(args.out, {"environment": env, "parameters": params, "table": table, "raw": raw}, text)
    print(f"Raw results: {path}")
    if raw["left_in_dev_shm"]:
        print(f"LEFT IN /dev/shm: {raw['left_in_dev_shm']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
