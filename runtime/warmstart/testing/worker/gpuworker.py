#!/usr/bin/env python3
"""GPU reference worker of a real inference server's shape, for checkpoint/restore on a GPU.

Shaped like vLLM V1: an HTTP front process (stdlib only, never touches CUDA) and
a GPU child, the engine, that it starts with ``subprocess`` and talks to over a
``socketpair`` (length-prefixed JSON, one request at a time).  The engine holds:

* a transformers ``Qwen3ForCausalLM`` built from a config (``--preset`` tiny,
  1.7b or 8b: the Qwen3-1.7B / Qwen3-8B shapes) with random bf16 weights drawn
  from ``--seed`` (nothing is downloaded; the same seed gives the same weights);
* a static KV cache (transformers ``StaticCache``, one per served batch size,
  allocated at start: ``--kv-cache-gb`` or ``--kv-cache-tokens`` in all);
* decode compiled with ``torch.compile(mode="reduce-overhead")``: CUDA graphs for
  each of ``--batch-sizes``, captured during the warm-up (``--no-compile``: eager).

Endpoints (vLLM's names where vLLM has them):

``GET /health``            200 once the engine is built and warmed up (also while asleep), else 503
``GET /generate?batch=B&new_tokens=N``  greedy decode of a fixed prompt (``--prompt-len`` token ids
                           drawn from the seed): token ids, SHA-256 of the ids and of the logits
                           (bf16 bytes of every step): a restored worker must match bit for bit
``POST /sleep?level=1``    frees the KV cache (and with ``--sleep-offload-weights``, as vLLM's level
                           1 does, moves the weights to host memory); GPU memory goes back to the driver
``POST /wake_up``          re-allocates the KV cache (and moves the weights back); generation after it
                           is identical.  CUDA graphs whose tensors moved are re-recorded by torch on
                           the next call (``kv_moved`` in the answer says whether any did)
``GET /is_sleeping``, ``GET /stats`` (timings, GPU memory)

Prints ``gpuworker ready …`` with the timings of the cold start (import, model build, KV cache,
compile and graph capture) once /health turns 200.  Runs as PID 1 in a container: SIGTERM and
SIGINT get a handler that exits at once (the engine sees EOF and exits too).

CPU check: ``gpuworker.py --preset tiny --device cpu --no-compile --port 0``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import socket
import socketserver
import struct
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable
from urllib.parse import parse_qs, urlparse

# Qwen3 shapes (the models' published config.json, less what has no bearing on compute).
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 1024, "max_position_embeddings": 4096,
             "tie_word_embeddings": True},
    "1.7b": {"hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 28, "num_attention_heads": 16,
             "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936, "max_position_embeddings": 40960,
             "tie_word_embeddings": True},
    "8b": {"hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36, "num_attention_heads": 32,
           "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936, "max_position_embeddings": 40960,
           "tie_word_embeddings": False},
}
COMMON = {"rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "hidden_act": "silu", "attention_bias": False,
          "use_sliding_window": False}
# KV cache in all, when neither --kv-cache-gb nor --kv-cache-tokens is given
DEFAULT_KV_GB = {"tiny": 0.002, "1.7b": 7.0, "8b": 7.0}
MAX_MSG = 64 << 20


# -- the front/engine channel ---------------------------------------------------------

def send_msg(sock: socket.socket, obj: dict[str, Any]) -> None:
    data = json.dumps(obj).encode()
    sock.sendall(struct.pack("!I", len(data)) + data)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError("peer closed the channel")
        buf += chunk
    return bytes(buf)


def recv_msg(sock: socket.socket) -> dict[str, Any]:
    (n,) = struct.unpack("!I", _recv_exact(sock, 4))
    if n > MAX_MSG:
        raise ValueError(f"message of {n} bytes exceeds {MAX_MSG}")
    return json.loads(_recv_exact(sock, n))


# -- the engine (GPU child) -----------------------------------------------------------

def kv_bytes_per_token(preset: str) -> int:
    p = PRESETS[preset]
    return p["num_hidden_layers"] * 2 * p["num_key_value_heads"] * p["head_dim"] * 2  # K and V, bf16


class Engine:
    """The model, its static KV caches and the compiled decode step; every method runs in the child."""

    def __init__(self, opts: dict[str, Any]) -> None:
        self.opts = opts
        self.timings: dict[str, float] = {}
        self.sleeping = False
        self.offloaded: dict[str, Any] = {}
        t = time.monotonic()
        import torch  # noqa: PLC0415 - the import is part of the measured cold start
        from transformers import Qwen3Config, Qwen3ForCausalLM, StaticCache  # noqa: PLC0415
        self.torch, self.StaticCache = torch, StaticCache
        self.timings["import_s"] = time.monotonic() - t

        t = time.monotonic()
        self.device = torch.device(opts["device"])
        self.cuda = self.device.type == "cuda"
        if self.cuda:
            if self.device.index is None:  # set_device and mem_get_info need an index: "cuda" means the first
                self.device = torch.device("cuda", 0)
            torch.cuda.set_device(self.device)
            torch.cuda.init()
        self.timings["device_init_s"] = time.monotonic() - t

        t = time.monotonic()
        preset = opts["preset"]
        self.config = Qwen3Config(**PRESETS[preset], **COMMON, dtype="bfloat16")
        self.config._attn_implementation = "sdpa"
        with torch.device(self.device):
            model = Qwen3ForCausalLM._from_config(self.config, dtype=torch.bfloat16)
        model.eval().requires_grad_(False)
        self._init_weights(model, int(opts["seed"]))
        self.model = model
        if self.cuda:
            torch.cuda.synchronize()
        self.param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        self.timings["model_build_s"] = time.monotonic() - t

        # the fixed prompt: one row of token ids per sequence of the largest batch
        g = torch.Generator().manual_seed(int(opts["seed"]) + 1)
        self.batch_sizes: list[int] = sorted(set(opts["batch_sizes"]))
        self.prompt = torch.randint(0, self.config.vocab_size, (max(self.batch_sizes), opts["prompt_len"]),
                                    generator=g).to(self.device)

        t = time.monotonic()
        tokens_total = opts["kv_cache_tokens"] or int(opts["kv_cache_gb"] * 1e9) // kv_bytes_per_token(preset)
        self.max_cache_len = max(tokens_total // sum(self.batch_sizes),
                                 opts["prompt_len"] + opts["max_new_tokens"])
        self.caches = {bs: StaticCache(config=self.config, max_cache_len=self.max_cache_len)
                       for bs in self.batch_sizes}
        self._allocate_kv()
        self.kv_bytes = self._kv_bytes()
        self.timings["kv_cache_s"] = time.monotonic() - t

        self.decode = model.forward
        if opts["compile"]:
            self.decode = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True, dynamic=False)
        t = time.monotonic()
        self.reference: dict[int, dict[str, Any]] = {}
        for bs in self.batch_sizes:
            # 1st call compiles (and warms up), 2nd records the CUDA graph, 3rd replays it
            for _ in range(3 if opts["compile"] else 1):
                self.reference[bs] = self.generate(bs, opts["new_tokens"])
        if opts["compile"]:
            try:  # the compile worker processes would otherwise sit in the container (and its checkpoint)
                from torch._inductor.async_compile import shutdown_compile_workers  # noqa: PLC0415
                shutdown_compile_workers()
            except Exception:  # noqa: BLE001 - an older/newer torch without it: workers stay
                pass
        self.timings["compile_and_warmup_s"] = time.monotonic() - t

    def _init_weights(self, model: Any, seed: int) -> None:
        """Deterministic random weights, by name order: N(0, 1/fan_in) for matrices (logits of about unit
        scale, so greedy decoding does not settle on one token), 1 for norms."""
        torch = self.torch
        g = torch.Generator(device=self.device).manual_seed(seed)
        with torch.no_grad():
            for _name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
                if p.dim() >= 2:
                    p.normal_(0.0, p.shape[1] ** -0.5, generator=g)
                else:
                    p.fill_(1.0)

    def _allocate_kv(self) -> None:
        c = self.config
        for bs, cache in self.caches.items():
            cache.early_initialization(bs, c.num_key_value_heads, c.head_dim, self.torch.bfloat16, self.device)

    def _kv_tensors(self) -> list[Any]:
        return [t for cache in self.caches.values() for layer in cache.layers if layer.is_initialized
                for t in (layer.keys, layer.values)]

    def _kv_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._kv_tensors())

    def _kv_ptrs(self) -> list[int]:
        return [t.data_ptr() for t in self._kv_tensors()]

    def generate(self, batch: int, new_tokens: int) -> dict[str, Any]:
        if self.sleeping:
            raise RuntimeError("asleep: POST /wake_up first")
        if batch not in self.caches:
            raise ValueError(f"batch {batch} not served; use one of {self.batch_sizes}")
        if not 1 <= new_tokens <= self.opts["max_new_tokens"]:
            raise ValueError(f"new_tokens {new_tokens} out of range 1..{self.opts['max_new_tokens']}")
        torch = self.torch
        cache = self.caches[batch]
        t = time.monotonic()
        with torch.no_grad():
            cache.reset()
            logits = torch.empty((new_tokens, batch, self.config.vocab_size), dtype=torch.bfloat16,
                                 device=self.device)
            ids = torch.empty((new_tokens, batch), dtype=torch.long, device=self.device)
            out = self.model.forward(input_ids=self.prompt[:batch], past_key_values=cache, use_cache=True,
                                     logits_to_keep=1).logits[:, -1]
            self._sync()
            t_prefill = time.monotonic()
            for i in range(new_tokens):
                if i:
                    if self.opts["compile"]:
                        torch.compiler.cudagraph_mark_step_begin()  # the graph's outputs are reused
                    out = self.decode(input_ids=ids[i - 1][:, None], past_key_values=cache,
                                      use_cache=True).logits[:, -1]
                logits[i].copy_(out)
                ids[i] = out.argmax(-1)
            self._sync()
            t_decode = time.monotonic()
            ids_host = ids.t().contiguous().cpu()
            logits_host = logits.cpu()
            finite = bool(torch.isfinite(logits_host).all())
        tokens = ids_host.tolist()
        return {"batch": batch, "new_tokens": new_tokens, "token_ids": tokens,
                "sha256_ids": hashlib.sha256(json.dumps(tokens).encode()).hexdigest(),
                "sha256_logits": hashlib.sha256(logits_host.view(torch.int16).numpy().tobytes()).hexdigest(),
                "finite": finite, "gen_s": time.monotonic() - t,
                "gen_phases": {"prefill_s": t_prefill - t, "decode_s": t_decode - t_prefill,
                               "host_s": time.monotonic() - t_decode}}

    def _cudnn(self) -> int | str | None:
        """cuDNN's version, or why torch will not use it (e.g. an older system cuDNN found first)."""
        try:
            return self.torch.backends.cudnn.version() if self.cuda else None
        except RuntimeError as e:
            return str(e).split(". ")[0]

    def _sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def sleep(self, level: int) -> dict[str, Any]:
        if level != 1:
            raise ValueError(f"level {level} not supported; use level=1")
        if self.sleeping:
            return {"sleeping": True, "already": True}
        t = time.monotonic()
        self.kv_ptrs_before = self._kv_ptrs()
        for cache in self.caches.values():
            for layer in cache.layers:
                if layer.is_initialized:
                    del layer.keys, layer.values
                    layer.is_initialized = False
        if self.opts["sleep_offload_weights"]:
            with self.torch.no_grad():
                for name, p in self.model.named_parameters():
                    host = self.torch.empty(p.shape, dtype=p.dtype, device="cpu", pin_memory=self.cuda)
                    host.copy_(p.data)
                    self.offloaded[name] = host
                    p.data = self.torch.empty(0, dtype=p.dtype, device=self.device)
        self._release()
        self.sleeping = True
        return {"sleeping": True, "sleep_s": time.monotonic() - t, "offloaded_weights": bool(self.offloaded),
                **self.memory()}

    def wake_up(self) -> dict[str, Any]:
        if not self.sleeping:
            return {"sleeping": False, "already": True}
        t = time.monotonic()
        if self.offloaded:
            with self.torch.no_grad():
                for name, p in self.model.named_parameters():
                    p.data = self.offloaded.pop(name).to(self.device)
        self._allocate_kv()
        if self.cuda:
            self.torch.cuda.synchronize()
        self.sleeping = False
        moved = self._kv_ptrs() != self.kv_ptrs_before
        return {"sleeping": False, "wake_s": time.monotonic() - t, "kv_moved": moved, **self.memory()}

    def _release(self) -> None:
        import gc  # noqa: PLC0415
        gc.collect()
        if self.cuda:
            self.torch.cuda.empty_cache()

    def memory(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kv_bytes": self._kv_bytes(), "param_bytes": self.param_bytes}
        if self.cuda:
            free, total = self.torch.cuda.mem_get_info(self.device)
            out.update(gpu_allocated=self.torch.cuda.memory_allocated(self.device),
                       gpu_reserved=self.torch.cuda.memory_reserved(self.device), gpu_used=total - free)
        return out

    def stats(self) -> dict[str, Any]:
        torch = self.torch
        return {"timings": self.timings, "sleeping": self.sleeping, "max_cache_len": self.max_cache_len,
                "batch_sizes": self.batch_sizes, "preset": self.opts["preset"], "pid": os.getpid(),
                "torch": {"version": torch.__version__, "threads": torch.get_num_threads(),
                          "cpus": len(os.sched_getaffinity(0)), "cudnn": self._cudnn()},
                **self.memory()}


def engine_main(fd: int, opts: dict[str, Any]) -> int:
    """The child: build the engine, say ready (or why not), then serve requests until EOF."""
    sock = socket.socket(fileno=fd)
    try:
        engine = Engine(opts)
    except Exception as e:  # noqa: BLE001 - the front reports it and exits
        send_msg(sock, {"ok": False, "error": f"engine start failed: {type(e).__name__}: {e}"})
        return 1
    send_msg(sock, {"ok": True, "event": "ready", **engine.stats(), "reference": engine.reference})
    ops = {"generate": lambda m: engine.generate(int(m["batch"]), int(m["new_tokens"])),
           "sleep": lambda m: engine.sleep(int(m.get("level", 1))), "wake_up": lambda m: engine.wake_up(),
           "stats": lambda m: engine.stats()}
    while True:
        try:
            msg = recv_msg(sock)
        except EOFError:
            return 0
        fn = ops.get(msg.get("op", ""))
        try:
            if fn is None:
                raise ValueError(f"unknown op {msg.get('op')!r}")
            send_msg(sock, {"ok": True, **fn(msg)})
        except (ValueError, RuntimeError) as e:
            send_msg(sock, {"ok": False, "error": str(e), "kind": type(e).__name__})


# -- the front (HTTP) ------------------------------------------------------------------

def _engine_lost(why: str) -> None:
    """A front without its engine is no worker (as vLLM's API server, it exits)."""
    print(f"gpuworker: engine channel lost ({why}); exiting", flush=True)
    os._exit(1)


class EngineClient:
    """The front's side of the channel: one request at a time, the engine's death ends the front."""

    def __init__(self, argv: list[str], on_lost: Callable[[str], None] | None = None) -> None:
        self.on_lost = on_lost or _engine_lost
        self.sock, child = socket.socketpair()
        self.proc = subprocess.Popen(argv + ["--engine-fd", str(child.fileno())], pass_fds=(child.fileno(),),
                                     stdin=subprocess.DEVNULL)
        child.close()
        self.lock = threading.Lock()
        self.ready = threading.Event()
        self.sleeping = False
        self.info: dict[str, Any] = {}

    def wait_ready(self) -> dict[str, Any]:
        msg = recv_msg(self.sock)
        if not msg.get("ok"):
            raise RuntimeError(msg.get("error", "engine failed"))
        self.info = msg
        self.ready.set()
        return msg

    def call(self, op: str, **kw: Any) -> dict[str, Any]:
        with self.lock:
            try:
                send_msg(self.sock, {"op": op, **kw})
                out = recv_msg(self.sock)
            except (EOFError, OSError) as e:
                self.on_lost(str(e))
                return {"ok": False, "error": f"engine lost: {e}"}
            if out.get("ok") and op in ("sleep", "wake_up"):
                self.sleeping = bool(out.get("sleeping"))
            return out


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def server_bind(self) -> None:
        # no reverse DNS lookup (socket.getfqdn) as HTTPServer.server_bind does: it stalls in some pods
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), port


