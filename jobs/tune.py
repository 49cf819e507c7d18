"""Choose a downstream model's settings on the validation split (never test): train it
with --set overrides, print and log its validation metrics.

    python jobs/tune.py --data ../shared/data/amazon-beauty-5core --model sasrec --set dropout=0.5
    python jobs/tune.py --data ../shared/data/amazon-beauty-5core --model retrieval --sids letter \\
        --set lr=1e-3 --log docs/evaluation/tuning.jsonl
    python jobs/tune.py --data ../shared/data/amazon-beauty-5core --model sid_sasrec \
        --tokenizer adc_sid --eval-cache eval-out/ --tok-set richness_normalization=minmax
"""

import argparse
import json
import sys


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="dataset dir with sequences.txt and items.jsonl")
    p.add_argument("--model", required=True, choices=["sasrec", "sid_sasrec", "retrieval", "ranking"])
    p.add_argument("--sids", default="letter",
                   help="SIDs for sid_sasrec/retrieval/ranking: 'letter' or an evaluation's sids.npz (default: letter)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field of the model's config (repeatable)")
    p.add_argument("--tokenizer", help="fit this evaluation tokenizer (e.g. adc_sid) first and use its SIDs; "
                   "needs --eval-cache")
    p.add_argument("--eval-cache", help="an evaluation's --output directory (embeddings, SASRec tables)")
    p.add_argument("--tok-set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field of the --tokenizer candidate's config (TokenizerConfig for ADC-SID, "
                   "RQVAEConfig for rqvae, ...; repeatable)")
    p.add_argument("--behavior-embedding",
                   help="SASRec table the candidate reads as e_b (default: the tokenizer's own, e.g. tied for "
                        "rqkmeans_tied, else untied-input)")
    p.add_argument("--sid-weights", choices=["r", "one"],
                   help="sid_sasrec: behavioral code embeddings scaled by the tokenizer's R(e_b) (r) or by 1 "
                        "(one); default: as the evaluation reads the --tokenizer candidate (ADC-SID: one), else r")
    p.add_argument("--log", help="append the result as one JSON line to this file")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from sidserve.eval.tuning import MODELS, parse_overrides, tune
    from sidserve.runner import run_job

    def body():
        from sidserve.eval.tokenizers import config_class

        overrides = parse_overrides(args.set, MODELS[args.model])
        tokenizer = None
        if args.tokenizer:
            if not args.eval_cache:
                raise ValueError("--tokenizer needs --eval-cache (an evaluation's output directory)")
            tokenizer = {"name": args.tokenizer, "eval_cache": args.eval_cache,
                         "overrides": parse_overrides(args.tok_set, config_class(args.tokenizer)),
                         "behavior_embedding": args.behavior_embedding}
        elif args.tok_set:
            raise ValueError("--tok-set needs --tokenizer")
        if args.sid_weights is not None and args.model != "sid_sasrec":
            raise ValueError(f"--sid-weights is sid_sasrec's (--model {args.model} has use_sid_weights: use --set)")
        print(json.dumps(tune(args.data, args.model, overrides, sids=args.sids, log_path=args.log,
                                tokenizer=tokenizer,
                                sid_weights=None if args.sid_weights is None else args.sid_weights == "r")))

    return run_job(body)


if __name__ == "__main__":
    sys.exit(main())
