"""The benchmark's loopback server: pre-rendered chat completions on 127.0.0.1.

Run as its own process (``python loopback.py``) so that its work is never
counted with a client's: it prints ``port <n>`` on stdout once it listens, and
exits when its stdin closes or after ``--lifetime`` seconds.

Each request is routed by the first segment of its path, so that a client's
base URL picks the scenario (``http://127.0.0.1:<port>/<scenario>/v1``):

``json``                    one non-stream reply, ``Content-Length`` framing
``echo``                    the same, answering the ``ask-<a>-<b>`` token found
                            in the request, so that crossed replies show
``sse-<n>``                 a stream of ``n`` content events, one chunk each
``sse-<n>-length``          the same events in a body framed by ``Content-Length``
                            (no chunking), as some servers and proxies send them
``tick-<n>-<ms>-chunked``   ``n`` events ``ms`` apart, each carrying the time
``tick-<n>-<ms>-close``     it was sent; the second form has no chunking and no
                            length: the body ends when the server closes

Keep-alive everywhere except ``-close``. The renderings are functions of this
module so that the benchmark knows every expected answer and byte count.
Standard library only; Python 3.6 and later.
"""

import json
import re
import socket
import sys
import threading
import time

MODEL = "bench-model"
REPLY_TEXT = "Hello! I am a pre-rendered reply from the loopback server. How can I help?"
WORDS = (" lorem", " ipsum", " dolor", " sit", " amet", ",", " consectetur", " adipiscing",
         " elit", ".", " Sed", " do", " eiusmod", " tempor", " incididunt", " \u00e9t\u00e9")
_ASK = re.compile(rb"ask-[0-9]+-[0-9]+")
_CHUNK_ID = "chatcmpl-bench0123456789abcdef"
_USAGE = {"prompt_tokens": 12, "completion_tokens": 34, "total_tokens": 46}
_RECV_TIMEOUT = 120.0  # an idle connection is dropped after this
_MAX_REQUEST = 1 << 20


def stream_text(events):
    """The text that a stream of ``events`` content events carries."""
    return "".join(WORDS[i % len(WORDS)] for i in range(events))


def echo_text(token):
    return "answer to " + token


def _reply_body(text):
    return json.dumps({
        "id": _CHUNK_ID, "object": "chat.completion", "created": 1700000000, "model": MODEL,
        "system_fingerprint": "fp_bench",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                     "logprobs": None, "finish_reason": "stop"}],
        "usage": _USAGE}).encode("utf-8")


def _json_response(body):
    head = ("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            "Content-Length: %d\r\nConnection: keep-alive\r\n\r\n" % len(body))
    return head.encode("ascii") + body


def json_response():
    """The whole ``json`` answer, head and body."""
    return _json_response(_reply_body(REPLY_TEXT))


def _chunk(delta, finish=None):
    return json.dumps({
        "id": _CHUNK_ID, "object": "chat.completion.chunk", "created": 1700000000,
        "model": MODEL, "system_fingerprint": "fp_bench",
        "choices": [{"index": 0, "delta": delta, "logprobs": None,
                     "finish_reason": finish}]}, ensure_ascii=False)


def _events(contents):
    """The SSE events of one streamed reply, as ``bytes``: role, contents, end, usage, DONE."""
    out = [_chunk({"role": "assistant", "content": ""})]
    out.extend(_chunk({"content": text}) for text in contents)
    out.append(_chunk({}, "stop"))
    out.append(json.dumps({"id": _CHUNK_ID, "object": "chat.completion.chunk",
                           "created": 1700000000, "model": MODEL, "choices": [],
                           "usage": _USAGE}))
    out.append("[DONE]")
    return [("data: %s\n\n" % event).encode("utf-8") for event in out]


_SSE_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
             b"Transfer-Encoding: chunked\r\nConnection: keep-alive\r\n\r\n")
_CLOSE_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
               b"Connection: close\r\n\r\n")
_LENGTH_HEAD = ("HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
                "Content-Length: %d\r\nConnection: keep-alive\r\n\r\n")


def _chunked(event):
    return b"%x\r\n%s\r\n" % (len(event), event)


def sse_response(events, framing="chunked"):
    """The whole ``sse-<events>`` answer: one HTTP chunk per event, as servers send them.

    With ``framing="length"``, the ``sse-<events>-length`` answer: the same
    events in one body framed by ``Content-Length``.
    """
    contents = _events([WORDS[i % len(WORDS)] for i in range(events)])
    if framing == "length":
        body = b"".join(contents)
        return (_LENGTH_HEAD % len(body)).encode("ascii") + body
    if framing != "chunked":
        raise ValueError("framing: chunked or length, not %r" % (framing,))
    return _SSE_HEAD + b"".join(_chunked(e) for e in contents) + b"0\r\n\r\n"