def make_handler(engine: EngineClient) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"  # one request per connection: nothing idle lingers into a checkpoint

        def _send(self, code: int, body: dict[str, Any]) -> None:
            data = (json.dumps(body) + "\n").encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _engine(self, op: str, **kw: Any) -> None:
            if not engine.ready.is_set():
                self._send(503, {"error": "not ready"})
                return
            out = engine.call(op, **kw)
            if out.pop("ok", False):
                self._send(200, out)
            else:
                self._send(409 if "asleep" in out.get("error", "") else 400, out)

        def _int(self, q: dict[str, list[str]], name: str, default: int) -> int | None:
            try:
                return int(q.get(name, [str(default)])[0])
            except ValueError:
                self._send(400, {"error": f"{name} must be an integer"})
                return None

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            url = urlparse(self.path)
            q = parse_qs(url.query)
            if url.path == "/health":
                if engine.ready.is_set():
                    self._send(200, {"ready": True, "sleeping": engine.sleeping})
                else:
                    self._send(503, {"ready": False})
            elif url.path == "/is_sleeping":
                self._send(200, {"is_sleeping": engine.sleeping})
            elif url.path == "/stats":
                self._engine("stats")
            elif url.path == "/generate":
                batch, n = self._int(q, "batch", 1), self._int(q, "new_tokens", engine.info.get("new_tokens", 32))
                if batch is not None and n is not None:
                    self._engine("generate", batch=batch, new_tokens=n)
            else:
                self._send(404, {"error": "not found", "path": url.path})

        def do_POST(self) -> None:  # noqa: N802
            n = int(self.headers.get("Content-Length") or 0)
            if n:
                self.rfile.read(min(n, 1 << 20))
            url = urlparse(self.path)
            q = parse_qs(url.query)
            if url.path == "/sleep":
                level = self._int(q, "level", 1)
                if level is not None:
                    self._engine("sleep", level=level)
            elif url.path == "/wake_up":
                self._engine("wake_up")
            elif url.path == "/generate":
                self.do_GET()
            else:
                self._send(404, {"error": "not found", "path": url.path})

        def log_message(self, fmt: str, *args: object) -> None:
            pass

    return Handler


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0: any free port (printed in the ready line)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--device", default="", help="cuda (default when available) or cpu")
    p.add_argument("--seed", type=int, default=1234, help="weights and prompt are drawn from it")
    p.add_argument("--batch-sizes", default="1,2", help="batch sizes served, each with its KV cache and CUDA graph")
    kv = p.add_mutually_exclusive_group()
    kv.add_argument("--kv-cache-gb", type=float, help="KV cache in all, GB (default: 7 for 1.7b/8b)")
    kv.add_argument("--kv-cache-tokens", type=int, help="KV cache in all, tokens (split over the batch sizes)")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated by default and in the warm-up")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--no-compile", dest="compile", action="store_false",
                   help="eager decode: no torch.compile, no CUDA graphs")
    p.add_argument("--sleep-offload-weights", action="store_true",
                   help="/sleep?level=1 also moves the weights to host memory, as vLLM's level 1 does")
    p.add_argument("--engine-fd", type=int, default=-1, help=argparse.SUPPRESS)
    p.add_argument("--engine-opts", default="", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    try:
        a.batch_sizes = [int(x) for x in a.batch_sizes.split(",") if x.strip()]
    except ValueError:
        p.error("--batch-sizes: comma-separated integers, e.g. 1,2")
    if not a.batch_sizes or min(a.batch_sizes) < 1:
        p.error("--batch-sizes: at least one, each >= 1")
    if a.prompt_len < 1 or not 1 <= a.new_tokens <= a.max_new_tokens:
        p.error("--prompt-len >= 1 and 1 <= --new-tokens <= --max-new-tokens")
    if a.kv_cache_gb is None and a.kv_cache_tokens is None:
        a.kv_cache_gb = DEFAULT_KV_GB[a.preset]
    return a


def engine_opts(a: argparse.Namespace) -> dict[str, Any]:
    device = a.device
    if not device:
        import importlib.util  # noqa: PLC0415 - the front decides without importing torch itself
        device = "cuda" if os.path.exists("/dev/nvidia0") and importlib.util.find_spec("torch") else "cpu"
    return {"preset": a.preset, "device": device, "seed": a.seed, "batch_sizes": a.batch_sizes,
            "kv_cache_gb": a.kv_cache_gb or 0.0, "kv_cache_tokens": a.kv_cache_tokens or 0,
            "prompt_len": a.prompt_len, "new_tokens": a.new_tokens, "max_new_tokens": a.max_new_tokens,
            "compile": a.compile, "sleep_offload_weights": a.sleep_offload_weights}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.engine_fd >= 0:
        return engine_main(args.engine_fd, json.loads(args.engine_opts))
    t0 = time.monotonic()

    def _exit(signum: int, _frame: object) -> None:
        print(f"gpuworker: signal {signum}, exiting", flush=True)
        os._exit(0)

    signal.signal(signal.SIGTERM, _exit)
    signal.signal(signal.SIGINT, _exit)
    opts = engine_opts(args)
    engine = EngineClient([sys.executable, "-u", os.path.abspath(__file__), "--engine-opts", json.dumps(opts)])
    server = Server((args.host, args.port), make_handler(engine))
    port = server.server_address[1]
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    print(f"gpuworker starting pid={os.getpid()} engine_pid={engine.proc.pid} port={port} preset={args.preset} "
          f"device={opts['device']} compile={args.compile} batch_sizes={args.batch_sizes}", flush=True)
    try:
        info = engine.wait_ready()
    except (RuntimeError, EOFError, OSError) as e:
        print(f"gpuworker: {e}", flush=True)
        return 1
    info["new_tokens"] = args.new_tokens
    tm = info["timings"]
    ref = info["reference"][str(args.batch_sizes[0])]
    print(f"gpuworker ready port={port} cold_start_s={time.monotonic() - t0:.2f} "
          + " ".join(f"{k}={v:.2f}" for k, v in tm.items())
          + f" kv_bytes={info['kv_bytes']} param_bytes={info['param_bytes']} max_cache_len={info['max_cache_len']}"
          f" sha256_logits={ref['sha256_logits'][:16]}", flush=True)
    while True:  # the main thread only waits (and runs signal handlers)
        time.sleep(3600)


if __name__ == "__main__":
    sys.exit(main())
