"""The nightly refresh: statistics, optional warm-started re-fit, assignment, churn report,
atomic publish, and job metrics pushed to a Prometheus Pushgateway.

    python jobs/refresh.py --items catalog/ --model models/current --output snapshots/ \\
        [--refit] [--pushgateway pushgateway:9091]
"""

import sys

from sidserve.cli import job_main

if __name__ == "__main__":
    sys.exit(job_main("refresh"))