def sse_scenario(scenario):
    """``sse-<n>`` or ``sse-<n>-length``: (n, framing)."""
    count, _, framing = scenario[4:].partition("-")
    return int(count), framing or "chunked"


def request_bytes(scenario, body):
    """A minimal POST for the raw-socket reference client."""
    head = ("POST /%s/v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            "Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % (scenario, len(body)))
    return head.encode("ascii") + body


# ---------------------------------------------------------------- the server


class _Server(object):
    def __init__(self):
        self.cache = {}
        self.lock = threading.Lock()

    def rendered(self, key, make):
        with self.lock:
            value = self.cache.get(key)
        if value is None:
            value = make()
            with self.lock:
                self.cache[key] = value
        return value

    def serve(self, sock):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(_RECV_TIMEOUT)
        buffer = b""
        try:
            while True:
                request = self._request(sock, buffer)
                if request is None:
                    return
                path, body, buffer = request
                if not self.answer(sock, path, body):
                    return
        except (OSError, ValueError):
            pass
        finally:
            sock.close()

    def _request(self, sock, buffer):
        """Read one request: (path, body, what follows), or None at the end."""
        while b"\r\n\r\n" not in buffer:
            data = sock.recv(65536)
            if not data or len(buffer) > _MAX_REQUEST:
                return None
            buffer += data
        head, _, rest = buffer.partition(b"\r\n\r\n")
        line_end = head.find(b"\r\n")
        parts = head[:line_end if line_end >= 0 else len(head)].split(b" ")
        path = parts[1] if len(parts) > 1 else b"/"
        length = 0
        at = head.lower().find(b"\r\ncontent-length:")
        if at >= 0:
            end = head.find(b"\r\n", at + 2)
            length = int(head[at + 17:end if end >= 0 else len(head)].strip())
        if length > _MAX_REQUEST:
            return None
        while len(rest) < length:
            data = sock.recv(65536)
            if not data:
                return None
            rest += data
        return path, rest[:length], rest[length:]

    def answer(self, sock, path, body):
        """Send the answer; False when the connection must close afterwards."""
        scenario = path.split(b"/")[1].decode("ascii", "replace") if path.count(b"/") > 1 else ""
        if scenario == "json":
            sock.sendall(self.rendered("json", json_response))
        elif scenario == "echo":
            found = _ASK.search(body)
            token = found.group().decode("ascii") if found else "nothing"
            sock.sendall(_json_response(_reply_body(echo_text(token))))
        elif scenario.startswith("sse-"):
            events, framing = sse_scenario(scenario)
            events = min(events, 1000000)
            sock.sendall(self.rendered(scenario, lambda: sse_response(events, framing)))
        elif scenario.startswith("tick-"):
            _, count, interval, framing = scenario.split("-")
            return self.tick(sock, min(int(count), 10000), float(interval) / 1000.0,
                             framing == "chunked")
        else:
            body = b"not found"
            sock.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: %d\r\n\r\n%s"
                         % (len(body), body))
        return True

    def tick(self, sock, count, interval, chunked):
        """Send ``count`` events ``interval`` apart, each with the time it is sent."""
        sock.sendall(_SSE_HEAD if chunked else _CLOSE_HEAD)
        frame = _chunked if chunked else (lambda event: event)
        events = _events(["%TIME%"] * count)
        start = time.time()
        for number, event in enumerate(events):
            if 1 <= number <= count:  # the content events
                pause = start + number * interval - time.time()
                if pause > 0:
                    time.sleep(pause)
                event = event.replace(b"%TIME%", b"%.6f" % time.time())
            sock.sendall(frame(event))
        if chunked:
            sock.sendall(b"0\r\n\r\n")
            return True
        sock.shutdown(socket.SHUT_RDWR)
        return False


def _serve_forever(listener, server, lifetime):
    deadline = time.time() + lifetime
    listener.settimeout(1.0)
    while time.time() < deadline:
        try:
            sock, _ = listener.accept()
        except socket.timeout:
            continue
        thread = threading.Thread(target=server.serve, args=(sock,))
        thread.daemon = True
        thread.start()


def _exit_when_parent_goes():
    try:
        sys.stdin.read()
    finally:
        import os
        os._exit(0)


def main(argv):
    lifetime = 3600.0
    if "--lifetime" in argv:
        lifetime = float(argv[argv.index("--lifetime") + 1])
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    watcher = threading.Thread(target=_exit_when_parent_goes)
    watcher.daemon = True
    watcher.start()
    server = _Server()
    for events in (20000,):  # the big stream is rendered before the first client asks
        key = "sse-%d" % events
        server.cache[key] = sse_response(events)
    sys.stdout.write("port %d\n" % listener.getsockname()[1])
    sys.stdout.flush()
    _serve_forever(listener, server, lifetime)


if __name__ == "__main__":
    main(sys.argv[1:])
