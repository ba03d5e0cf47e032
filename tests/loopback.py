"""The loopback servers the test suites share: ``from tests.loopback import ...``.

A loopback server listens on 127.0.0.1 (port 0: any free port) and serves each
connection in a thread of its own. It answers each request with the exact
bytes of a case, in steps, so that a test says what the client sees and when.
Its answers are used in order and the last one repeats. An answer is a list of
steps, or a function of the ``Request`` that returns the steps (a list, or a
generator).

The steps:

- ``bytes``: one send, a boundary the client's reads can see
- a number: a pause of that many seconds (a server that stalls or trickles)
- a function: called, with no arguments (to tell the test, or wait for it)
- ``CLOSE``: close the connection; ``RESET``: close it with a TCP reset;
  ``SHUTDOWN``: close it gracefully (a FIN), then read and drop what comes, as
  llama.cpp's server does right after a streamed answer; ``HANG``: wait until
  the test ends

An answer of ``UNREAD`` waits for the request to arrive, then closes without
reading it (a keep-alive timeout that fires as the request comes).

The answer builders: ``head()`` (the status line and headers), ``chunk()`` and
``END`` (HTTP/1.1 chunked framing), ``event()`` (one server-sent event),
``delta()`` (one chunk of a streamed reply), ``sse()`` (a streamed reply, one
HTTP chunk an event), ``raw_sse()`` (bytes sent as an event stream),
``message()`` and ``answer()`` (a whole reply), and ``echo`` (an answer that
repeats the request's last message, which ``say()`` makes).

Beside them: ``Server``, ``Proxy`` (CONNECT tunnels and forwarding to one
port), ``LoopbackCase`` (a test case that starts servers and clients and ends
them with the test), ``Writes`` (an ``out`` that keeps each write),
``in_thread()``, ``Lines`` and ``traced()`` (a client's trace, made plain) and
``free_port()``. This module holds no tests.

Tests order threads with events, never with pauses: a server's step sets an
event the test waits on, or waits on one the test sets (each wait bounded), and
``Server.wait_for_requests()`` waits until requests have arrived. For a state
that nothing signals, ``wait_until()`` checks a condition until it holds, within
a bound: the sockets a client keeps (``idle_socket()``, ``call_socket()``,
``readable()``) and whether another thread is reading a stream
(``read_elsewhere()``).
"""

import json
import os
import select
import socket
import ssl
import threading
import time
import unittest

import llm

HERE = os.path.dirname(os.path.abspath(__file__))
CA_FILE = os.path.join(HERE, "testdata", "ca.pem")
SERVER_PEM = os.path.join(HERE, "testdata", "server.pem")
KEY = "sk-test-SECRET-0123456789"
HI = [{"role": "user", "content": "Hi"}]
CLOSE, RESET, HANG = "close", "reset", "hang"
UNREAD = "unread"  # an answer: wait for the request to arrive, then close without reading it
SHUTDOWN = "shutdown"  # a step: close gracefully (a FIN), then read and drop what comes, as
                       # llama.cpp's server does right after a streamed answer


# ---------------------------------------------------------------- the answers


def chunk(data):
    """One HTTP/1.1 chunk."""
    return b"%x\r\n%s\r\n" % (len(data), data)


END = b"0\r\n\r\n"


def head(status=200, content_type="text/event-stream", chunked=True, length=None, extra=""):
    lines = ["HTTP/1.1 %d %s" % (status, "OK" if status == 200 else "Status")]
    if content_type:
        lines.append("Content-Type: " + content_type)
    if chunked:
        lines.append("Transfer-Encoding: chunked")
    elif length is not None:
        lines.append("Content-Length: %d" % length)
    else:
        lines.append("Connection: close")
    if extra:
        lines.append(extra)
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def event(obj):
    """A ``data:`` event for a dict, or the given text as it is."""
    text = obj if isinstance(obj, (str, bytes)) else json.dumps(obj, ensure_ascii=False)
    text = text.encode() if isinstance(text, str) else text
    return b"data: " + text + b"\n\n"


def delta(content=None, finish=None, **fields):
    if content is not None:
        fields["content"] = content
    return {"id": "chatcmpl-1", "model": "m", "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": fields, "finish_reason": finish}]}


