"""Command line: ``sidserve demo`` (in-process fit + encode on the synthetic catalog),
``sidserve serve`` (the tokenize service, on Ray Serve or ``--local`` under uvicorn)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time


def demo(args: argparse.Namespace) -> int:
    from sidserve import SemanticIdTokenizer, TokenizerConfig, make_synthetic_catalog

    t0 = time.perf_counter()
    items = make_synthetic_catalog(args.items, seed=args.seed)
    print(f"demo catalog: {items.num_rows} synthetic items "
          f"({sum(v is None for v in items.column('behavior_emb').to_pylist())} cold)")
    config = TokenizerConfig(epochs=args.epochs, seed=args.seed)
    tok = SemanticIdTokenizer(config).fit(items)
    version = tok.save_pretrained(args.output, source="sidserve demo (synthetic catalog)")
    loaded = SemanticIdTokenizer.from_pretrained(args.output)
    enc = loaded.encode(items.slice(0, 5))
    print("first items:")
    for i in range(len(enc)):
        print(f"  {enc.item_id[i]}  sid={enc.sid_str[i]:<24} path={enc.path[i]:<12} "
              f"behavior_weights={[round(float(w), 3) for w in enc.behavior_weights[i]]}")
    m = tok.stats_["fit_metrics"]
    summary = {k: m[k] for k in ("entropy_mean", "utilisation_mean", "collision_rate", "recon",
                                 "cold_path_agreement")}
    print("metrics:", json.dumps({k: round(v, 4) for k, v in summary.items()}))
    print(f"model {version} written to {args.output} in {time.perf_counter() - t0:.1f} s")
    return 0


def serve(args: argparse.Namespace) -> int:
    user_config = {"model_uri": args.model, "snapshot_root": args.snapshot,
                   "snapshot_poll_s": args.snapshot_poll_s}
    if args.local:
        from sidserve.service.local import serve_local

        return run_job(lambda: serve_local(user_config, args.host, args.port))
    import ray
    from ray import serve as ray_serve

    from sidserve.service.deployment import SidServe

    ray.init(address=args.address)
    ray_serve.start(http_options={"host": args.host, "port": args.port})
    ray_serve.run(SidServe.options(user_config=user_config).bind(), name="sidserve", route_prefix="/",
                  blocking=True)
    return 0


def run_job(body) -> int:
    """Run a job's body with the jobs' logging. Bad input (ValueError) or a missing/unreadable
    file (OSError) ends it with exit code 2 and the message on stderr, never a traceback."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    try:
        body()
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sidserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="fit and encode the synthetic demo catalog in-process")
    p.add_argument("--items", type=int, default=20000, help="synthetic catalog size")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default="outputs/demo-model", help="artifact directory or URI")
    p.set_defaults(func=demo)
    p = sub.add_parser("serve", help="run POST /tokenize (Ray Serve, or --local under uvicorn)")
    p.add_argument("--model", default=None, help="model artifact (default: $SIDSERVE_MODEL_URI, else the "
                                                 "model of the published snapshot)")
    p.add_argument("--snapshot", default=None, help="snapshot root for catalog lookups "
                                                    "(default: $SIDSERVE_SNAPSHOT_ROOT; '' for none)")
    p.add_argument("--snapshot-poll-s", type=float, default=30.0, help="seconds between checks of LATEST")
    p.add_argument("--local", action="store_true", help="plain uvicorn in this process, no Ray")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--address", default=None, help="Ray cluster to join (default: start a local one)")
    p.set_defaults(func=serve)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    try:
        return args.func(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
