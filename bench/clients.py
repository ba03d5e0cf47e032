"""The clients under benchmark, each behind the same two calls, and the worker loop.

Every client lives in its own worker process (``python clients.py --worker
<name> <base-url>``), so that no client's imports, heap or threads weigh on
another's figures. The worker reads one JSON command per line on stdin and
answers one JSON line on stdout; it ends when stdin closes.

``python clients.py --rss <name> <base-url>`` is the fresh process of the
memory measure: import the client, make one call, print the peak RSS in KiB
and where it was read (``VmHWM`` on Linux, else ``ru_maxrss``).

The clients:

``floor``     ``http.client`` written for speed: keep-alive POST, ``read1`` and a
              line split, ``json.loads`` on every event; the practical floor
``wire``      a raw socket that only counts the server's bytes: the cost of the
              server and the loopback alone, to show that neither is the bottleneck
``llm``       llm.py (``--llm-path``)
``openai``    the official SDK
``requests``  ``requests.Session``, ``iter_lines`` for streams
``httpx``     ``httpx.Client``, ``iter_lines`` for streams

Top-level imports are kept to ``os`` and ``sys`` so that the memory figure of
each client counts that client's own imports only. Python 3.6 and later.
"""

import os
import sys

MODEL = "bench-model"
API_KEY = "bench-key"
MESSAGES = [{"role": "system", "content": "You are a test."},
            {"role": "user", "content": "Say hello."}]
PEERS = ("openai", "requests", "httpx")
_TIMEOUT = 60.0


def _path(scenario):
    return "/%s/v1/chat/completions" % scenario


def _host_port(base):
    host_port = base.split("://", 1)[1].rstrip("/")
    host, _, port = host_port.rpartition(":")
    return host, int(port)


# ---------------------------------------------------------------- the clients


class Floor(object):
    """``http.client`` at its fastest: what any client has to spend at least."""

    name = "floor"

    def __init__(self, base, llm_path=None):
        import http.client
        import json
        import socket
        import threading

        self._http, self._socket = http.client, socket
        self._dumps, self._loads = json.dumps, json.loads
        self._host, self._port = _host_port(base)
        self._local = threading.local()  # one keep-alive connection per thread
        self._auth = "Bearer " + API_KEY
        self.version = "stdlib"

    def _connection(self):
        connection = getattr(self._local, "connection", None)
        if connection is None:
            connection = self._local.connection = self._http.HTTPConnection(
                self._host, self._port, timeout=_TIMEOUT)
        if connection.sock is None:
            connection.connect()
            connection.sock.setsockopt(self._socket.IPPROTO_TCP, self._socket.TCP_NODELAY, 1)
        return connection

    def _post(self, scenario, messages, stream):
        body = {"model": MODEL, "messages": messages}
        if stream:
            body["stream"] = True
        connection = self._connection()
        connection.request("POST", _path(scenario), self._dumps(body).encode("utf-8"), {
            "Content-Type": "application/json", "Authorization": self._auth,
            "Accept": "text/event-stream" if stream else "application/json"})
        reply = connection.getresponse()
        if reply.status != 200:
            reply.read()
            raise RuntimeError("HTTP %d" % reply.status)
        return reply

    def chat(self, scenario, messages):
        reply = self._post(scenario, messages, False)
        return self._loads(reply.read())["choices"][0]["message"]["content"]

    def stream(self, scenario, messages, out):
        write, loads = out.write, self._loads
        reply = self._post(scenario, messages, True)
        read1 = reply.read1
        rest = b""
        done = False
        while True:
            data = read1(65536)
            if not data:
                reply.close()  # a Content-Length body that was read to its end stays open
                break
            lines = (rest + data if rest else data).split(b"\n")
            rest = lines.pop()
            for line in lines:
                if line[:6] == b"data: ":
                    payload = line[6:]
                    if payload == b"[DONE]":
                        done = True
                        continue
                    choices = loads(payload.decode("utf-8"))["choices"]
                    if choices:
                        text = choices[0]["delta"].get("content")
                        if text:
                            write(text)
        if not done:
            raise RuntimeError("stream ended before [DONE]")


