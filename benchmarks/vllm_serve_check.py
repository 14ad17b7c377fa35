"""``vllm serve`` with a kvplug strategy answering one request from the ``openai`` client.

    python benchmarks/vllm_serve_check.py models/kvplug-ref int4

Starts the server on 127.0.0.1 (prefix caching and chunked prefill off, as kvplug's CUDA backend
needs), waits for ``/health``, asks for a 16-token greedy completion, prints it with the server's
kvplug and KV-cache log lines, and stops the server.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request


def main(model: str, spec: str, port: int = 8765) -> None:
    cmd = ["vllm", "serve", model, "--host", "127.0.0.1", "--port", str(port), "--max-model-len", "2048",
           "--gpu-memory-utilization", "0.3", "--no-enable-prefix-caching", "--no-enable-chunked-prefill",
           "--additional-config", json.dumps({"kvplug": spec})]
    print("$", " ".join(cmd), flush=True)
    log = open("/tmp/serve.log", "w")
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            if server.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {server.returncode}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                time.sleep(2)
        else:
            raise RuntimeError("vllm serve did not become healthy in 240 s")
        from openai import OpenAI

        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
        reply = client.completions.create(model=model, prompt="The capital of France is", max_tokens=16,
                                          temperature=0)
        print("openai client reply:", repr(reply.choices[0].text), "usage:", reply.usage, flush=True)
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
        for line in open("/tmp/serve.log", errors="replace"):
            if "kvplug" in line or "KV cache size" in line or "Error" in line or "error" in line:
                print("  server:", line.rstrip()[-220:])


if __name__ == "__main__":
    main(*sys.argv[1:3])
