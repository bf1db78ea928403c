#!/bin/bash
# Sets up a bare lent GPU machine from the carried .gpucarry/ (runc, CRIU + its Debian .so files,
# pycriu, wheels) and runs tests/gpu.  Used through the device `run` tool; see benchmarks/gpu_results.md.
set -u
C=$PWD/.gpucarry
install -m755 $C/bin/runc /usr/sbin/runc
mkdir -p /usr/local/sbin /opt/ws/lib && cp $C/lib/* /opt/ws/lib/ && install -m755 $C/bin/criu.real /opt/ws/criu
printf '#!/bin/sh\nLD_LIBRARY_PATH=/opt/ws/lib exec /opt/ws/criu "$@"\n' > /usr/local/sbin/criu && chmod 755 /usr/local/sbin/criu
LD_LIBRARY_PATH=/opt/ws/lib ldd /usr/sbin/runc | grep -q "not found" && echo "runc libs missing"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site $C/whl/*.whl
mkdir -p /tmp/pkg/warmstart && cp -r runtime/* /tmp/pkg/warmstart/ && cp -r hooks /tmp/pkg/warmstart/hooks
cp -r $C/py/* /tmp/pkg/
export PYTHONPATH=/tmp/pkg:/tmp/site
printf '#!/bin/sh\nPYTHONPATH=/tmp/pkg:/tmp/site exec %s /tmp/pkg/warmstart/launch.py "$@"\n' "$(command -v python3)" > /usr/local/bin/warmstart-runtime
chmod 755 /usr/local/bin/warmstart-runtime
/usr/local/sbin/criu --version; /usr/local/sbin/criu check 2>&1 | tail -1; runc --version | head -1
nvidia-smi --query-gpu=name,driver_version,uuid --format=csv,noheader
cat /sys/kernel/mm/transparent_hugepage/enabled
export WARMSTART_GPU_RESULTS=${OUT:-/tmp}/gpu_results.json
python3 -m pytest -q -s -p no:cacheprovider tests/gpu "$@" 2>&1 | tee ${OUT:-/tmp}/gpu_test.log
