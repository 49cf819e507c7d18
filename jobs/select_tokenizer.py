"""Choose the tokenizer for your catalog from your interaction log (= `sidserve select`): the
evaluation's pipeline on your Parquet inputs, the library default kept unless a candidate
clearly beats it on validation. Each stage is cached in --output; rerun the same command to
resume. (Not jobs/select.py: a script of that name would shadow the standard library's
`select` module for every script in jobs/.)

    python jobs/select_tokenizer.py --items catalog/ --interactions log.parquet --output outputs/select
"""

import sys

from sidserve.cli import job_main

if __name__ == "__main__":
    sys.exit(job_main("select"))