def sse(*events, **options):
    """Steps of a chunked event stream: one chunk per event, then [DONE] unless done=False."""
    steps = [head()]
    for item in events:
        steps.append(chunk(event(item)) if isinstance(item, dict) else item)  # other steps as they are
    if options.get("done", True):
        steps.append(chunk(b"data: [DONE]\n\n"))
    steps.append(END)
    return steps


def raw_sse(body, chunked=True):
    """Steps that send ``body`` (bytes, or a list of bytes sends) as an event stream."""
    parts = body if isinstance(body, list) else [body]
    if not chunked:
        return [head(chunked=False)] + parts + [CLOSE]
    return [head()] + [chunk(p) for p in parts] + [END]


def answer(obj, status=200, extra=""):
    body = json.dumps(obj).encode() if not isinstance(obj, bytes) else obj
    ctype = "application/json" if not isinstance(obj, bytes) else "text/html"
    return [head(status, ctype, chunked=False, length=len(body), extra=extra) + body]


def message(content="Hello", finish="stop", usage=None, **fields):
    fields.setdefault("role", "assistant")
    fields["content"] = content
    reply = {"id": "chatcmpl-9", "model": "m", "object": "chat.completion",
             "choices": [{"index": 0, "message": fields, "finish_reason": finish}]}
    if usage:
        reply["usage"] = usage
    return reply


def say(text):
    return [{"role": "user", "content": text}]


def echo(request):
    """An answer that repeats the request's last message: each call can tell its own."""
    return answer(message(request.json()["messages"][-1]["content"]))


# ---------------------------------------------------------------- the servers


class Request:
    def __init__(self, connection, line, headers, body):
        self.connection, self.line, self.headers, self.body = connection, line, headers, body
        self.method, self.path = line.split()[:2]

    def json(self):
        return json.loads(self.body.decode())


class Listening:
    """A listener on a loopback port; ``serve(sock, number)`` serves each connection in a thread.

    close() ends them all: it shuts down every socket, since closing a socket
    wakes no thread blocked on it (a listener closed that way even goes on
    accepting), and waits for every thread, so that a test leaves nothing running.
    """

    def __init__(self, port=0):
        self.ended = threading.Event()
        self.lock = threading.Lock()
        self.sockets, self.threads = [], []
        self.connections = 0
        self.listener = socket.socket()
        if port:  # a given port can be taken again while the connections of the last are closing
            self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", port))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        self.start(self._accept)

    def start(self, target, *args):
        """Run target(*args) in a thread that close() waits for."""
        thread = threading.Thread(target=target, args=args, daemon=True)
        with self.lock:
            self.threads.append(thread)
        thread.start()

    def keep(self, sock):
        """Have close() shut sock down; once close() has begun, close it and say False."""
        with self.lock:
            if not self.ended.is_set():
                self.sockets.append(sock)
                return True
        sock.close()
        return False

    def close(self):
        with self.lock:
            self.ended.set()
            sockets = [self.listener] + self.sockets
        for sock in sockets:
            shut(sock)
        index = 0
        while index < len(self.threads):  # a thread may start another until it ends
            self.threads[index].join(10)
            if self.threads[index].is_alive():
                raise AssertionError("a loopback server's thread did not end: %r" % self.threads[index])
            index += 1

    def _accept(self):
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            if not self.keep(sock):
                return
            with self.lock:
                self.connections += 1
                number = self.connections
            self.start(self.serve, sock, number)


