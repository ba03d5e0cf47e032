"""Record the exact bytes an OpenAI-compatible server sends, for replay tests.

    python tests/record.py [--base-url URL] [--model NAME]
                           [--auth-base-url URL] [--auth-key KEY]
                           [--random-base-url URL] [--reasoning-base-url URL]
                           [--out DIR] [--print] [NAME ...]

Each scenario sends one request, shaped as llm.py sends it, over a raw
socket and keeps every byte of the answer exactly as it arrived: status
line, headers, chunked framing and all. For each scenario it writes

    NAME.bin   the answer's bytes, nothing added
    NAME.txt   the request, then one line per socket read:
               ``recv +SECONDS BYTES_REPR`` (the read boundaries as seen here)

into ``--out`` (default ``testdata/llama_server`` beside this file).
``--print`` also prints the ``.txt`` form to stdout. Only loopback servers
are accepted. Standard library only; Python 3.6 and later.

The defaults come from the environment used by ``test_live.py``:
``LLM_TEST_BASE_URL``, ``LLM_TEST_MODEL``, ``LLM_TEST_AUTH_BASE_URL``,
``LLM_TEST_AUTH_KEY``.
"""

import argparse
import http.client
import json
import os
import socket
import sys
import threading
import time
from urllib.parse import urlsplit

USER_AGENT = "llm.py-record/1"
HELLO = [{"role": "user", "content": "Say hello."}]
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
GREETING_SCHEMA = {
    "type": "json_schema",
    "json_schema": {
        "name": "greeting",
        "schema": {
            "type": "object",
            "properties": {"greeting": {"type": "string"}, "count": {"type": "integer"}},
            "required": ["greeting", "count"],
        },
    },
}
USAGE = {"include_usage": True}
LONG = {"max_tokens": 4000, "logit_bias": {"260": -1000}}  # the tiny model's end token banned


def scenarios(model):
    """(name, server, body, note): ``server`` is "main", "auth" (wants a key), "random"
    (random weights), "busy" (main, while another request fills it), "lost" (main, asked
    on a path it does not serve) or "reasoning" (a server that splits out reasoning);
    body None means a request that is not valid JSON."""
    def body(stream, **extra):
        value = {"model": model, "messages": HELLO}
        value.update(extra)
        value["stream"] = stream
        return value

    over = [{"role": "user", "content": "word " * 6000}]  # about 42,000 tokens on the tiny model
    return [
        ("stream_usage", "main", body(True, stream_options=USAGE),
         "stream with stream_options.include_usage (what llm.py asks for by default)"),
        ("stream_no_usage", "main", body(True),
         "stream without stream_options"),
        ("stream_length", "main", body(True, max_tokens=3, stream_options=USAGE),
         "stream cut by max_tokens=3"),
        ("stream_tool_call", "main",
         body(True, tools=[WEATHER_TOOL], tool_choice="required", stream_options=USAGE),
         "stream with one tool and tool_choice=required"),
        ("stream_json_schema", "main",
         body(True, response_format=GREETING_SCHEMA, stream_options=USAGE),
         "stream with a json_schema response_format"),
        ("chat", "main", body(False),
         "non-streamed chat"),
        ("chat_length", "main", body(False, max_tokens=3),
         "non-streamed chat cut by max_tokens=3"),
        ("chat_tool_call", "main", body(False, tools=[WEATHER_TOOL], tool_choice="required"),
         "non-streamed chat with one tool and tool_choice=required"),
        ("error_context_stream", "main",
         dict(body(True, stream_options=USAGE), messages=over),
         "streamed request whose prompt exceeds the context"),
        ("error_context", "main", dict(body(False), messages=over),
         "non-streamed request whose prompt exceeds the context"),
        ("error_bad_json", "main", None,
         "a request body that is not valid JSON"),
        ("error_stream_options", "main", body(True, stream_options={"include_usage": "yes"}),
         "a stream_options value of the wrong type: a 400 that names include_usage"),
        ("error_auth", "auth", body(False),
         "a wrong API key on a server started with --api-key"),
        ("stream_n2", "main", body(True, n=2, stream_options=USAGE),
         "stream of two choices (n=2): chunks of index 0 and index 1 interleave"),
        ("stream_random_text", "random",
         body(True, stream_options=USAGE, max_tokens=300, seed=25, temperature=1.0),
         "stream of garbage text from the random-weights model (REALSERVER_MODE=random):"
         " U+FFFD, control characters, newlines inside JSON strings"),
        ("stream_error_midway", "busy", body(True, stream_options=USAGE, **LONG),
         "stream that ends with an in-band error: started while another request"
         " fills the shared KV cache (llama-server: 'Context size has been exceeded.')"),
        ("error_unknown_model", "main", dict(body(False), model="no-such-model"),
         "a model the server does not serve"),
        ("error_unknown_path", "lost", body(False),
         "a path the server does not serve (/v1/no/such/chat/completions)"),
        ("stream_reasoning", "reasoning", body(True, stream_options=USAGE),
         "stream from a server that splits reasoning out (vLLM: --reasoning-parser deepseek_r1)"),
        ("chat_reasoning", "reasoning", body(False),
         "non-streamed chat from a server that splits reasoning out"),
    ]


