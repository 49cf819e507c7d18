"""Two nights on real interactions: how much SIDs churn when the tokenizer is re-fitted on
new behavior, and what warm re-fits and sticky assignment buy (sidserve/eval/stability.py).
Each stage is cached in --output; rerun the same command to resume.

    python jobs/stability.py --data ../shared/data/amazon-beauty-5core --output outputs/stability
    python jobs/stability.py --data tests/data/beauty-slice --output /tmp/stability-quick --quick
"""

import sys

from sidserve.cli import job_main

if __name__ == "__main__":
    sys.exit(job_main("stability"))