def shut(sock):
    """Shut sock down, waking any thread blocked on it, and close it."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


class Server(Listening):
    """A loopback HTTP server that answers each request with the steps of an answer.

    Answers are used in order and the last one repeats. An answer is a list of
    steps, or a function of the Request that returns one. Steps: bytes (one
    send), a number (seconds to pause), a function (called), CLOSE, RESET
    (a TCP reset) or HANG (wait until the test ends). ``port`` is any free
    port, unless given: a server can come back where one went away.
    """

    def __init__(self, *answers, tls=False, port=0):
        self.answers = list(answers)
        self.requests = []
        self.arrived = threading.Condition()  # notified as each request arrives
        self.unread = 0  # requests that arrived and were never read (UNREAD)
        self.context = None
        if tls:
            self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.context.load_cert_chain(SERVER_PEM)
        Listening.__init__(self, port)
        self.url = "%s://127.0.0.1:%d" % ("https" if tls else "http", self.port)

    def serve(self, sock, number):
        reader = None
        try:
            sock.settimeout(10)
            # each step goes out as it is given, not held back for the client's ACK (Nagle's)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.context is not None:
                sock = self.context.wrap_socket(sock, server_side=True)
                if not self.keep(sock):  # the wrapped socket is the one to shut down now
                    return
            reader = sock.makefile("rb")
            while self._answer(sock, reader, number):
                pass
        except (OSError, ValueError):
            pass
        finally:
            try:  # the reader holds the socket open until closed (PyPy has no refcounting)
                if reader is not None:
                    reader.close()
                sock.close()
            except OSError:
                pass

    def _answer(self, sock, reader, number):
        with self.lock:
            upcoming = self.answers[min(len(self.requests) + self.unread + 1, len(self.answers)) - 1]
        if upcoming == UNREAD:  # a keep-alive timeout that fires as the request arrives
            select.select([sock], [], [], 10)
            with self.lock:
                self.unread += 1
            return False  # closed with the request unread: the kernel answers with a reset
        line = reader.readline()
        if not line:
            return False
        headers = {}
        while True:
            header = reader.readline()
            if header in (b"\r\n", b"\n", b""):
                break
            name, _, value = header.decode("latin-1").partition(":")
            if name.strip().lower() == "content-length" in headers:
                # uvicorn's parser (llhttp, through httptools) refuses it: "Duplicate Content-Length"
                sock.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\n"
                             b"Connection: close\r\nContent-Length: 30\r\n\r\nInvalid HTTP request received.")
                return False
            headers[name.strip().lower()] = value.strip()
        body = reader.read(int(headers.get("content-length", 0)))
        request = Request(number, line.decode("latin-1"), headers, body)
        with self.lock:
            self.requests.append(request)
            steps = self.answers[min(len(self.requests) + self.unread, len(self.answers)) - 1]
        with self.arrived:
            self.arrived.notify_all()
        if callable(steps):
            steps = steps(request)
        for step in steps:
            if isinstance(step, bytes):
                sock.sendall(step)
            elif isinstance(step, (int, float)):
                self.ended.wait(step)
            elif callable(step):
                step()
            elif step == CLOSE:
                return False
            elif step == SHUTDOWN:
                sock.shutdown(socket.SHUT_WR)
                while reader.read1(65536):  # bounded: the client closes its end, or the test ends
                    pass
                return False
            elif step == RESET:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
                return False
            elif step == HANG:
                self.ended.wait(10)
                return False
        return True

    def wait_for_requests(self, count, timeout=10):
        """Wait until ``count`` requests have arrived in all; whether they did in time."""
        with self.arrived:
            return self.arrived.wait_for(lambda: len(self.requests) >= count, timeout)


class Proxy(Listening):
    """A loopback proxy: CONNECT tunnels and absolute-URL forwarding, all to one port."""

    def __init__(self, target_port):
        self.target_port, self.seen = target_port, []
        Listening.__init__(self)
        self.url = "http://127.0.0.1:%d" % self.port

    def serve(self, sock, number):
        sock.settimeout(10)
        upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=10)
        reader = None
        try:
            if not self.keep(upstream):
                return
            reader = sock.makefile("rb")
            lines = [reader.readline()]
            while lines[-1] not in (b"\r\n", b""):
                lines.append(reader.readline())
            self.seen.append(b"".join(lines).decode("latin-1"))
            if lines[0].startswith(b"CONNECT"):
                sock.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            else:
                length = [int(l.split(b":")[1]) for l in lines if l.lower().startswith(b"content-length")]
                upstream.sendall(b"".join(lines) + reader.read(length[0] if length else 0))
            self.start(pipe, upstream, sock)
            pipe(sock, upstream)
        except OSError:
            pass
        finally:
            if reader is not None:
                reader.close()
            upstream.close()
            sock.close()


def pipe(source, target):
    try:
        while True:
            data = source.recv(65536)
            if not data:
                break
            target.sendall(data)
    except OSError:
        pass
    try:
        target.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def free_port():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


# ---------------------------------------------------------------- the test's side


class LoopbackCase(unittest.TestCase):
    """A test case with helpers to start loopback servers and clients for them."""

    def serve(self, *answers, **options):
        server = Server(*answers, **options)
        self.addCleanup(server.close)
        return server

    def listener(self, backlog):
        """A socket listening on a loopback port, closed when the test ends; nothing accepts."""
        listener = socket.socket()
        self.addCleanup(shut, listener)
        listener.bind(("127.0.0.1", 0))
        listener.listen(backlog)
        return listener

    def client(self, server, **options):
        options.setdefault("model", "m")
        options.setdefault("timeout", 5)
        options.setdefault("api_key", "")
        client = llm.Client(server.url if isinstance(server, Server) else server, **options)
        self.addCleanup(client.close)
        return client

    def stream(self, steps, **options):
        """Serve one answer, stream it with chat_stream; return (response, writes, server)."""
        server = self.serve(steps)
        writes = []
        response = self.client(server, **options).chat_stream(HI, Writes(writes))
        return response, writes, server


class Writes:
    """An ``out`` that keeps each write, and can fail or signal on them."""

    def __init__(self, writes=None, fail_after=None, on_write=None):
        self.writes = writes if writes is not None else []
        self.fail_after, self.on_write = fail_after, on_write
        self.flushes = 0

    def write(self, text):
        if self.fail_after is not None and len(self.writes) >= self.fail_after:
            raise BrokenPipeError(32, "Broken pipe")
        self.writes.append(text)
        if self.on_write:
            self.on_write(text)

    def flush(self):
        self.flushes += 1


class Interleaved(Writes):
    """An ``out`` with ``write_reasoning``: ``seen`` keeps ("reasoning" or "content", text)
    in the order they came."""

    def __init__(self):
        Writes.__init__(self)
        self.seen = []

    def write_reasoning(self, text):
        self.seen.append(("reasoning", text))

    def write(self, text):
        self.seen.append(("content", text))


def examples(weight):
    """How many examples a property tries: LLM_FUZZ_EXAMPLES, else a quarter of its weight."""
    try:
        return int(os.environ.get("LLM_FUZZ_EXAMPLES") or weight // 4)
    except ValueError:
        return weight // 4


def fuzz(weight):
    """Hypothesis's settings for a property: examples(weight), no deadline, no database."""
    from hypothesis import HealthCheck, settings  # only where hypothesis is installed
    return settings(max_examples=examples(weight), deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much, HealthCheck.large_base_example])


