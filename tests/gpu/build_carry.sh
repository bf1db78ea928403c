#!/usr/bin/env bash
# Builds .gpucarry/ (ignored by git): what a bare lent GPU machine lacks to run tests/gpu, taken from
# this repo and this node's own warmstart install (install.sh), never from a hand-made folder.
#
#   bin/runc, bin/criu (+ criu.warmstart-patch)   the node's runc and CRIU, byte for byte
#   lib/                 every shared library they (and python-prctl) link, except glibc's own:
#                        criu runs there through an LD_LIBRARY_PATH wrapper (run_on_device.sh)
#   whl/                 cp312 wheels of the runtime's dependency closure at the versions this node's
#                        venv holds (+ pytest's, for the test run), python-prctl and pycriu built here,
#                        and pip/setuptools/wheel to make the venv and install the repo offline there
#   MANIFEST.txt         where each piece came from, versions and SHA-256s
#
# Usage: bash tests/gpu/build_carry.sh   (root not needed; PyPI reachable; see tests/gpu/README.md)
# Overrides: GPUCARRY (output dir), WARMSTART_VENV, WARMSTART_CRIU, WARMSTART_RUNC, WARMSTART_CRIU_SRC,
#            PY312 (a CPython 3.12 that builds the wheels PyPI has none of), GPUCARRY_MAX_MIB.
set -Eeuo pipefail
trap 'echo "build_carry: failed (exit $?, line $LINENO): $BASH_COMMAND" >&2' ERR

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
OUT="${GPUCARRY:-$REPO/.gpucarry}"
VENV="${WARMSTART_VENV:-/opt/warmstart/venv}"
CRIU="${WARMSTART_CRIU:-/usr/local/sbin/criu}"
RUNC="${WARMSTART_RUNC:-/usr/sbin/runc}"
PY312="${PY312:-/root/.pyenv/versions/3.12.1/bin/python3.12}"
MAX_MIB="${GPUCARRY_MAX_MIB:-56}"   # the device tool sends at most 64 MiB: tree + carry
# Build tools for the device's offline venv (not runtime dependencies; versions that know Python 3.12).
BUILD_TOOLS=(pip==25.3 setuptools==80.9.0 wheel==0.45.1)
# The GPU machine: CPython 3.12 on x86-64 with glibc >= 2.36 (Ubuntu 24.04 has 2.39, this node 2.36).
PLATFORMS=(manylinux2014_x86_64 manylinux1_x86_64 manylinux2010_x86_64)
for n in $(seq 17 36); do PLATFORMS+=("manylinux_2_${n}_x86_64"); done

die() { echo "build_carry: $*" >&2; exit 1; }
[ -x "$VENV/bin/python3" ] || die "$VENV/bin/python3 missing: install warmstart first (install.sh) or set WARMSTART_VENV"
[ -x "$CRIU" ] || die "$CRIU missing: install.sh's criu step makes it, or set WARMSTART_CRIU"
[ -x "$RUNC" ] || die "$RUNC missing: set WARMSTART_RUNC"
"$PY312" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null \
  || die "$PY312 is not a CPython 3.12: set PY312 (it builds python-prctl's cp312 wheel)"
CRIU_VERSION="$("$CRIU" --version | sed -n 's/^Version: *//p')"
CRIU_SRC="${WARMSTART_CRIU_SRC:-/var/cache/warmstart/criu-$CRIU_VERSION}"

tmp="$OUT.tmp"
rm -rf "$tmp"
mkdir -p "$tmp/bin" "$tmp/lib" "$tmp/whl"
work="$(mktemp -d)"
trap 'rm -rf "$work" "$tmp"' EXIT