class Wire(object):
    """Bytes only: send a prepared request, read the known number of bytes back."""

    name = "wire"

    def __init__(self, base, llm_path=None):
        import json
        import socket

        import loopback

        self._loopback, self._socket = loopback, socket
        self._address = _host_port(base)
        self._sock = None
        self._buffer = bytearray(1 << 16)
        self._requests = {}
        self._dumps = json.dumps
        self.version = "socket"

    def _exchange(self, scenario, messages, expected):
        request = self._loopback.request_bytes(
            scenario, self._dumps({"model": MODEL, "messages": messages}).encode("utf-8"))
        if self._sock is None:
            self._sock = self._socket.create_connection(self._address, timeout=_TIMEOUT)
            self._sock.setsockopt(self._socket.IPPROTO_TCP, self._socket.TCP_NODELAY, 1)
        self._sock.sendall(request)
        remaining = expected
        recv_into, buffer = self._sock.recv_into, self._buffer
        while remaining > 0:
            got = recv_into(buffer)
            if not got:
                raise RuntimeError("the server closed the connection")
            remaining -= got

    def chat(self, scenario, messages):
        if scenario != "json":
            raise RuntimeError("the wire client only counts json and sse-<n> replies")
        self._exchange(scenario, messages, self._size(scenario, self._loopback.json_response))
        return self._loopback.REPLY_TEXT

    def stream(self, scenario, messages, out):
        if not scenario.startswith("sse-"):
            raise RuntimeError("the wire client only counts json and sse-<n> replies")
        events, framing = self._loopback.sse_scenario(scenario)
        self._exchange(scenario, messages, self._size(
            scenario, lambda: self._loopback.sse_response(events, framing)))

    def _size(self, scenario, render):
        size = self._requests.get(scenario)
        if size is None:
            size = self._requests[scenario] = len(render())
        return size


class Llm(object):
    name = "llm"

    def __init__(self, base, llm_path=None):
        llm_path = os.path.abspath(llm_path or os.path.join(
            os.path.dirname(os.path.abspath(__file__)), os.pardir, "llm.py"))
        if os.path.basename(llm_path) != "llm.py":
            raise ValueError("--llm-path must name a file called llm.py")
        sys.path.insert(0, os.path.dirname(llm_path))
        import llm

        if os.path.abspath(llm.__file__) != llm_path:
            raise ValueError("imported %s instead of %s" % (llm.__file__, llm_path))
        self._llm, self._base, self._clients = llm, base, {}
        self.version = llm.__version__

    def _client(self, scenario):
        client = self._clients.get(scenario)
        if client is None:
            client = self._clients[scenario] = self._llm.Client(
                self._base + "/%s/v1" % scenario, model=MODEL, api_key=API_KEY,
                timeout=_TIMEOUT)
        return client

    def chat(self, scenario, messages):
        reply = self._client(scenario).chat(messages)
        if not reply.ok:
            raise RuntimeError(reply.error)
        return reply.content

    def stream(self, scenario, messages, out):
        reply = self._client(scenario).chat_stream(messages, out)
        if not reply.ok:
            raise RuntimeError(reply.error)


class OpenAI(object):
    name = "openai"

    def __init__(self, base, llm_path=None):
        import openai

        self._openai, self._base, self._clients = openai, base, {}
        self.version = openai.__version__

    def _client(self, scenario):
        client = self._clients.get(scenario)
        if client is None:
            client = self._clients[scenario] = self._openai.OpenAI(
                base_url=self._base + "/%s/v1" % scenario, api_key=API_KEY, max_retries=0,
                timeout=_TIMEOUT)
        return client

    def chat(self, scenario, messages):
        reply = self._client(scenario).chat.completions.create(model=MODEL, messages=messages)
        return reply.choices[0].message.content

    def stream(self, scenario, messages, out):
        write = out.write
        for chunk in self._client(scenario).chat.completions.create(
                model=MODEL, messages=messages, stream=True):
            if chunk.choices:
                text = chunk.choices[0].delta.content
                if text:
                    write(text)


class Requests(object):
    name = "requests"

    def __init__(self, base, llm_path=None):
        import json

        import requests

        self._base, self._loads = base, json.loads
        self._session = requests.Session()
        self._session.headers["Authorization"] = "Bearer " + API_KEY
        self.version = requests.__version__

    def chat(self, scenario, messages):
        reply = self._session.post(self._base + _path(scenario), timeout=_TIMEOUT,
                                   json={"model": MODEL, "messages": messages})
        reply.raise_for_status()
        return reply.json()["choices"][0]["message"]["content"]

    def stream(self, scenario, messages, out):
        write, loads = out.write, self._loads
        with self._session.post(self._base + _path(scenario), timeout=_TIMEOUT, stream=True,
                                json={"model": MODEL, "messages": messages,
                                      "stream": True}) as reply:
            reply.raise_for_status()
            for line in reply.iter_lines():
                if line.startswith(b"data: "):
                    if line == b"data: [DONE]":
                        break
                    choices = loads(line[6:])["choices"]
                    if choices:
                        text = choices[0]["delta"].get("content")
                        if text:
                            write(text)