def in_thread(function, *args):
    """Run function in a thread; return (thread, results list)."""
    results = []
    thread = threading.Thread(target=lambda: results.append(function(*args)), daemon=True)
    thread.start()
    return thread, results


class Lines:
    """A trace writer that keeps its lines."""

    def __init__(self):
        self.text = ""

    def write(self, text):
        self.text += text


def traced(client, writer):
    """The lines traced so far, times and ports made plain: "+0.012s" is "+T"."""
    import re
    client._settings.tracer.flush(5)
    return [re.sub(r"127\.0\.0\.1:\d+", "127.0.0.1:PORT", re.sub(r"\+\d+\.\d{3}s", "+T", line))
            for line in writer.text.splitlines()]


# ---------------------------------------------------------------- what a test cannot be told


def wait_until(condition, timeout=10, pause=0.01):
    """Check ``condition()`` until it is true: its last value (false when timeout passed first).

    For a state that nothing signals: another process's, the kernel's, or a
    client's inside llm.py. Where the test, or a server's step, can set an
    event instead, the test waits on that.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(pause)


def readable(sock, timeout=10):
    """Wait until sock has something to read (bytes, or the peer's close); whether it came."""
    if hasattr(select, "poll"):  # select() cannot watch a descriptor past FD_SETSIZE
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        return bool(poller.poll(timeout * 1000))
    return bool(select.select([sock], [], [], timeout)[0])


def idle_socket(client):
    """The socket of the connection that client keeps open for this thread between calls."""
    slot = getattr(client._local, "slot", None)
    connection = slot.connection if slot is not None else None
    return connection.sock if connection is not None else None


def call_socket(client):
    """The socket of client's call in flight, as cancel() sees it (None before it has one)."""
    with client._lock:
        calls = list(client._active)
    return calls[0].sock if calls else None


def read_elsewhere(stream):
    """Whether a thread other than this one is inside stream now, reading it."""
    if stream._reading.acquire(False):  # the lock a reading thread holds while it reads
        stream._reading.release()
        return False
    return True
