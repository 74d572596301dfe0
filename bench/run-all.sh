#!/usr/bin/env bash
# The full benchmark run behind docs/benchmarks.md (release build; run on a quiet machine:
# it takes both cores for a long while). Results (JSON, markdown, SVG) go to $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/work/bench-data/results}"
cargo build --release -p freshet-bench
B="${CARGO_TARGET_DIR:-target}/release/freshet-bench"
"$B" compare --rows 10000000 --changes 10000 --dist recent,uniform --workers 1,2 --out "$OUT"
# Each sustained run rewrites files every cycle and keeps the old ones (time travel): ~6 GB.
"$B" sustained --rows 10000000 --rate 5000,20000,50000 --seconds 60 --out "$OUT"
"$B" sustained --rows 10000000 --rate 5000 --seconds 60 --dist recent --out "$OUT"
"$B" compare --rows 10000000 --changes 1000,100000 --dist recent,uniform --workers 2 --no-full --out "$OUT/extra"
"$B" compare --rows 1000000 --partitioned=false --changes 1000,10000,100000 --dist recent,uniform --workers 2 --out "$OUT"