def loopback(url):
    parts = urlsplit(url if "://" in url else "http://" + url)
    host = parts.hostname or ""
    if not (host == "localhost" or host.startswith("127.") or host == "::1"):
        raise SystemExit("record.py: only loopback servers are recorded, got %r" % url)
    path = parts.path.rstrip("/") or "/v1"
    if path.endswith("/chat/completions"):
        path = path[: -len("/chat/completions")]
    return host, parts.port or 80, path + "/chat/completions"


def request_bytes(host, port, path, payload, api_key, stream):
    """The request, with the headers http.client and llm.py send."""
    if payload is None:
        data = b'{"messages": [{"role": "user", "content": "hi"}'
    else:
        data = json.dumps(payload, ensure_ascii=False).encode("utf-8")
    lines = [
        "POST %s HTTP/1.1" % path,
        "Host: %s:%d" % (host, port),
        "Accept-Encoding: identity",
        "Content-Length: %d" % len(data),
        "Content-Type: application/json",
        "User-Agent: %s" % USER_AGENT,
    ]
    if api_key:
        lines.append("Authorization: Bearer %s" % api_key)
    lines.append("Accept: %s" % ("text/event-stream" if stream else "application/json"))
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + data


def complete(data):
    """True once ``data`` holds one whole HTTP response (by its own framing)."""
    head_end = data.find(b"\r\n\r\n")
    if head_end < 0:
        return False
    head = data[:head_end].decode("latin-1").lower().split("\r\n")
    body = data[head_end + 4:]
    headers = dict(line.split(":", 1) for line in head[1:] if ":" in line)
    headers = {k.strip(): v.strip() for k, v in headers.items()}
    if "chunked" in headers.get("transfer-encoding", ""):
        position = 0
        while True:
            line_end = body.find(b"\r\n", position)
            if line_end < 0:
                return False
            size = int(body[position:line_end].split(b";")[0] or b"0", 16)
            if size == 0:  # the last chunk, then trailers up to a blank line
                rest = body[line_end + 2:]
                return rest.startswith(b"\r\n") or b"\r\n\r\n" in rest
            position = line_end + 2 + size + 2
            if position > len(body):
                return False
    if "content-length" in headers:
        return len(body) >= int(headers["content-length"])
    return False  # read until the server closes


def record(host, port, path, payload, api_key, timeout=60.0):
    """Send one request; return the answer's bytes as a list of (seconds, bytes) reads."""
    stream = bool(payload and payload.get("stream"))
    sock = socket.create_connection((host, port), timeout=timeout)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        request = request_bytes(host, port, path, payload, api_key, stream)
        start = time.monotonic()
        sock.sendall(request)
        pieces, data = [], b""
        while not complete(data):
            piece = sock.recv(65536)
            if not piece:
                break
            pieces.append((time.monotonic() - start, piece))
            data += piece
        return request, pieces
    finally:
        sock.close()


def slot_progress(host, port):
    """The most tokens any busy slot has generated (llama-server's GET /slots), or None."""
    try:
        connection = http.client.HTTPConnection(host, port, timeout=5)
        connection.request("GET", "/slots")
        reply = connection.getresponse()
        slots = json.loads(reply.read().decode("utf-8")) if reply.status == 200 else None
        connection.close()
    except (OSError, ValueError, http.client.HTTPException):
        return None
    if not isinstance(slots, list):
        return None
    return max([token.get("n_decoded", 0) for slot in slots if slot.get("is_processing")
                for token in slot.get("next_token") or []] or [0])


