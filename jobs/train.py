"""Fit the Semantic ID tokenizer on Ray Train.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python jobs/train.py --items s3://bucket/catalog/ --output s3://bucket/models/sid-v1 \\
        --num-workers 8 --use-gpu --storage-path s3://bucket/ray-checkpoints

With no --items it fits the built-in synthetic demo catalog on a local Ray.
"""

import argparse
import sys


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", help="Parquet file/dir or URI (default: synthetic demo catalog)")
    p.add_argument("--output", default="outputs/model", help="artifact directory or URI")
    p.add_argument("--config", help="YAML with TokenizerConfig fields (unknown keys are errors)")
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--use-gpu", action="store_true", help="one GPU per worker")
    p.add_argument("--cpus-per-worker", type=float,
                   help="default: 1, or less on a small cluster so Ray Data keeps 0.5 CPU")
    p.add_argument("--epochs", type=int, help="overrides the config's epochs")
    p.add_argument("--batch-size", type=int, help="per-worker batch size; overrides the config")
    p.add_argument("--storage-path", help="checkpoint storage (default: <output>/../checkpoints)")
    p.add_argument("--name", help="run name under --storage-path (default: sidserve-<output>-<time>)")
    p.add_argument("--resume", action="store_true", help="continue run --name from its last checkpoint")
    p.add_argument("--max-failures", type=int, default=2, help="worker-group restarts")
    p.add_argument("--demo-items", type=int, default=20000, help="size of the demo catalog")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from sidserve.train_job import run_cli

    return run_cli(args)


if __name__ == "__main__":
    sys.exit(main())
