#!/usr/bin/env bash
# Issue 49.2: this checkout's POST /tokenize against another commit's, in alternating rounds so
# that the machine's drift (minutes apart, +-0.5 ms on a 2-3 ms call here) hits both alike. Each
# round runs bench/serve_latency.py of the baseline tree (its own code, its own model), then of
# this one, the shipped Serve settings only; the summary is the median over rounds per cell.
#
#   git worktree add /tmp/wt-base ccfcc03
#   bash bench/serve_baseline.sh /tmp/wt-base [rounds=3] [outdir=/tmp/serve-baseline]
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
base="$(cd "$1" && pwd)"; rounds="${2:-3}"; out="${3:-/tmp/serve-baseline}"
py="$here/.venv/bin/python"
mkdir -p "$out"
args=(--serve-env optimized --concurrency 1 64 --items 1 32)
for r in $(seq 1 "$rounds"); do
  (cd "$base" && PYTHONPATH="$base" "$py" bench/serve_latency.py "${args[@]}" --json "$out/base-$r.json" > "$out/base-$r.log" 2>&1)
  (cd "$here" && "$py" bench/serve_latency.py "${args[@]}" --json "$out/this-$r.json" > "$out/this-$r.log" 2>&1)
done
"$py" - "$out" "$rounds" "$(cd "$base" && git rev-parse --short HEAD)" "$(cd "$here" && git rev-parse --short HEAD)" <<'PY'
import json, sys, statistics as st
out, rounds, base_rev, this_rev = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
cells = {}
for tree in ("base", "this"):
    for r in range(1, rounds + 1):
        for row in json.load(open(f"{out}/{tree}-{r}.json")):
            kind = "uvicorn" if row["server"].startswith("plain") else "Serve"
            cells.setdefault((tree, kind, row["items"], row["concurrency"]), []).append(row)
print(f"median over {rounds} alternating rounds; base = {base_rev}, this = {this_rev}\n")
print("| tree | server | items/req | concurrency | p50 ms | p99 ms | req/s | items/s | p50 per round |")
print("|---|---|---|---|---|---|---|---|---|")
for (tree, kind, n, c), rows in sorted(cells.items(), key=lambda kv: (kv[0][2], kv[0][3], kv[0][1], kv[0][0])):
    med = {k: st.median(r[k] for r in rows) for k in ("p50_ms", "p99_ms", "req_per_s")}
    per = ", ".join(f"{r['p50_ms']:.2f}" for r in rows)
    print(f"| {base_rev if tree == 'base' else this_rev} | {kind} | {n} | {c} | {med['p50_ms']:.2f} | {med['p99_ms']:.2f} | "
          f"{med['req_per_s']:.1f} | {med['req_per_s'] * n:.0f} | {per} |")
for tree in ("base", "this"):
    gaps = [a["p50_ms"] - b["p50_ms"] for a, b in zip(cells[(tree, "Serve", 1, 1)], cells[(tree, "uvicorn", 1, 1)])]
    print(f"\n{base_rev if tree == 'base' else this_rev}: Serve minus uvicorn, one item at c=1, per round: "
          + ", ".join(f"{g:+.2f}" for g in gaps) + f" ms (median {st.median(gaps):+.2f})")
PY
