#!/usr/bin/env bash
# The live conformance suite (test_live.py) against real llama.cpp servers on loopback.
#
#   .ci/live.sh            (from anywhere; PYTHON picks the interpreter, default python3)
#
# Starts two llama-servers with the tiny deterministic model (shared/realserver/start.sh,
# beside this repository's checkout): one open, one that wants an API key. Runs
# `python -m unittest -v test_live` against them with LLM_TEST_REQUIRE=1, so that an
# unreachable server fails instead of skipping, stops both servers, and exits with the
# tests' status. A run in which any test was skipped counts as a failure.
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
PY="${PYTHON:-python3}"

START="$HERE/../../shared/realserver/start.sh"
[ -f "$START" ] || START="/work/shared/realserver/start.sh"
if [ ! -f "$START" ]; then
  echo "live.sh: cannot find shared/realserver/start.sh" >&2
  exit 1
fi

# start.sh compiles llama-server on its first run; it needs these tools
missing=()
for tool in cmake g++ make curl; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "live.sh: installing ${missing[*]}" >&2
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq cmake g++ make curl >/dev/null
fi

free_port() {
  "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

PIDS=()
LOGS=()
stop_servers() {
  for pid in ${PIDS[@]+"${PIDS[@]}"}; do
    kill "$pid" 2>/dev/null || true
  done
  for pid in ${PIDS[@]+"${PIDS[@]}"}; do
    for _ in $(seq 1 50); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    kill -9 "$pid" 2>/dev/null || true
  done
  [ -z "${OUTPUT:-}" ] || rm -f "$OUTPUT"
}
trap stop_servers EXIT

start_server() {  # PORT [server args...]; sets STARTED_PID
  local line
  # start.sh builds its own venv for the model generator: give it a python3 that can
  # install gguf and numpy, whatever interpreter runs the tests
  if ! line="$(PYTHON="${REALSERVER_PYTHON:-python3}" bash "$START" "$@" | tail -n 1)"; then
    echo "live.sh: $START $* failed" >&2
    exit 1
  fi
  case "$line" in
    READY*) ;;
    *) echo "live.sh: server on port $1 did not start: $line" >&2; exit 1 ;;
  esac
  STARTED_PID="${line#*pid=}"
  STARTED_PID="${STARTED_PID%% *}"
  PIDS+=("$STARTED_PID")
  LOGS+=("${line#*log=}")
}

MAIN_PORT="$(free_port)"
start_server "$MAIN_PORT" cpp
AUTH_PORT="$(free_port)"
while [ "$AUTH_PORT" = "$MAIN_PORT" ]; do AUTH_PORT="$(free_port)"; done
AUTH_KEY="sk-live-$("$PY" -c 'import uuid; print(uuid.uuid4().hex)')"
start_server "$AUTH_PORT" cpp --api-key "$AUTH_KEY"

OUTPUT="$(mktemp)"
cd "$REPO"
set +e
env LLM_TEST_BASE_URL="http://127.0.0.1:$MAIN_PORT" \
    LLM_TEST_MODEL=tiny \
    LLM_TEST_API_KEY= \
    LLM_TEST_AUTH_BASE_URL="http://127.0.0.1:$AUTH_PORT" \
    LLM_TEST_AUTH_KEY="$AUTH_KEY" \
    LLM_TEST_EXACT=1 \
    LLM_TEST_EXCLUSIVE=1 \
    LLM_TEST_REQUIRE=1 \
    "$PY" -m unittest -v test_live 2>&1 | tee "$OUTPUT"
status=${PIPESTATUS[0]}
set -e

if [ "$status" -eq 0 ] && grep -Eq '^(OK|FAILED) \(.*skipped=' "$OUTPUT"; then
  echo "live.sh: tests were skipped; every live test must run here" >&2
  status=1
fi
if ! grep -Eq '^Ran [1-9][0-9]* tests? ' "$OUTPUT"; then
  echo "live.sh: no live test ran" >&2
  status=1
fi
if [ "$status" -ne 0 ]; then
  for log in ${LOGS[@]+"${LOGS[@]}"}; do
    echo "---- last lines of $log" >&2
    tail -n 20 "$log" >&2 || true
  done
fi
exit "$status"
