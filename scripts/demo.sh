#!/usr/bin/env bash
# tollgate's main job, offline, on the embedded in-memory store: `tollgate batch` sends
# the 300 chat requests of examples/requests.jsonl to `tollgate sim`, a local
# OpenAI-compatible API that refuses (429) anything over 600 requests and 30,000 tokens
# per minute. The batch is given the same limits: it takes the burst at once, then paces
# itself to the refill rate, and the simulator refuses nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
RPM=600
TPM=30000
cargo build --quiet -p tollgate-cli
BIN=target/debug/tollgate
WORK=$(mktemp -d)
trap 'kill "$SIM" 2>/dev/null || true; rm -rf "$WORK"' EXIT

"$BIN" sim --port 0 --rpm "$RPM" --tpm "$TPM" --latency 200ms 2>"$WORK/sim.log" &
SIM=$!
for _ in $(seq 100); do
  grep -q "listening on" "$WORK/sim.log" && break
  sleep 0.1
done
ADDR=$(grep -o 'http://[0-9.:]*' "$WORK/sim.log" | head -1)
echo "tollgate sim at $ADDR: $RPM requests/min, $TPM tokens/min"

# The simulator takes any key; a key of its own keeps a real OPENAI_API_KEY at home.
SIM_KEY=sim-demo-key "$BIN" batch examples/requests.jsonl -o "$WORK/results.jsonl" \
  --url "$ADDR/v1/chat/completions" --rpm "$RPM" --tpm "$TPM" --api-key-env SIM_KEY \
  --progress lines --progress-interval 2s

echo "first result line (request, response, metadata):"
head -c 400 "$WORK/results.jsonl"; echo " ..."
# Stopping the simulator makes it print what it saw.
kill -INT "$SIM"
wait "$SIM" || true
STATS=$(grep -o '{.*}' "$WORK/sim.log" | tail -1)
echo "the simulator saw: $STATS"
case "$STATS" in
  *'"rate_limited":0,'*) echo "OK: the simulator refused nothing: no minute went over its limits" ;;
  *) echo "the simulator refused requests"; exit 1 ;;
esac