def record_when_busy(host, port, path, payload, api_key, attempts=6):
    """Record ``payload`` while a filler request occupies most of the server's KV cache.

    The filler is a non-streamed long generation; once it is near its end the
    recorded stream starts, runs out of cache after a few tokens and gets an
    in-band error. Tries a few times; returns the first recording that has one.
    """
    filler = dict(payload, stream=False)
    filler.pop("stream_options", None)
    found = None
    for attempt in range(attempts):
        threshold = 3900 - 150 * attempt
        thread = threading.Thread(target=record, args=(host, port, path, filler, api_key))
        thread.start()
        start = time.monotonic()
        while time.monotonic() - start < 30:
            progress = slot_progress(host, port)
            if progress is None:  # not llama-server: guess
                time.sleep(1.5)
                break
            if progress >= threshold or not thread.is_alive():
                break
            time.sleep(0.01)
        request, pieces = record(host, port, path, payload, api_key)
        thread.join()
        data = b"".join(piece for _, piece in pieces)
        if b'data: {"error"' in data and (found is None or len(data) < len(b"".join(
                piece for _, piece in found[1]))):
            found = request, pieces
            if len(data) < 32768:
                break
        time.sleep(0.5)
    if found is None:
        raise SystemExit("record.py: no in-band error after %d attempts" % attempts)
    return found


def as_text(name, note, request, pieces):
    lines = ["# %s: %s" % (name, note), "# request:"]
    text = request.decode("utf-8", "replace")
    if len(text) > 2000:
        text = text[:1000] + " ... (%d characters left out) ... " % (len(text) - 1500) + text[-500:]
    lines.extend("#   " + line for line in text.split("\r\n"))
    lines.append("# answer: %d bytes in %d reads" % (sum(len(p) for _, p in pieces), len(pieces)))
    lines.extend("recv +%.6f %r" % (seconds, piece) for seconds, piece in pieces)
    return "\n".join(lines) + "\n"


def main(argv=None):
    env = os.environ
    here = os.path.dirname(os.path.abspath(__file__))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", default=env.get("LLM_TEST_BASE_URL", "http://127.0.0.1:8080"))
    parser.add_argument("--model", default=env.get("LLM_TEST_MODEL", "tiny"))
    parser.add_argument("--api-key", default=env.get("LLM_TEST_API_KEY", ""))
    parser.add_argument("--auth-base-url", default=env.get("LLM_TEST_AUTH_BASE_URL", ""))
    parser.add_argument("--auth-key", default=env.get("LLM_TEST_AUTH_KEY", ""))
    parser.add_argument("--random-base-url", default="",
                        help="a server started with REALSERVER_MODE=random, for stream_random_text")
    parser.add_argument("--reasoning-base-url", default="",
                        help="a server that splits reasoning out, for *_reasoning")
    parser.add_argument("--out", default=os.path.join(here, "testdata", "llama_server"))
    parser.add_argument("--print", action="store_true", help="print each recording too")
    parser.add_argument("only", nargs="*", help="scenario names (default: all)")
    args = parser.parse_args(argv)

    main_server = loopback(args.base_url)
    auth_server = loopback(args.auth_base_url) if args.auth_base_url else None
    random_server = loopback(args.random_base_url) if args.random_base_url else None
    reasoning_server = loopback(args.reasoning_base_url) if args.reasoning_base_url else None
    os.makedirs(args.out, exist_ok=True)
    for name, which, payload, note in scenarios(args.model):
        if args.only and name not in args.only:
            continue
        if which == "auth":
            if auth_server is None:
                print("skip %s: no --auth-base-url" % name, file=sys.stderr)
                continue
            host, port, path = auth_server
            # a wrong key: the auth key with something appended, so it is never valid
            api_key = (args.auth_key or "sk-test") + "-wrong"
        elif which == "random":
            if random_server is None:
                print("skip %s: no --random-base-url" % name, file=sys.stderr)
                continue
            (host, port, path), api_key = random_server, ""
        elif which == "reasoning":
            if reasoning_server is None:
                print("skip %s: no --reasoning-base-url" % name, file=sys.stderr)
                continue
            (host, port, path), api_key = reasoning_server, ""
        elif which == "lost":
            host, port, path = main_server
            path, api_key = path.replace("/chat/completions", "/no/such/chat/completions"), args.api_key
        else:
            (host, port, path), api_key = main_server, args.api_key
        if which == "busy":
            request, pieces = record_when_busy(host, port, path, payload, api_key)
        else:
            request, pieces = record(host, port, path, payload, api_key)
        text = as_text(name, note, request, pieces)
        with open(os.path.join(args.out, name + ".bin"), "wb") as f:
            f.write(b"".join(piece for _, piece in pieces))
        with open(os.path.join(args.out, name + ".txt"), "w") as f:
            f.write(text)
        if args.print:
            sys.stdout.write(text + "\n")
        status = pieces[0][1].split(b"\r\n", 1)[0].decode("latin-1") if pieces else "(nothing)"
        print("%-22s %-28s %6d bytes, %3d reads" % (
            name, status, sum(len(p) for _, p in pieces), len(pieces)), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
