#!/usr/bin/env bash
# Sets up a bare lent GPU machine from the carried .gpucarry/ (tests/gpu/build_carry.sh makes it) and
# runs tests/gpu; everything it prints also goes to $OUT/run.log, pytest's results to $OUT.
#   bash tests/gpu/run_on_device.sh [PYTEST ARGS]      (through the device tool, carry [".gpucarry"])
#   bash tests/gpu/run_on_device.sh tests/gpu/test_gpu_tp2.py -k teardown     (those tests only)
# What it installs (as install.sh does on a node): runc at /usr/sbin/runc, CRIU at /usr/local/sbin/criu
# (a wrapper giving it the carried libraries), a venv /opt/ws/venv with the carried wheels and warmstart
# from this repo, and install.sh's runtime step: /usr/local/bin/warmstart-runtime, warmstart, warmstart-hook.
# Off the GPU machine (tests/gpu/README.md): WS_ROOT=/tmp/x puts all of it under /tmp/x, WS_PYTHON picks
# the CPython 3.12 that makes the venv, WS_SETUP_ONLY=1 stops before pytest.
set -uo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
C="${GPUCARRY:-$REPO/.gpucarry}"
R="${WS_ROOT:-}"
PY="${WS_PYTHON:-python3}"
RES="${OUT:-/tmp/ws-gpu-out}"
WS="$R/opt/ws"
VENV="$WS/venv"
BIN="$R/usr/local/bin"
export PIP_CONFIG_FILE=/dev/null   # offline: no index, no find-links or constraints of the host
die() { echo "run_on_device: $*" >&2; exit 1; }
[ -d "$C/whl" ] || die "no $C/whl: run 'bash tests/gpu/build_carry.sh' on the build node, then carry .gpucarry"
mkdir -p "$RES" "$WS/lib" "$R/usr/sbin" "$R/usr/local/sbin" "$BIN" || die "cannot create $RES or $WS"
exec > >(tee -a "$RES/run.log") 2>&1

# -- runc and CRIU ---------------------------------------------------------------------------------
install -m755 "$C/bin/runc" "$R/usr/sbin/runc"
install -m755 "$C/bin/criu" "$WS/criu"
cp "$C/lib/"* "$WS/lib/"
# The comment names what the carried binary reads (CRIU_PARALLEL_READS, when warmstart's patch is in
# it): criu.has_parallel_reads looks for that name in the file it is given, here the wrapper.
par=""; grep -qa CRIU_PARALLEL_READS "$WS/criu" && par='# exec passes CRIU_PARALLEL_READS on to the patched binary\n'
printf "#!/bin/sh\n${par}LD_LIBRARY_PATH=%s exec %s \"\$@\"\n" "$WS/lib" "$WS/criu" >"$R/usr/local/sbin/criu"
chmod 755 "$R/usr/local/sbin/criu"
[ -f "$C/bin/criu.warmstart-patch" ] && cp "$C/bin/criu.warmstart-patch" "$R/usr/local/sbin/criu.warmstart-patch"
# runc and python-prctl run without the wrapper: a library of theirs the machine lacks (libseccomp,
# libcap) is added to the loader's path; those the machine has stay its own.
for so in libseccomp.so.2 libcap.so.2; do
  if ! ldconfig -p | grep -q "^[[:space:]]*$so "; then
    mkdir -p "$R/usr/local/lib/warmstart-carry" && cp "$C/lib/$so" "$R/usr/local/lib/warmstart-carry/"
    if [ -z "$R" ]; then
      echo /usr/local/lib/warmstart-carry >/etc/ld.so.conf.d/warmstart-carry.conf && ldconfig
    fi
    echo "run_on_device: $so was missing: added from the carry"
  fi
done
ldd "$R/usr/sbin/runc" | grep "not found" && die "runc still lacks a library"

# -- the venv: carried wheels (pip bootstraps itself from its own wheel), then warmstart from the repo
rm -rf "$VENV"
"$PY" -m venv --without-pip "$VENV" || die "$PY -m venv failed"
VPY="$VENV/bin/python3"
"$VPY" -c 'import sys; assert sys.version_info[:2] == (3, 12), sys.version' || die "the carried wheels are for CPython 3.12"
"$VPY" "$(ls "$C"/whl/pip-*.whl)/pip" install -q --disable-pip-version-check --no-index --no-deps --no-compile \
  "$C"/whl/*.whl || die "installing the carried wheels failed"
# as install.sh's python step: from a clean copy, so that nothing is built inside the repo
src="$(mktemp -d)"
tar -C "$REPO" --exclude=.git --exclude=__pycache__ --exclude='*.egg-info' --exclude=./build --exclude=./tests \
    --exclude=./benchmarks --exclude=./.gpucarry -cf - . | tar -C "$src" -xf -
"$VPY" -m pip install -q --disable-pip-version-check --no-index --no-deps \
  --no-build-isolation "$src" || die "pip install of the repo failed"
rm -rf "$src"
# install.sh's own runtime step: warmstart-runtime (launch.py with the venv's '-IS' shebang), the links
# and its config step: /etc/warmstart/config.toml, the store/seal/state/log dirs, the node's signing key
# (every published checkpoint is signed; without the key a dump fails at publish)
WARMSTART_VENV="$VENV" WARMSTART_BIN_DIR="$BIN" WARMSTART_CACHE="$WS/cache" WARMSTART_ETC="$R/etc/warmstart" \
  bash "$REPO/install.sh" --only runtime,config || die "install.sh --only runtime,config failed"

# -- what is there ---------------------------------------------------------------------------------
echo "== versions"
"$R/usr/local/sbin/criu" --version | head -n1
"$R/usr/sbin/runc" --version | head -n1
"$VPY" -c 'import sys, warmstart, pycriu, prctl, cryptography, jsonschema, google.protobuf as pb
from importlib.metadata import version
print("python", sys.version.split()[0], "| warmstart", version("warmstart"), "| pycriu", pycriu.__version__,
      "| protobuf", pb.__version__, "| cryptography", cryptography.__version__)' || die "the venv does not import"
"$BIN/warmstart" --help | head -n1
"$BIN/warmstart-hook" prestart </dev/null; echo "warmstart-hook prestart: exit $?"
head -n1 "$BIN/warmstart-runtime"
uname -r
nvidia-smi --query-gpu=name,driver_version,uuid --format=csv,noheader 2>/dev/null || echo "nvidia-smi: none"
cat /sys/kernel/mm/transparent_hugepage/enabled 2>/dev/null
echo "== criu check"
"$R/usr/local/sbin/criu" check 2>&1 | tail -n 3
[ "${WS_SETUP_ONLY:-0}" = 1 ] && exit 0

# -- tests/gpu ---------------------------------------------------------------------------------------
echo "== pytest tests/gpu"
export PATH="$BIN:$PATH" WARMSTART_RUNTIME="$BIN/warmstart-runtime" PYTHONUNBUFFERED=1
export WARMSTART_GPU_RESULTS="$RES/gpu_results.json" WARMSTART_GPU_LOGS="$RES"
# the test files or node ids given (tests/gpu/test_gpu_tp2.py, ...::test_x[p2p-on]) replace tests/gpu
targets=(tests/gpu)
for a in "$@"; do case "$a" in tests/*) targets=(); break ;; esac; done
cd "$REPO" && "$VPY" -m pytest -q -s -p no:cacheprovider -rA ${targets[@]+"${targets[@]}"} "$@" 2>&1 | tee "$RES/gpu_test.log"
exit "${PIPESTATUS[0]}"