# -- binaries and the libraries they link (glibc's family is the GPU machine's own) ---------------
cp "$RUNC" "$tmp/bin/runc"
cp "$CRIU" "$tmp/bin/criu"
[ -f "$CRIU.warmstart-patch" ] && cp "$CRIU.warmstart-patch" "$tmp/bin/criu.warmstart-patch"
GLIBC_RE='^(linux-vdso|linux-gate|ld-linux[-a-z0-9_]*|libc|libm|libdl|libpthread|librt|libresolv|libutil|libanl|libnsl|libmvec|libBrokenLocale|libcrypt)\.so'
carry_libs() {  # carry_libs FILE: copy every non-glibc library FILE links (ldd resolves the closure)
  local line name path
  while read -r line; do
    name="$(basename "${line%% *}")"
    [[ "$name" =~ $GLIBC_RE ]] && continue
    path="$(sed -n 's/.*=> \(\/[^ ]*\) (.*/\1/p' <<<"$line")"
    [ -n "$path" ] || die "$1 needs $name, which ldd cannot find here: $line"
    [ -e "$tmp/lib/$name" ] || cp -L "$path" "$tmp/lib/$name"
  done < <(ldd "$1" | sed 's/^[[:space:]]*//' | grep -v '^statically linked')
}
carry_libs "$CRIU"
carry_libs "$RUNC"

# -- wheels: the runtime's dependency closure (+ pytest's) at this node's versions ------------------
# Roots: this checkout's pyproject.toml dependencies (the code that travels) and pytest; the rest of the
# closure and every version come from the venv's installed metadata, markers evaluated for CPython 3.12
# on Linux x86-64.  warmstart itself is installed from the repo there; pycriu and prctl are built below.
"$VENV/bin/python3" - "$REPO/pyproject.toml" "$work/pins.txt" <<'PY'
import sys, tomllib
from importlib import metadata
from packaging.requirements import Requirement

env = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux", "os_name": "posix",
       "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
       "platform_python_implementation": "CPython", "extra": ""}
with open(sys.argv[1], "rb") as f:
    roots = tomllib.load(f)["project"]["dependencies"]
seen, todo = {}, [*map(Requirement, roots), Requirement("pytest")]
while todo:
    req = todo.pop()
    try:
        d = metadata.distribution(req.name)
    except metadata.PackageNotFoundError:
        sys.exit(f"build_carry: {req} is not installed in {sys.prefix}: run install.sh's python step first")
    name = d.metadata["Name"].lower().replace("_", "-")
    if name in seen:
        continue
    if not req.specifier.contains(d.version, prereleases=True):
        sys.exit(f"build_carry: {sys.prefix} has {name} {d.version}, the repo needs {req}: run install.sh's python step")
    seen[name] = d.version
    todo += [r for r in map(Requirement, d.requires or []) if r.marker is None or r.marker.evaluate(env)]
built_here = {"pycriu", "python-prctl"}
with open(sys.argv[2], "w") as f:
    f.writelines(f"{n}=={v}\n" for n, v in sorted(seen.items()) if n not in built_here)
PY
PRCTL_PIN="$("$VENV/bin/python3" -c 'from importlib.metadata import version; print(version("python-prctl"))')"
plat=()
for p in "${PLATFORMS[@]}"; do plat+=(--platform "$p"); done
echo "build_carry: downloading $(wc -l <"$work/pins.txt") cp312 wheels + ${BUILD_TOOLS[*]}"
"$PY312" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --abi cp312 --abi abi3 --abi none "${plat[@]}" -d "$tmp/whl" \
  -r "$work/pins.txt" "${BUILD_TOOLS[@]}" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2 || true)

# python-prctl has no wheel on PyPI: build a cp312 one here (needs libcap's headers: install.sh's packages).
echo "build_carry: building python-prctl==$PRCTL_PIN for cp312"
"$PY312" -m pip wheel -q --disable-pip-version-check --no-deps --no-binary python-prctl -w "$work/prctl" \
  "python-prctl==$PRCTL_PIN" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2 || true)
