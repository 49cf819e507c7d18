"""Assign every item of a catalog its SID and publish a versioned snapshot (Ray Data).

    python jobs/assign.py --items catalog/ --model outputs/model --output snapshots/
"""

import sys

from sidserve.cli import job_main

if __name__ == "__main__":
    sys.exit(job_main("assign"))
