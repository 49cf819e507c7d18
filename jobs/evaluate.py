"""Evaluate every tokenizer on real interactions: text embeddings, SASRec behavioral
embeddings, ADC-SID / baselines / ablations, generative retrieval and ranking, head vs
long tail. Each stage is cached in --output; rerun the same command to resume.

    python jobs/evaluate.py --data ../shared/data/amazon-beauty-5core --output outputs/eval
    python jobs/evaluate.py --data tests/data/beauty-slice --output /tmp/eval-quick --quick
"""

import argparse
import shlex
import sys

DEFAULT_TOKENIZERS = "adc_sid,adc_sid_no_controller,adc_sid_no_align,adc_sid_no_gate,adc_sid_no_sparsity,rqvae,rqkmeans,opq"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="dataset dir with sequences.txt and items.jsonl")
    p.add_argument("--output", required=True, help="cache + report dir (results.json, report.md, plots/)")
    p.add_argument("--tokenizers", default=DEFAULT_TOKENIZERS,
                   help="comma-separated; 'letter' adds LETTER's published SIDs (default: %(default)s)")
    p.add_argument("--seeds", help="comma-separated downstream model seeds (default: 0,1,2; --quick: 0,1)")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: write the report from the stages cached so far (pending ones are listed)")
    p.add_argument("--quick", action="store_true", help="subsampled smoke run of every stage")
    p.add_argument("--quick-users", type=int, default=1000, help="users kept by --quick")
    p.add_argument("--sasrec-variants", help="ID SASRec models to train: tied, untied, bce (default: tied,untied)")
    p.add_argument("--behavior-embedding", choices=["tied", "untied-input", "untied-output", "bce"],
                   help="SASRec table handed to the tokenizers as e_b (default: untied-input)")
    p.add_argument("--retrieval-max-epochs", type=int, help="upper bound on the retrieval model's epochs")
    p.add_argument("--history-tokens", choices=["item", "codes"],
                   help="retrieval history: one token per item (default) or one per SID code (TIGER)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from sidserve.eval.pipeline import run_cli

    return run_cli(args, command="python jobs/evaluate.py " + shlex.join(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