cp "$work"/prctl/python_prctl-*-cp312-*.whl "$tmp/whl/"
(cd "$work/prctl" && unzip -q -o python_prctl-*.whl '*.so' -d so)
for so in "$work"/prctl/so/*.so; do carry_libs "$so"; done

# pycriu from the CRIU source the binary was built from (install.sh's python step does the same).
[ -f "$CRIU_SRC/lib/pycriu/images/core_pb2.py" ] \
  || die "$CRIU_SRC has no built pycriu: run install.sh's criu step (or set WARMSTART_CRIU_SRC)"
if [ -f "$CRIU.warmstart-patch" ] && [ "$(cat "$CRIU_SRC/.warmstart-built" 2>/dev/null)" != "$(cat "$CRIU.warmstart-patch")" ]; then
  die "$CRIU_SRC was not built with the patches $CRIU carries (.warmstart-built vs $CRIU.warmstart-patch)"
fi
cp -r "$CRIU_SRC/lib" "$work/pycriu-src"
rm -rf "$work/pycriu-src/build" "$work/pycriu-src/"*.egg-info
"$VENV/bin/python3" -m pip wheel -q --disable-pip-version-check --no-deps --no-build-isolation \
  -w "$tmp/whl" "$work/pycriu-src" >"$work/pycriu.log" 2>&1 || { cat "$work/pycriu.log" >&2; die "pycriu wheel build failed"; }
ls "$tmp/whl"/pycriu-"$CRIU_VERSION"-py3-none-any.whl >/dev/null || die "no pycriu-$CRIU_VERSION wheel was built"

# one version of each: two stop the whole offline install
dups="$(ls "$tmp/whl" | sed 's/-[0-9].*//' | tr '[:upper:]_' '[:lower:]-' | sort | uniq -d)"
[ -z "$dups" ] || die "two versions of: $dups"

# -- manifest ------------------------------------------------------------------------------------
{
  echo "# .gpucarry built $(date -u +%FT%TZ) on $(hostname) by tests/gpu/build_carry.sh at $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?')"
  echo "criu $CRIU_VERSION from $CRIU (patch id $(cat "$CRIU.warmstart-patch" 2>/dev/null || echo none))"
  echo "runc from $RUNC: $("$RUNC" --version | head -n1)"
  echo "pycriu from $CRIU_SRC/lib; python-prctl built with $PY312; other wheels: versions in $VENV"
  (cd "$tmp" && find bin lib whl -type f | LC_ALL=C sort | xargs sha256sum)
} >"$tmp/MANIFEST.txt"

rm -rf "$OUT"
mv "$tmp" "$OUT"
trap 'rm -rf "$work"' EXIT
size_kib="$(du -sk "$OUT" | cut -f1)"
echo "build_carry: $OUT: $((size_kib / 1024)) MiB ($size_kib KiB): $(ls "$OUT/bin" | wc -l) binaries," \
     "$(ls "$OUT/lib" | wc -l) libraries, $(ls "$OUT/whl" | wc -l) wheels"
[ "$size_kib" -le $((MAX_MIB * 1024)) ] || die "$OUT is over ${MAX_MIB} MiB: the device tool carries at most 64 MiB with the tree"

# -- self-check: the carried CRIU and runc run with glibc alone besides the carry (a mount namespace
# whose library dir holds only glibc's files), as on a machine that has none of Debian's libraries
if [ "$(id -u)" -eq 0 ] && command -v unshare >/dev/null; then
  unshare -m bash -s "$OUT" "$work/glibc" <<'SH' || die "the carried criu/runc do not run on glibc + the carry alone"
C=$1; G=$2; L=/usr/lib/x86_64-linux-gnu; mkdir -p "$G"
cp -a "$L"/{libc.so.6,ld-linux-x86-64.so.2,libm.so.6,libpthread.so.0,libdl.so.2,librt.so.1,libresolv.so.2} "$G"/
mount --make-rprivate / && mount --bind "$G" "$L" || exit 1
! "$C/bin/criu" --version >/dev/null 2>&1 || { echo "criu ran without the carry: the check proves nothing"; exit 1; }
LD_LIBRARY_PATH=$C/lib "$C/bin/criu" --version >/dev/null && LD_LIBRARY_PATH=$C/lib "$C/bin/criu" check >/dev/null 2>&1 \
  && LD_LIBRARY_PATH=$C/lib "$C/bin/runc" --version >/dev/null || exit 1
echo "build_carry: self-check: criu --version, criu check and runc --version pass on glibc + $C/lib alone"
SH
else
  echo "build_carry: self-check skipped (needs root and unshare)"
fi
