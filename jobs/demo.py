"""The whole pipeline on one machine: fit (Ray Train), assign (Ray Data), serve (Ray
Serve), and POST /tokenize for a known, a new and a cold item, on the demo catalog.

    python jobs/demo.py [--output outputs] [--items 20000] [--keep-serving]
"""

import sys

from sidserve.cli import job_main

if __name__ == "__main__":
    sys.exit(job_main("demo"))
