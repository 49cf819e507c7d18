"""Assign every item of a catalog its SID and publish a versioned snapshot (Ray Data).

    python jobs/assign.py --items catalog/ --model outputs/model --output snapshots/
"""

import argparse
import sys


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", required=True, help="catalog Parquet file/dir or URI")
    p.add_argument("--model", required=True, help="tokenizer artifact dir or URI")
    p.add_argument("--output", required=True, help="snapshot root dir or URI")
    p.add_argument("--num-workers", type=int, default=2, help="encoder actors")
    p.add_argument("--use-gpu", action="store_true", help="one GPU per encoder actor")
    p.add_argument("--batch-size", type=int, default=8192, help="rows per encode call")
    p.add_argument("--rows-per-partition", type=int, default=100_000,
                   help="rows per grouping task (bounds its memory; fewer, larger partitions write fewer files)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from sidserve.assign_job import run_cli

    return run_cli(args)


if __name__ == "__main__":
    sys.exit(main())
