#!/bin/bash
# A = e6c7f2c, B = main; interleaved; each runtime call timed by wrap.sh
set -u
COMMON="--sizes 256 --reps 8 --cold-reps 1 --passthrough-reps 0 --only warmstart --no-podman --pause 0.5 --keep"
rm -rf /var/tmp/ab2; mkdir -p /var/tmp/ab2
for round in 1 2 3; do
  for v in A B; do
    mkdir -p /var/tmp/ab2/$v$round
    if [ $v = A ]; then W=/opt/ws-old/venv/bin/warmstart; R=/opt/ws-old/bin/warmstart-runtime; else W=/opt/warmstart/venv/bin/warmstart; R=/usr/local/bin/warmstart-runtime; fi
    WRAP_REAL=$R WRAP_LOG=/tmp/ab/calls-$v$round.txt $W bench $COMMON --runtime /tmp/ab/wrap.sh --json /tmp/ab/$v$round.json --workdir /var/tmp/ab2/$v$round > /tmp/ab/$v$round.log 2>&1
  done
done
echo done > /tmp/ab/finished