class Httpx(object):
    name = "httpx"

    def __init__(self, base, llm_path=None):
        import json

        import httpx

        self._base, self._loads = base, json.loads
        self._client = httpx.Client(timeout=_TIMEOUT,
                                    headers={"Authorization": "Bearer " + API_KEY})
        self.version = httpx.__version__

    def chat(self, scenario, messages):
        reply = self._client.post(self._base + _path(scenario),
                                  json={"model": MODEL, "messages": messages})
        reply.raise_for_status()
        return reply.json()["choices"][0]["message"]["content"]

    def stream(self, scenario, messages, out):
        write, loads = out.write, self._loads
        with self._client.stream("POST", self._base + _path(scenario),
                                 json={"model": MODEL, "messages": messages,
                                       "stream": True}) as reply:
            reply.raise_for_status()
            for line in reply.iter_lines():
                if line.startswith("data: "):
                    if line == "data: [DONE]":
                        break
                    choices = loads(line[6:])["choices"]
                    if choices:
                        text = choices[0]["delta"].get("content")
                        if text:
                            write(text)


ADAPTERS = {cls.name: cls for cls in (Floor, Wire, Llm, OpenAI, Requests, Httpx)}


# ---------------------------------------------------------------- the measures, in the worker


class Sink(list):
    """``out`` for chat_stream: keeps the deltas, costs one list append per write."""

    write = list.append


class TimedSink(object):
    """``out`` that notes when each delta arrived."""

    def __init__(self):
        import time

        self.arrivals = []
        self._now = time.time

    def write(self, text):
        self.arrivals.append((self._now(), text))


def _nonstream(adapter, command):
    import time

    import loopback

    clock, chat, expected = time.perf_counter, adapter.chat, loopback.REPLY_TEXT
    for _ in range(command["warmup"]):
        chat("json", MESSAGES)
    latencies, wrong = [], 0
    for _ in range(command["calls"]):
        start = clock()
        text = chat("json", MESSAGES)
        latencies.append(clock() - start)
        if text != expected:
            wrong += 1
    return {"latencies": latencies, "wrong": wrong}


def _stream(adapter, command):
    import time

    import loopback

    events = command["events"]
    scenario = "sse-%d" % events
    adapter.stream("sse-50", MESSAGES, Sink())  # warm-up
    times, wrong = [], 0
    for _ in range(command.get("repeat", 1)):
        out = Sink()
        start = time.perf_counter()
        adapter.stream(scenario, MESSAGES, out)
        times.append(time.perf_counter() - start)
        if adapter.name != "wire" and (len(out) != events
                                       or "".join(out) != loopback.stream_text(events)):
            wrong += 1
    return {"seconds": min(times), "all_seconds": times, "events": events, "wrong": wrong}


def _tick(adapter, command):
    out = TimedSink()
    scenario = "tick-%d-%d-%s" % (command["events"], command["interval_ms"], command["framing"])
    adapter.stream(scenario, MESSAGES, out)
    delays = [(arrived - float(text)) * 1000.0 for arrived, text in out.arrivals]
    return {"delays_ms": delays, "wrong": 0 if len(delays) == command["events"] else 1}


def _threads(adapter, command):
    import threading
    import time

    threads, calls = command["threads"], command["calls"]
    counts = {"wrong": 0, "errors": 0, "first_error": ""}
    lock = threading.Lock()
    barrier = threading.Barrier(threads + 1, timeout=_TIMEOUT)

    def work(number):
        wrong = errors = 0
        first = ""
        barrier.wait()
        for call in range(calls):
            token = "ask-%d-%d" % (number, call)
            try:
                text = adapter.chat("echo", [{"role": "user",
                                              "content": "Please answer " + token}])
            except Exception as exc:
                errors += 1
                first = first or "%s: %s" % (type(exc).__name__, exc)
                continue
            if text != "answer to " + token:
                wrong += 1
        with lock:
            counts["wrong"] += wrong
            counts["errors"] += errors
            counts["first_error"] = counts["first_error"] or first

    workers = [threading.Thread(target=work, args=(number,)) for number in range(threads)]
    for worker in workers:
        worker.daemon = True
        worker.start()
    barrier.wait()
    start = time.perf_counter()
    for worker in workers:
        worker.join(_TIMEOUT * 10)
    seconds = time.perf_counter() - start
    counts.update(seconds=seconds, calls=threads * calls)
    return counts


def _warm(adapter, command):
    for _ in range(command.get("calls", 20)):
        adapter.chat("json", MESSAGES)
    adapter.stream("sse-200", MESSAGES, Sink())
    return {}


def _profile(adapter, command):
    """Run one measure under cProfile and return the top of the report."""
    import cProfile
    import io
    import pstats

    operation = _OPERATIONS[command["measure"]]
    profiler = cProfile.Profile()
    profiler.enable()
    operation(adapter, command)
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats(command.get("sort", "tottime")).print_stats(
        command.get("lines", 30))
    return {"report": text.getvalue()}


