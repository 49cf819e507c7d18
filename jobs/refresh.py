"""The nightly refresh: statistics, optional warm-started re-fit, assignment, churn report,
atomic publish, and job metrics pushed to a Prometheus Pushgateway.

    python jobs/refresh.py --items catalog/ --model models/current --output snapshots/ \\
        [--refit] [--pushgateway pushgateway:9091]
"""

import argparse
import sys


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", required=True, help="tonight's catalog: Parquet file/dir or URI")
    p.add_argument("--model", required=True, help="current tokenizer artifact")
    p.add_argument("--output", required=True, help="snapshot root dir or URI")
    p.add_argument("--refit", action="store_true", help="re-fit warm-started from --model first")
    p.add_argument("--refit-output", help="artifact of the re-fitted model (default: <model>-refit-<time>)")
    p.add_argument("--refit-epochs", type=int, help="epochs of the re-fit (default: the model's)")
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--use-gpu", action="store_true")
    p.add_argument("--rows-per-partition", type=int, default=100_000, help="rows per grouping task of the assignment")
    p.add_argument("--pushgateway", help="host:port of a Pushgateway (or SIDSERVE_PUSHGATEWAY)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from sidserve.refresh_job import run_cli

    return run_cli(args)


if __name__ == "__main__":
    sys.exit(main())
