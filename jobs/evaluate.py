"""Evaluate every tokenizer on real interactions: text embeddings, SASRec behavioral
embeddings, ADC-SID / baselines / ablations, generative retrieval and ranking, head vs
long tail. Each stage is cached in --output; rerun the same command to resume.

    python jobs/evaluate.py --data ../shared/data/amazon-beauty-5core --output outputs/eval
    python jobs/evaluate.py --data tests/data/beauty-slice --output /tmp/eval-quick --quick
"""

import sys

from sidserve.cli import job_main

if __name__ == "__main__":
    sys.exit(job_main("evaluate"))