def _bytecodes(adapter, command):
    """Python bytecode instructions run per non-stream call and per streamed event, by file.

    A count, not a time: it has none of a shared machine's noise. Traced with
    ``frame.f_trace_opcodes`` (Python 3.7 and later); the trace function's own
    work is not counted. A streamed event is one of ``events`` in one reply,
    the call's own work included and shared out; twice: a chunked reply
    (``stream``) and one framed by ``Content-Length`` (``stream_length``).
    """
    import collections

    import loopback

    counts = collections.Counter()

    def tracer(frame, event, arg):
        frame.f_trace_opcodes = True
        if event == "opcode":
            counts[os.path.basename(frame.f_code.co_filename)] += 1
        return tracer

    def nothing():
        return None

    # CPython 3.12.1 sends no opcode events in the first session of sys.settrace: one that
    # counts nothing comes first
    sys.settrace(tracer)
    try:
        nothing()
    finally:
        sys.settrace(None)
    calls, events = command["calls"], command["events"]
    chat, stream = adapter.chat, adapter.stream
    work = {  # measure: (the count's divisor, the calls traced, one call, its expected result)
        "nonstream": (calls, calls, lambda _: chat("json", MESSAGES), loopback.REPLY_TEXT),
        "stream": (events, 1, lambda out: stream("sse-%d" % events, MESSAGES, out),
                   loopback.stream_text(events)),
        "stream_length": (events, 1, lambda out: stream("sse-%d-length" % events, MESSAGES, out),
                          loopback.stream_text(events))}
    answer = {}
    for measure, (per, repeats, operation, expected) in work.items():
        sinks = [Sink() for _ in range(repeats + 1)]
        results = [operation(sinks[0])]  # warm: connected, and every lazy import done
        counts.clear()
        sys.settrace(tracer)
        try:
            for number in range(repeats):
                results.append(operation(sinks[number + 1]))
        finally:
            sys.settrace(None)
        if measure != "nonstream":
            results = ["".join(out) for out in sinks]
        if any(result != expected for result in results):  # a count of a failing call is no count
            raise RuntimeError("%s: a wrong answer" % measure)
        if not counts:
            raise RuntimeError("%s: the trace saw no instructions" % measure)
        answer[measure] = {name: count / float(per) for name, count in counts.items()}
    return answer


_OPERATIONS = {"nonstream": _nonstream, "stream": _stream, "tick": _tick,
               "threads": _threads, "warm": _warm, "profile": _profile, "bytecodes": _bytecodes}


def _drop_proxies():
    """All traffic stays on 127.0.0.1: no client may route it through a proxy."""
    for name in list(os.environ):
        if name.lower() in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
            del os.environ[name]


def worker(name, base, llm_path):
    import json

    _drop_proxies()
    channel, sys.stdout = sys.stdout, sys.stderr  # nothing a client prints can break the protocol
    try:
        adapter = ADAPTERS[name](base, llm_path)
        hello = {"version": adapter.version, "python": sys.version.split()[0]}
    except Exception as exc:
        adapter, hello = None, {"error": "%s: %s" % (type(exc).__name__, exc)}
    channel.write(json.dumps(hello) + "\n")
    channel.flush()
    for line in sys.stdin:
        if adapter is None:
            break
        command = json.loads(line)
        try:
            answer = _OPERATIONS[command["op"]](adapter, command)
        except Exception as exc:
            answer = {"error": "%s: %s" % (type(exc).__name__, exc)}
        channel.write(json.dumps(answer) + "\n")
        channel.flush()


def rss(name, base, llm_path):
    """Import one client, make one call, print the peak RSS in KiB and where it was read."""
    _drop_proxies()
    if name != "none":
        adapter = ADAPTERS[name](base, llm_path)
        text = adapter.chat("json", MESSAGES)
        if not text:
            raise RuntimeError("empty answer")
    peak, source = _peak_rss()
    sys.stdout.write("%d %s\n" % (peak, source))


def _peak_rss():
    """This process's peak RSS in KiB.

    Linux's VmHWM first: ru_maxrss also counts the memory of the parent that
    forked this process before exec (vfork shares it), so that every child of
    a large parent would report the parent's size.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]), "VmHWM"
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource
    except ImportError:  # not on this platform
        return 0, "nothing"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (peak // 1024 if sys.platform == "darwin" else peak), "ru_maxrss"


def _main(argv):
    mode, name, base = argv[0], argv[1], argv[2]
    llm_path = argv[argv.index("--llm-path") + 1] if "--llm-path" in argv else None
    if mode == "--worker":
        worker(name, base, llm_path)
    elif mode == "--rss":
        rss(name, base, llm_path)
    else:
        raise SystemExit("usage: clients.py --worker|--rss NAME BASE_URL [--llm-path PATH]")


if __name__ == "__main__":
    _main(sys.argv[1:])
