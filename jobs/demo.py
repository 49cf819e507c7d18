"""The whole pipeline on one machine: fit (Ray Train), assign (Ray Data), serve (Ray
Serve), and POST /tokenize for a known, a new and a cold item, on the demo catalog.

    python jobs/demo.py [--output outputs] [--items 20000] [--keep-serving]
"""

import argparse
import sys

from sidserve.cli import run_job
from sidserve.demo import DemoConfig, run_demo

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default="outputs", help="directory for the catalog, model, snapshots")
    p.add_argument("--items", type=int, default=20000, help="synthetic catalog size")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--keep-serving", action="store_true", help="leave the service running at the end")
    a = p.parse_args()
    sys.exit(run_job(lambda: run_demo(DemoConfig(output=a.output, items=a.items, epochs=a.epochs,
                                                 num_workers=a.num_workers, port=a.port,
                                                 keep_serving=a.keep_serving))))
