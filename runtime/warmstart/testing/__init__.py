"""The harness around the runtime, not the runtime: the CRI driver that plays kubelet (cri), the
benchmark (bench, bench_gpu, gpu_bundle), the demo and the reference workers (worker) that run
inside their containers.  The product imports nothing from here; `warmstart bench` and
`warmstart demo` load it only when run."""
