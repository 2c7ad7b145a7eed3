#!/bin/sh
# The OpenAI-compatible API of an eldric-p2p node with curl.
#   NODE=http://127.0.0.1:8470 MODEL=qwen2.5-coder-0.5b-instruct-q4_k_m sh examples/curl.sh
# With a node started with --api-key: KEY=secret sh examples/curl.sh
set -eu
NODE=${NODE:-http://127.0.0.1:8470}
MODEL=${MODEL:-qwen2.5-coder-0.5b-instruct-q4_k_m}
AUTH="Authorization: Bearer ${KEY:-none}"

echo "== models in reach"
curl -sS "$NODE/v1/models" -H "$AUTH"
echo

echo "== one answer"
curl -sS "$NODE/v1/chat/completions" -H "$AUTH" -H 'Content-Type: application/json' -d "{
  \"model\": \"$MODEL\",
  \"messages\": [{\"role\": \"user\", \"content\": \"What is a GGUF file? One sentence.\"}],
  \"max_tokens\": 64, \"temperature\": 0
}"
echo

echo "== streamed (Server-Sent Events; -N turns off curl's buffering)"
curl -sSN "$NODE/v1/chat/completions" -H "$AUTH" -H 'Content-Type: application/json' -d "{
  \"model\": \"$MODEL\",
  \"messages\": [{\"role\": \"user\", \"content\": \"Count from 1 to 5.\"}],
  \"max_tokens\": 32, \"temperature\": 0, \"stream\": true,
  \"stream_options\": {\"include_usage\": true}
}"
echo

echo "== raw text completion (no chat template)"
curl -sS "$NODE/v1/completions" -H "$AUTH" -H 'Content-Type: application/json' -d "{
  \"model\": \"$MODEL\", \"prompt\": \"def fibonacci(n):\", \"max_tokens\": 48, \"temperature\": 0,
  \"stop\": [\"\\n\\n\"]
}"
echo

echo "== an error in OpenAI's shape (unknown model -> 404 listing what is there)"
curl -sS "$NODE/v1/chat/completions" -H "$AUTH" -H 'Content-Type: application/json' \
  -d '{"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]}'
echo

echo "== Prometheus metrics (first lines)"
curl -sS "$NODE/metrics" | head -n 20
