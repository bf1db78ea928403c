#!/bin/bash
# times each runtime invocation: WRAP_REAL=real runtime, WRAP_LOG=file
s=$(date +%s%N)
"$WRAP_REAL" "$@"
rc=$?
e=$(date +%s%N)
sub=""
for a in "$@"; do case "$a" in create|start|kill|delete|state|restore|checkpoint) sub=$a; break;; esac; done
echo "$sub $(( (e-s)/1000 ))" >> "$WRAP_LOG"
exit $rc
