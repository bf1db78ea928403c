#!/bin/bash
# Reproduce benchmarks/README.md: the full comparison (1 GiB and 4 GiB of worker state), as root,
# on a quiet machine, after `bash install.sh` (it installs podman and matplotlib too).
# Quick check instead: benchmarks/bench.sh --sizes 256 --reps 2 --cold-reps 1 --passthrough-reps 4 --pause 0.5
set -euo pipefail
cd "$(dirname "$0")"
exec /usr/local/bin/warmstart bench --sizes 1024,4096 --reps 5 --cold-reps 2 --pause 2 --passthrough-reps 20 \
    --json results.json --plot results.png "$@"
