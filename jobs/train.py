"""Fit the Semantic ID tokenizer on Ray Train.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python jobs/train.py --items s3://bucket/catalog/ --output s3://bucket/models/sid-v1 \\
        --num-workers 8 --use-gpu --storage-path s3://bucket/ray-checkpoints

With no --items it fits the built-in synthetic demo catalog on a local Ray.
"""

import sys

from sidserve.cli import job_main

if __name__ == "__main__":
    sys.exit(job_main("train"))
