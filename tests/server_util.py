"""Start and stop a real ``vllm serve`` process on a loopback port."""

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def vllm_server(model: str, args: list[str], log_path: Path, startup_timeout=300,
                env: dict | None = None):
    """Yield the base URL of a running server; stop it on exit. ``env``
    adds variables to the server's environment."""
    port = free_port()
    vllm_bin = os.path.join(os.path.dirname(sys.executable), "vllm")
    cmd = [vllm_bin, "serve", model, "--host", "127.0.0.1", "--port", str(port),
           "--dtype", "float32", *args]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
           **(env or {})}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.time() + startup_timeout
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"server exited:\n{log_path.read_text()[-4000:]}")
                try:
                    with urllib.request.urlopen(base + "/health", timeout=2) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                if time.time() > deadline:
                    raise RuntimeError(f"server not up:\n{log_path.read_text()[-4000:]}")
                time.sleep(1)
            yield base
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def metric(base: str, name: str) -> float:
    """Sum of a Prometheus metric's samples (all label sets) on /metrics."""
    with urllib.request.urlopen(base + "/metrics", timeout=10) as r:
        text = r.read().decode()
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith(name + "{") or line.startswith(name + " ")]
    if not values:
        raise KeyError(f"{name} not on /metrics")
    return sum(values)


def wait_idle(base: str, timeout: float = 120) -> float:
    """Wait until nothing runs or waits; then vLLM's KV-cache usage."""
    deadline = time.time() + timeout
    while (metric(base, "vllm:num_requests_running")
           + metric(base, "vllm:num_requests_waiting")) > 0:
        assert time.time() < deadline, "server still busy"
        time.sleep(0.5)
    return metric(base, "vllm:kv_cache_usage_perc")
