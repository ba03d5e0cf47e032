"""Hostile tests for llm.py: fuzzing, properties, and servers that misbehave on purpose.

    python -m unittest tests.test_hostile                          # the short run
    LLM_FUZZ_EXAMPLES=5000 python -m unittest tests.test_hostile   # a long fuzzing run

``LLM_FUZZ_EXAMPLES`` is the number of examples each property tries (the short
run uses 20 to 75, a quarter of each property's own weight; CI asks for 200). ``LLM_FUZZ_REPORT=1``
prints, at the end, how many examples each property tried and how long it took.

The property tests need hypothesis (``pip install hypothesis``) and are skipped
without it; the hostile-server tests need nothing beyond the standard library.

Every request goes to 127.0.0.1 or localhost: generated URLs name only those
hosts, or hosts that the client refuses before it resolves anything, and
every generated client is checked for that before it is used.

A comment ``# found:`` above a test names a defect of llm.py that this module
found and that is fixed: the test keeps it fixed.
"""

import base64
import copy
import gc
import io
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
import unittest
from unittest import mock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as a file: this checkout's llm.py and tests
    sys.path.insert(0, ROOT)

import llm
from tests.loopback import (CLOSE, END, HANG, RESET, Lines, LoopbackCase, Proxy, Server, Writes,
                            answer, call_socket, chunk, delta, free_port, fuzz, head, message, raw_sse,
                            read_elsewhere, readable, sse, traced, wait_until)

try:
    import hypothesis
    from hypothesis import given
    from hypothesis import strategies as st
except ImportError:  # the property tests are skipped
    hypothesis = None
try:
    import tracemalloc
except ImportError:  # PyPy: the peak is read from Linux's /proc instead
    tracemalloc = None

HI = [{"role": "user", "content": "Hi"}]
KEY = "sk-hostile-SECRET-0123456789abcdef"
MIB = 1024 * 1024
SAFE_HOSTS = ("127.0.0.1", "localhost", "::1")
REASONS = ("stop", "length", "tool_calls", "content_filter", "refusal", "error", "cancelled")

COUNTS = {}  # property -> [examples, seconds]


def count(name, started):
    entry = COUNTS.setdefault(name, [0, 0.0])
    entry[0] += 1
    entry[1] += time.monotonic() - started


def tearDownModule():
    if os.environ.get("LLM_FUZZ_REPORT") and COUNTS:
        sys.stderr.write("\nexamples tried per property:\n")
        for name in sorted(COUNTS):
            number, seconds = COUNTS[name]
            sys.stderr.write("  %-48s %6d  %6.1fs\n" % (name, number, seconds))


# ---------------------------------------------------------------- hostile objects


class Boom:
    """An object every operation of which raises, but repr (which test reports need)."""

    def _boom(self, *args, **kwargs):
        raise RuntimeError("boom")

    __str__ = __bool__ = __len__ = __iter__ = __eq__ = __lt__ = _boom
    __index__ = __int__ = __float__ = __fspath__ = __call__ = __getitem__ = _boom
    __hash__ = object.__hash__

    def __repr__(self):
        return "Boom()"

    def __getattr__(self, name):
        raise RuntimeError("boom: " + name)


class Unshowable(Boom):
    """A Boom that cannot even be shown."""

    __repr__ = Boom._boom


class EvilDict(dict):
    """A dict whose lookups and iteration raise."""

    def _boom(self, *args):
        raise RuntimeError("evil dict")

    get = items = keys = values = __getitem__ = __iter__ = __contains__ = _boom

    def _repr_pretty_(self, printer, cycle):  # how hypothesis shows it, without iterating
        printer.text("EvilDict()")


class EvilList(list):
    def __iter__(self):
        raise RuntimeError("evil list")

    def _repr_pretty_(self, printer, cycle):
        printer.text("EvilList()")


class Unprintable(Exception):
    """An exception that cannot be turned into text."""

    def __str__(self):
        raise RuntimeError("unprintable")

    __repr__ = __str__


class Deep(list):
    """A list nested deeper than json and repr can go, shown in a few characters."""

    def __repr__(self):
        return "Deep()"


def deep(depth, leaf=None):
    value = leaf
    for _ in range(depth):
        value = [value]
    return Deep([value])


def recursive_list():
    value = []
    value.append(value)
    return value


class Out:
    """An ``out`` whose write and flush do odd things."""

    def __init__(self, fail_after=None, error=None, returns=None, flush="ok", reasoning="missing"):
        self.writes = []
        self.fail_after, self.error, self.returns = fail_after, error, returns
        if reasoning == "ok":
            self.write_reasoning = self.writes.append
        elif reasoning == "raises":
            self.write_reasoning = self._raise
        elif reasoning != "missing":
            self.write_reasoning = reasoning  # not callable
        if flush == "missing":
            pass
        elif flush == "ok":
            self.flush = lambda: None
        elif flush == "raises":
            self.flush = self._raise
        else:
            self.flush = flush  # not callable

    def _raise(self):
        raise (self.error or OSError)("flush failed")

    def write(self, text):
        if self.fail_after is not None and len(self.writes) >= self.fail_after:
            raise (self.error or BrokenPipeError)("write failed")
        self.writes.append(text)
        return self.returns


class WriteNotCallable:
    write = 5


class WriteProperty:
    @property
    def write(self):
        raise RuntimeError("no write here")


# ---------------------------------------------------------------- checks


def check_response(test, response, reasons=(), cancelled_ok=False):
    """The invariants every Response keeps, whatever happened."""
    test.assertIsInstance(response, llm.Response)
    reason, error = response.stop_reason, response.error
    test.assertIsInstance(reason, str)
    test.assertTrue(reason, "empty stop_reason")
    test.assertTrue(reason in REASONS or reason in reasons, "unexpected stop_reason %r" % reason)
    if not cancelled_ok:
        test.assertNotEqual(reason, "cancelled", "cancelled without a cancel")
    test.assertIsInstance(error, str)
    test.assertEqual(bool(error), reason == "error", "error %r with stop_reason %r" % (error, reason))
    if error:
        test.assertNotIn("\n", error)
        test.assertNotIn("\r", error)
        test.assertLess(len(error), 1000)
    test.assertNotIn(KEY, error)
    test.assertNotIn(KEY, repr(response))
    test.assertEqual(response.ok, reason not in ("error", "cancelled"))
    test.assertIsInstance(response.content, str)
    test.assertIsInstance(response.reasoning, str)
    test.assertIsInstance(response.status, int)
    test.assertTrue(response.usage is None or isinstance(response.usage, dict))
    test.assertIsInstance(response.tool_calls, list)
    for call in response.tool_calls:
        test.assertIsInstance(call, llm.ToolCall)
        test.assertIsInstance(call.arguments, str)
        repr(call)
    message = response.to_message()
    test.assertEqual(message["role"], "assistant")
    json.dumps(message)  # the history entry is plain JSON


def bounded(test, function, limit, *args, **kwargs):
    """Run function in a thread; fail unless it returns within limit seconds."""
    box = []

    def run():
        try:
            box.append(("value", function(*args, **kwargs)))
        except BaseException as exc:  # reported below, with its traceback
            box.append(("raised", exc))

    started = time.monotonic()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(limit)
    elapsed = time.monotonic() - started
    if thread.is_alive():
        test.fail("still running after %.1fs" % limit)
    kind, value = box[0]
    if kind == "raised":
        raise value
    return value, elapsed


def client_sockets(port):
    """Open sockets of this process connected to 127.0.0.1:port (None where /proc is not)."""
    if not os.path.isdir("/proc/self/fd") or not os.path.exists("/proc/net/tcp"):
        return None
    inodes = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink("/proc/self/fd/" + name)
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    found = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if int(fields[2].rsplit(":", 1)[1], 16) == port and fields[9] in inodes:
                found += 1
    return found


class HostileCase(LoopbackCase):
    def assert_bounded_peak(self, function, limit):
        """Run function under tracemalloc; return (result, peak bytes), the peak below limit.

        Without tracemalloc (PyPy) the peak is the growth of the process's peak
        resident size, which Linux lets a process reset; elsewhere it is skipped.
        """
        gc.collect()
        if tracemalloc is None:
            return self.assert_bounded_resident_peak(function, limit)
        tracemalloc.start()
        try:
            result = function()
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        self.assertLess(peak, limit, "peak %.1f MiB" % (peak / MIB))
        return result, peak

    def assert_bounded_resident_peak(self, function, limit):
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM, the peak resident size
            before = resident("VmRSS")
        except (OSError, ValueError):
            before = None
        if before is None:
            self.skipTest("no tracemalloc on %s and no /proc/self/clear_refs to reset"
                          " the peak resident size: memory not measured" % sys.implementation.name)
        result = function()
        peak = resident("VmHWM") - before
        # PyPy's collector lets its heap grow to PYPY_GC_MAJOR_COLLECT (1.82 by
        # default) times what was live at its last collection before it collects
        # again: garbage that tracemalloc would not count is resident here.
        limit *= float(os.environ.get("PYPY_GC_MAJOR_COLLECT") or 1.82)
        self.assertLess(peak, limit, "peak resident growth %.1f MiB" % (peak / MIB))
        return result, peak


def resident(field):
    """A size in bytes from /proc/self/status (VmRSS, VmHWM), or None."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return None


def lazy(prefix, piece, total, suffix=b""):
    """An answer that sends prefix, then piece until total bytes went, made as it goes."""
    def steps(request):
        yield prefix
        sent = 0
        while sent < total:
            yield piece
            sent += len(piece)
        yield suffix
        yield CLOSE
    return steps


def event(obj):
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


# ---------------------------------------------------------------- hostile servers


class HostileServerTest(HostileCase):
    def test_a_server_that_never_answers(self):
        server = self.serve([HANG])
        client = self.client(server, timeout=(1, 0.3))
        for name, call in (("chat", lambda: client.chat(HI)),
                           ("chat_stream", lambda: client.chat_stream(HI, Writes())),
                           ("stream", lambda: client.stream(HI).response)):
            response, elapsed = bounded(self, call, 5)
            check_response(self, response)
            self.assertEqual((response.error, response.status),
                             ("timed out after 0.3s waiting for data", 0), name)
            self.assertLess(elapsed, 2, name)
        models, _ = bounded(self, client.models, 5)
        self.assertEqual((list(models), models.error), ([], "timed out after 0.3s waiting for data"))

    def test_a_server_that_never_even_accepts(self):
        listener = self.listener(8)  # the kernel completes the handshake; nobody reads the request
        client = llm.Client("http://127.0.0.1:%d" % listener.getsockname()[1], timeout=(1, 0.3))
        self.addCleanup(client.close)
        response, elapsed = bounded(self, client.chat_stream, 5, HI, Writes())
        check_response(self, response)
        self.assertEqual(response.error, "timed out after 0.3s waiting for data")
        self.assertLess(elapsed, 2)

    def test_headers_then_stall(self):
        for steps, content in (([head(), HANG], ""),
                               (sse(delta("kept "), HANG), "kept "),
                               ([head(content_type="application/json", chunked=False, length=50), HANG], "")):
            server = self.serve(steps)
            response, elapsed = bounded(self, self.client(server, timeout=(1, 0.3)).chat_stream,
                                        5, HI, Writes())
            check_response(self, response)
            self.assertEqual((response.error, response.content, response.status),
                             ("timed out after 0.3s waiting for data", content, 200))
            self.assertLess(elapsed, 2)

    def test_a_trickle_is_bounded_by_the_deadline_not_by_the_read_timeout(self):
        def trickle(request):
            yield head(chunked=False)
            yield event(delta("kept"))
            for _ in range(300):  # a byte every 0.2 s, for a minute at most
                yield b":"
                yield 0.2
        server = self.serve(trickle)
        # the read timeout alone never fires: each byte comes well within it
        client = self.client(server, timeout=0.5)
        writes = []
        thread = threading.Thread(target=client.chat_stream, args=(HI, Writes(writes)), daemon=True)
        thread.start()
        thread.join(1.5)
        self.assertTrue(thread.is_alive(), "a trickle ended a call that has no deadline")
        self.assertEqual(writes, ["kept"])
        client.cancel()
        thread.join(2)
        self.assertFalse(thread.is_alive())
        # the deadline bounds it
        response, elapsed = bounded(self, self.client(server, timeout=0.5, deadline=1).chat_stream,
                                    5, HI, Writes())
        check_response(self, response)
        self.assertEqual((response.error, response.content), ("deadline of 1s exceeded", "kept"))
        self.assertLess(elapsed, 2.5)
        self.assertGreater(elapsed, 0.9)

    # found: the deadline is checked only between reads. A server that trickles
    # the status line and headers, a Content-Length body, a chunk-size line, or
    # that sends "100 Continue" answers without end, keeps http.client's own loops
    # (readline, read(n), begin()) going past the deadline for as long as it likes.
    def test_the_deadline_bounds_trickles_inside_http_framing(self):
        def trickled(data):
            def steps(request):
                for byte in data:
                    yield bytes([byte])
                    yield 0.1
                yield HANG
            return steps
        body = json.dumps(message("slow")).encode()
        cases = {
            "status line and headers": trickled(head(content_type="application/json", chunked=False,
                                                     length=len(body)) + body),
            "Content-Length body": lambda request: [head(content_type="application/json", chunked=False,
                                                         length=len(body))] + list(trickled(body)(request)),
            "chunk-size line": lambda request: [head(), chunk(event(delta("kept ")))] + list(
                trickled(b"1" * 200)(request)),
            "100 Continue answers": [b"HTTP/1.1 100 Continue\r\n\r\n", 0.1] * 60 + [HANG],
        }
        results = {}
        threads = []
        for name, steps in cases.items():
            client = self.client(self.serve(steps), timeout=2, deadline=0.5)

            def run(name=name, client=client):
                started = time.monotonic()
                client.chat_stream(HI, Writes())
                results[name] = time.monotonic() - started
            threads.append(threading.Thread(target=run, daemon=True))
        for thread in threads:
            thread.start()
        end = time.monotonic() + 2
        for thread in threads:
            thread.join(max(0, end - time.monotonic()))
        self.assertEqual(sorted(results), sorted(cases), "calls still running after 2 s")
        for name, elapsed in results.items():
            self.assertLess(elapsed, 1.2, name)

    # found: after [DONE], _drain reads up to 16 more times with a 1 s timeout
    # each, ignoring the deadline: a server that keeps sending comments holds a
    # finished call for up to 16 s past its deadline.
    def test_a_finished_stream_returns_within_its_deadline(self):
        steps = sse(delta("done", "stop"))[:-1] + [chunk(b": more\n"), 0.3] * 40
        client = self.client(self.serve(steps), timeout=5, deadline=1)
        started = time.monotonic()
        thread = threading.Thread(target=client.chat_stream, args=(HI, Writes()), daemon=True)
        thread.start()
        thread.join(2.5)
        self.assertFalse(thread.is_alive())
        self.assertLess(time.monotonic() - started, 2)

    def test_a_reset_at_any_point(self):
        cases = [([RESET], "", 0),
                 ([head()[:10], RESET], "", 0),
                 (sse(delta("half"), 0.05, RESET)[:2] + [0.05, RESET], "half", 200),
                 ([head(), chunk(event(delta("half"))), b"40\r\ndata: {", 0.05, RESET], "half", 200),
                 ([head(content_type="application/json", chunked=False, length=100), b'{"choi', 0.05, RESET],
                  "", 200)]
        for steps, content, status in cases:
            server = self.serve(steps)
            response, _ = bounded(self, self.client(server).chat_stream, 5, HI, Writes())
            check_response(self, response)
            self.assertEqual((response.stop_reason, response.content, response.status),
                             ("error", content, status), steps)

    def test_a_server_that_closes_after_the_headers(self):
        for steps in ([head(), CLOSE], [head(chunked=False), CLOSE],
                      [head(content_type="application/json", chunked=False, length=80), CLOSE],
                      [head(content_type="application/json"), CLOSE], [head(content_type=""), CLOSE]):
            server = self.serve(steps)
            for call in (lambda c: c.chat(HI), lambda c: c.chat_stream(HI, Writes())):
                response, elapsed = bounded(self, call, 5, self.client(server))
                check_response(self, response)
                self.assertEqual((response.stop_reason, response.status), ("error", 200))
                self.assertLess(elapsed, 2)

    def test_a_100_mb_body_is_refused_at_max_bytes_with_bounded_memory(self):
        limit = llm.Client()._settings.max_bytes
        self.assertEqual(limit, 64 * MIB)
        json_head = head(content_type="application/json", chunked=False)
        prefix = b'{"choices": [{"message": {"content": "'
        cases = {
            "Content-Length": [head(content_type="application/json", chunked=False, length=100 * MIB)]
            + [b"x" * 65536] * 4 + [CLOSE],
            "chunked": lazy(head(content_type="application/json") + chunk(prefix),
                            chunk(b"x" * 65536), 100 * MIB),
            "close-delimited": lazy(json_head + prefix, b"x" * 65536, 100 * MIB),
        }
        for name, steps in cases.items():
            client = self.client(self.serve(steps), timeout=5)
            response, peak = self.assert_bounded_peak(
                lambda: bounded(self, client.chat, 60, HI)[0], limit * 1.25 + 8 * MIB)
            check_response(self, response)
            self.assertEqual((response.error, response.status),
                             ("response larger than max_bytes (%d bytes)" % limit, 200), name)

    def test_a_100_mb_event_stream_stops_at_max_bytes_keeping_what_came(self):
        limit = 8 * MIB
        piece = event(delta("x" * 1000)) * 60
        client = self.client(self.serve(lazy(head(chunked=False), piece, 100 * MIB)), max_bytes=limit)
        writes = []
        response, peak = self.assert_bounded_peak(
            lambda: bounded(self, client.chat_stream, 60, HI, Writes(writes))[0], 2.5 * limit + 4 * MIB)
        check_response(self, response)
        self.assertEqual(response.error, "response larger than max_bytes (%d bytes)" % limit)
        self.assertGreater(len(response.content), limit // 2)
        self.assertEqual(response.content, "".join(writes))

    def test_a_single_100_mb_line_stops_at_max_bytes(self):
        limit = 4 * MIB
        steps = lazy(head(chunked=False) + b'data: {"choices": [{"delta": {"content": "',
                     b"x" * 65536, 100 * MIB)
        client = self.client(self.serve(steps), max_bytes=limit)
        response, peak = self.assert_bounded_peak(
            lambda: bounded(self, client.chat_stream, 60, HI, Writes())[0], 3 * limit + 4 * MIB)
        check_response(self, response)
        self.assertEqual((response.error, response.content),
                         ("response larger than max_bytes (%d bytes)" % limit, ""))

    # found: _SSEDecoder.feed joins the unfinished line with each new read
    # (self._buffer + chunk, then split): a single long line costs time quadratic
    # in its length (a 64 MiB line: about 40 s of CPU before max_bytes stops it)
    # and holds two to three copies of itself.
    def test_a_single_huge_line_costs_linear_time(self):
        def feed(pieces):
            decoder = llm._SSEDecoder()
            decoder.feed(b"data: ")
            piece, stop = b"x" * 65536, time.process_time() + 2  # see assert_linear
            for _ in range(pieces):
                decoder.feed(piece)
                if time.process_time() > stop:
                    break
        assert_linear(self, feed, 64, 256)  # 4 MiB, 16 MiB

    # found: every data line that ends in } or ] makes the decoder join and
    # parse all the data lines of the event so far: an event of many short data
    # lines ("data:]" repeated) costs time quadratic in their number (200,000
    # lines, 1.4 MB, take about five minutes), and neither timeout nor deadline
    # can stop it within a read.
    def test_many_data_lines_in_one_event_cost_linear_time(self):
        def feed(thousands):
            decoder = llm._SSEDecoder()
            lines, stop = b"data:]\n" * 1000, time.process_time() + 2  # see assert_linear
            for _ in range(thousands):
                decoder.feed(lines)
                if time.process_time() > stop:
                    break
        assert_linear(self, feed, 15, 60)  # 15,000 lines, 60,000

    # found: the strings in JSON text were found with a regular expression that, at a quote
    # opening a string that never closes, read to the end of the text, failed, and tried
    # again at the next quote: a run of escaped quotes (\"\"\"...) cost time quadratic in
    # its length, in the decoder's bracket count (a 40 KB line: 20 s of CPU) and in the cost
    # check of a long whole reply, past any deadline
    def test_escaped_quotes_in_a_string_that_never_closes_cost_linear_time(self):
        def feed(count):
            decoder = llm._SSEDecoder()
            decoder.feed(b'data: {"a": "' + b'\\"' * count + b"\n")
            decoder.feed(b"data: }\n\n")
        assert_linear(self, feed, 2500, 10000)

        def whole(count):
            body = b'{"choices": [{"message": {"content": "hi"}}], "junk": ' + b" " * 70000 \
                + b'"' + b'\\"' * count
            client = self.client(self.serve([head(200, "application/json", chunked=False,
                                                  length=len(body)) + body]),
                                 max_bytes=len(body) + 100)
            responses.append(client.chat(HI))
        responses = []
        assert_linear(self, whole, 2500, 10000)
        for response in responses:  # a string cut short: no JSON
            check_response(self, response)
            self.assertEqual(response.error_kind, "invalid_reply")

    def test_redirects_to_another_host_are_not_followed_and_the_key_stays_home(self):
        other = self.serve(answer(message("from the other host")))
        for status in (301, 302, 303, 307, 308):
            location = "http://localhost:%d/v1/chat/completions?key=%s" % (other.port, KEY)
            server = self.serve([("HTTP/1.1 %d Moved\r\nLocation: %s\r\nContent-Length: 0\r\n\r\n"
                                  % (status, location)).encode()])
            client = self.client(server, api_key=KEY, retries=3)
            for response in (client.chat(HI), client.chat_stream(HI, Writes()), client.stream(HI).response):
                check_response(self, response)
                self.assertEqual((response.stop_reason, response.status), ("error", status))
                self.assertIn("not followed", response.error)
                self.assertNotIn(KEY, response.error)
            models = client.models()
            self.assertEqual((list(models), models.status), ([], status))
            self.assertNotIn(KEY, models.error)
            self.assertEqual(len(server.requests), 4)
            self.assertEqual(server.requests[0].headers["authorization"], "Bearer " + KEY)
        self.assertEqual((other.connections, other.requests), (0, []))

    def test_line_breaks_in_key_model_headers_or_url_are_refused_before_anything_is_sent(self):
        server = self.serve(answer(message("x")))
        url = server.url
        cases = []
        for evil in ("\r\nX-Evil: 1", "\nX-Evil: 1", "\rX-Evil: 1", "\r\n\r\nGET / HTTP/1.1", "\0", "a\r"):
            cases += [dict(api_key="sk-abc" + evil), dict(model="m" + evil),
                      dict(headers={"X-A": "1" + evil}), dict(headers={"X-A" + evil: "1"}),
                      dict(system="fine\n", headers={"X" + evil: "1"}),
                      dict(base_url=url + "/v1" + evil), dict(base_url=url + "/v1?a=b" + evil)]
        cases += [dict(headers={"X A": "1"}), dict(headers={"": "1"}), dict(headers={"X:Y": "1"})]
        for options in cases:
            options.setdefault("base_url", url)
            client = llm.Client(**options)
            for call in (lambda: client.chat(HI), lambda: client.chat_stream(HI, Writes()),
                         lambda: client.stream(HI).response):
                response = call()
                check_response(self, response)
                self.assertEqual(response.stop_reason, "error", options)
                self.assertNotIn("sk-abc", response.error)
            self.assertTrue(client.models().error)
            client.close()
        self.assertEqual((server.connections, server.requests), (0, []))

    # found: a key or header value that HTTP cannot carry (outside Latin-1, or a
    # header name outside ASCII) is not refused when the client is made: each call
    # connects first, then fails with "unexpected failure: UnicodeEncodeError ...",
    # and leaves the half-started connection for reuse, so that the next call
    # says "CannotSendRequest: Request-started".
    def test_header_values_http_cannot_carry_are_refused_before_connecting(self):
        server = self.serve(answer(message("x")))
        for options in (dict(api_key="sk-\u20ac-0123456789"), dict(headers={"X-Name": "caf\u00e9 \u2603"}),
                        dict(headers={"X-Caf\u00e9": "1"})):
            client = self.client(server, **options)
            first, second = client.chat(HI), client.chat(HI)
            check_response(self, first)
            self.assertEqual(first.error, second.error)
            self.assertNotIn("unexpected", first.error)
            self.assertNotIn("\u20ac", first.error)
        self.assertEqual(server.connections, 0)

    def test_error_bodies_that_echo_the_key_are_redacted(self):
        def json_error(request):
            return answer({"error": {"message": "bad key: " + request.headers["authorization"]}}, 401)
        quoted = json.dumps(KEY).encode()
        cases = [
            json_error,
            answer({"error": "key %s is not valid" % KEY}, 403),
            answer({"detail": [{"loc": ["header", KEY], "msg": KEY}]}, 422),
            answer(("denied for " + KEY).encode(), 401),
            [("HTTP/1.1 401 Bad key %s\r\nContent-Length: 0\r\n\r\n" % KEY).encode()],
            [("HTTP/1.1 302 Found\r\nLocation: http://127.0.0.1:1/?k=%s\r\nContent-Length: 0\r\n\r\n"
              % KEY).encode()],
            sse(delta("kept"), {"error": {"message": "stream error for " + KEY}}),
            sse(delta("kept"), {"object": "error", "message": KEY}),
            sse(delta("kept"), b"", done=False)[:2] + [chunk(b"event: error\ndata: " + KEY.encode() + b"\n\n"), END],
            [head(content_type="application/json", chunked=False, length=40 + len(KEY)),
             (b'{"not json ' + KEY.encode()).ljust(40 + len(KEY), b" ")],
            answer({"object": "list", "echo": KEY}),
            [b"HTTP/1.1 abc " + KEY.encode() + b"\r\n\r\n", CLOSE],
            [head(content_type="text/plain", chunked=False, length=len(quoted)) + quoted],
        ]
        for steps in cases:
            server = self.serve(steps)
            client = self.client(server, api_key=KEY)
            for response in (client.chat(HI), client.chat_stream(HI, Writes())):
                check_response(self, response)
                self.assertEqual(response.stop_reason, "error")
                self.assertNotIn(KEY, response.error)
                self.assertNotIn(KEY, repr(response))
            self.assertNotIn(KEY, client.models().error)
            self.assertNotIn(KEY, repr(client))

    # found: the server's message is cut to 300 characters before the key is
    # redacted, so a key that straddles the cut shows its first characters
    # (here "sk-hostile-SECRE").
    def test_a_key_cut_by_the_error_length_limit_is_still_redacted(self):
        server = self.serve(lambda request: answer(
            {"error": {"message": "x" * 270 + " " + request.headers["authorization"]}}, 401))
        response = self.client(server, api_key=KEY).chat(HI)
        self.assertNotIn(KEY[:12], response.error)

    # found: an error made from a server's body was cut to 300 characters before
    # the key was redacted (88 of 164 characters of an OpenAI-style key were seen),
    # only the API key was redacted (not a credential header such as x-api-key),
    # and a 64 KiB error body cut inside a key, after a run of spaces, showed the
    # key's start once the spaces were squeezed.
    def test_secrets_straddling_every_cut_are_redacted_at_every_offset(self):
        api_key = "sk-proj-" + "".join(random.choice("ABCDEFGHJKMNPQRSTUVWXYZabcdefghijkmnpqrstuvwxyz23456789")
                                       for _ in range(156))
        header_key = "hk-" + "".join(random.choice("ABCDEFGHJKMNPQRSTUVWXYZ23456789") for _ in range(40))
        shapes = {  # how a server's text becomes an error, each cut somewhere
            "invalid JSON": lambda text: [head(content_type="application/json", chunked=False,
                                               length=len(text) + 1) + b"{" + text],
            "no choices": lambda text: answer({"echo": text.decode()}),
            "plain body": lambda text: [head(401, "text/plain", chunked=False, length=len(text)) + text],
            "JSON error": lambda text: answer({"error": {"message": text.decode()}}, 401),
            "stream error": lambda text: [b"".join(sse(delta("kept"), {"error": {"message": text.decode()}}))],
            "finish reason": lambda text: [b"".join(sse(delta("kept", "error " + text.decode())))],
        }
        texts = []
        for secret, step in ((api_key, 1), (header_key, 1), ("Bearer " + api_key, 5)):
            # the cut is at 297 characters, after a prefix of at most 45: every offset across it
            texts += [b"." * pad + secret.encode() + b" tail" for pad in range(250 - len(secret), 300, step)]
            texts += [b" " * (65536 - inside - 1) + b"!" + secret.encode() for inside in (4, 9, 40, len(secret) - 1)]
        for name, shape in shapes.items():
            server = self.serve(lambda request: shape(texts[len(server.requests) - 1]))
            client = self.client(server, api_key=api_key, headers={"X-API-Key": header_key})
            for text in texts:
                response = client.chat_stream(HI, Writes()) if name.startswith(("stream", "finish")) \
                    else client.chat(HI)
                shown = response.error + repr(response)
                for secret in (api_key, header_key):
                    leaked = [secret[i:i + 6] for i in range(len(secret) - 5) if secret[i:i + 6] in shown]
                    self.assertEqual(leaked, [], "%s: %s" % (name, response.error))
                self.assertEqual(response.ok, False if name != "finish reason" else True, name)
                self.assertLessEqual(len(response.error), 300)
            self.assertEqual(len(server.requests), len(texts))

    def test_a_relay_that_fails_at_its_end_gives_one_redacted_line(self):
        class Failing:
            def write(self, text):
                if "[DONE]" in text:
                    raise OSError("gone\n" + "x" * 400 + " " + KEY)
        server = self.serve(sse(delta("a", "stop")))
        response = self.client(server, api_key=KEY).chat_stream(HI, llm.SSEWriter(Failing()))
        self.assertEqual(response.stop_reason, "error")
        self.assertTrue(response.error.startswith("writing the reply failed: OSError: gone x"))
        self.assertLessEqual(len(response.error), 300)
        self.assertNotIn(KEY[:8], response.error)

    def test_proxy_credentials_and_credential_headers_are_redacted(self):
        secrets = {"Authorization": "Basic " + base64.b64encode(b"someone:pw-0123456789").decode(),
                   "Cookie": "session=cs-0123456789; theme=dark", "X-Auth-Token": "at-0123456789"}

        def echo(request):
            return answer({"error": {"message": " ".join(
                "%s=%s" % (name, request.headers.get(name.lower())) for name in list(secrets) + ["Proxy-Authorization"])
                + " pw=pp-0123456789 and pw-0123456789 and cs-0123456789"}}, 401)
        server = self.serve(echo)
        proxy = Proxy(server.port)
        self.addCleanup(proxy.close)
        with mock.patch.dict(os.environ, {"HTTP_PROXY": proxy.url.replace("http://", "http://me:pp-0123456789@")}):
            client = self.client("http://llm.test/v1", headers=secrets)
            response = client.chat(HI)
        self.assertIn("Proxy-Authorization", proxy.seen[0])
        for secret in ("pw-0123", "cs-0123", "at-0123", "pp-0123", secrets["Authorization"][6:],
                       base64.b64encode(b"me:pp-0123456789").decode()):
            self.assertNotIn(secret, response.error)
        self.assertIn("Authorization=Basic ***", response.error)
        server.answers = [lambda request: answer({"error": "no: " + request.headers["api-key"]}, 401)]
        response = self.client(server, headers={"api-key": "two words-0123"}).chat(HI)
        self.assertEqual(response.error, "HTTP 401: no: ***")
        self.assertNotIn("pp-0123", repr(client))

    def test_a_trace_never_holds_six_characters_of_a_secret(self):
        # every secret the client knows, in every form the error redaction covers, echoed by
        # the server in its headers and body, whole and cut across reads
        api_key = "sk-proj-" + "".join(random.choice("ABCDEFGHJKMNPQRSTUVWXYZabcdefghijkmnpqrstuvwxyz23456789")
                                       for _ in range(60))
        headers = {"Cookie": "session=cs-0123456789; theme=dark", "X-Auth-Token": "at-0123456789",
                   "api-key": "two words-0123"}
        query_key = "qk-" + "".join(random.choice("abcdefghijkmnpqrstuvwxyz") for _ in range(20))
        proxy_password = "pp-0123456789"
        secrets = [api_key, "cs-0123456789", "at-0123456789", "words-0123", query_key, proxy_password,
                   base64.b64encode(("me:" + proxy_password).encode()).decode()]

        def echo(request):
            said = " ".join("%s=%s" % item for item in sorted(request.headers.items()))
            said += " path=" + request.path + " " + json.dumps(said) + " cut: " + api_key[:20]
            extra = "X-Echo: %s" % said.replace("\r", " ").replace("\n", " ")
            if request.json()["stream"]:  # in chunks of 7 bytes: every secret cut across reads
                body = event(delta(said, "stop")) + b"data: [DONE]\n\n"
                return [head(extra=extra)] + [chunk(body[at:at + 7]) for at in range(0, len(body), 7)] + [END]
            body = json.dumps(message(said)).encode()
            return [head(200, "application/json", chunked=False, length=len(body), extra=extra) + body]
        server = self.serve(echo)
        proxy = Proxy(server.port)
        self.addCleanup(proxy.close)
        writer = Lines()
        with mock.patch.dict(os.environ, {"HTTP_PROXY": proxy.url.replace("http://", "http://me:%s@" % proxy_password)}):
            client = self.client("http://llm.test/v1?key=%s&api-version=1" % query_key, api_key=api_key,
                                 headers=headers, trace=writer)
        for call in (lambda: client.chat(HI), lambda: client.chat_stream(HI, Writes())):
            reply = call()
            self.assertIn(api_key[:8], reply.content)  # the server saw them all
        lines = traced(client, writer)
        self.assertGreater(len(lines), 40)
        text = "\n".join(lines)
        for secret in secrets:
            leaked = [secret[i:i + 6] for i in range(len(secret) - 5) if secret[i:i + 6] in text]
            self.assertEqual(leaked, [], secret)

    def test_many_threads_share_a_client_while_another_cancels_again_and_again(self):
        # Both outcomes are made certain by events, not left to the clock: a loaded machine
        # (or a slower Python) used to see every call cut, or none. The first stream is held
        # half-sent until the canceller has seen a whole reply and then cut the held one;
        # the random cancels that follow are the storm that explores the interleavings.
        held, released, stopped = threading.Event(), threading.Event(), threading.Event()
        lock = threading.Lock()

        def hold_the_first_stream():
            with lock:
                first = not held.is_set()
                held.set()
            if first:
                released.wait(30)

        def answers(request):
            if request.path.endswith("/models"):
                return answer({"data": [{"id": "m"}]})
            if b'"stream": true' in request.body:
                return sse(delta("a"), hold_the_first_stream, 0.002, delta("b"), 0.002,
                           delta("c", "stop"))
            return [0.002] + answer(message("abc"))
        server = self.serve(answers)
        client = llm.Client(server.url, model="m", timeout=5)
        self.addCleanup(client.close)
        before = client_sockets(server.port)
        responses, problems = [], []

        def work(number):
            try:
                for turn in range(12):
                    kind = (number + turn) % 4
                    if kind == 0:
                        reply = client.chat(HI)
                    elif kind == 1:
                        reply = client.chat_stream(HI, Writes())
                    elif kind == 2:
                        stream = client.stream(HI)
                        pieces = list(stream)
                        reply = stream.response
                        if "".join(pieces) != reply.content:
                            problems.append(("pieces", pieces, reply))
                    else:
                        models = client.models()
                        if models.error and models.error != "cancelled":
                            problems.append(("models", models.error))
                        if not models.error and list(models) != ["m"]:
                            problems.append(("models", list(models)))
                        continue
                    with lock:
                        responses.append(reply)
                    if reply.stop_reason == "stop":
                        stopped.set()
            except BaseException as exc:
                problems.append(("raised", repr(exc)))

        stop = threading.Event()

        def cancel_again_and_again():
            try:  # nothing is cancelled until a call has ended whole and a stream is held
                if stopped.wait(30) and held.wait(30):
                    client.cancel()  # it cuts the held stream, whatever else is in flight
            finally:
                released.set()
            end = time.monotonic() + 20
            while not stop.is_set() and time.monotonic() < end:
                client.cancel()
                time.sleep(random.uniform(0, 0.02))  # some calls end between two, some are cut

        workers = [threading.Thread(target=work, args=(n,), daemon=True) for n in range(8)]
        canceller = threading.Thread(target=cancel_again_and_again, daemon=True)
        canceller.start()
        for thread in workers:
            thread.start()
        end = time.monotonic() + 30
        for thread in workers:
            thread.join(max(0, end - time.monotonic()))
        stop.set()
        canceller.join(5)
        self.assertFalse(any(thread.is_alive() for thread in workers + [canceller]), "deadlock")
        self.assertEqual(problems, [])
        self.assertEqual(len(responses), 8 * 9)
        reasons = set()
        for reply in responses:
            check_response(self, reply, cancelled_ok=True)
            self.assertIn(reply.stop_reason, ("stop", "cancelled"), reply)
            self.assertTrue("abc".startswith(reply.content), reply)
            if reply.stop_reason == "stop":
                self.assertEqual(reply.content, "abc")
            reasons.add(reply.stop_reason)
        self.assertEqual(reasons, {"stop", "cancelled"})
        # after the storm the client still works
        self.assertEqual(client.chat_stream(HI, Writes()).content, "abc")
        if before is None:
            self.skipTest("no /proc: open sockets are not counted here")
        client.close()

        def closed():  # the sockets of threads that ended go as their slots are collected
            gc.collect()
            return client_sockets(server.port) <= before
        wait_until(closed, 3, pause=0.05)
        self.assertEqual(client_sockets(server.port), before, "sockets leaked")


# ---------------------------------------------------------------- odd arguments and odd replies


class EdgeTest(HostileCase):
    def test_wrong_types_in_every_field_keep_what_came(self):
        bad = [
            {"choices": "a string"},
            {"choices": [{"delta": ["a", "list"]}]},
            {"choices": [{"delta": {"content": "lost?"}}], "usage": None},
            {"choices": [{"delta": {"content": 5}}]},
            {"choices": [{"delta": {"content": {"text": "x"}}}]},
            {"choices": [{"delta": {"content": [{"type": "text", "text": 7}, "x", None]}}]},
            {"choices": [None, 5]},
            {"choices": [{"delta": {"tool_calls": [{"index": "0", "id": 5, "function": {"name": ["f"]}}]}}]},
            {"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"arguments": {"a": [1]}}}]}}]},
            {"choices": [{"delta": {"tool_calls": "calls"}}]},
            {"choices": [{"delta": {"tool_calls": [{"index": 1e300, "function": []}]}}]},
            {"choices": [{"delta": {"tool_calls": {"index": -1, "function": {"arguments": None}}}}]},
            {"choices": [{"delta": {"reasoning_content": ["x"], "reasoning": 5}}]},
            {"choices": [{"delta": {"role": ["assistant"]}, "usage": "lots"}]},
            {"id": ["x"], "model": {"m": 1}, "choices": []},
            {"usage": {"prompt_tokens": "3", "completion_tokens": None}, "x_groq": "no"},
            {"x_groq": {"usage": 5}},
            {"usage": {"input_tokens": 10 ** 30, "output_tokens": -1}},
            {"choices": [{"delta": {"content": "\ud800 lone"}}]},
            [1, 2, 3], "text", 12, None, True,
        ]
        bad += [{"choices": [{"delta": {}, "finish_reason": {"a": 1}}]},
                {"choices": [{"delta": {}, "finish_reason": 5}]}]
        for item in bad:
            body = b"data: " + json.dumps(item).encode() + b"\n\n"
            server = self.serve(sse(delta("kept "), chunk(body), delta("tail", "stop")))
            response, _ = bounded(self, self.client(server).chat_stream, 5, HI, Writes())
            check_response(self, response)
            self.assertTrue(response.content.startswith("kept "), (item, response))
            self.assertTrue(response.content.endswith("tail"), (item, response))
            whole = message("whole")
            whole["choices"].append(item)
            whole.update(item if isinstance(item, dict) else {"extra": item})
            server = self.serve(answer(whole))
            response, _ = bounded(self, self.client(server).chat, 5, HI)
            check_response(self, response)

    def test_bad_chunk_framing_keeps_what_came(self):
        good = chunk(event(delta("kept ")))
        for framing in (b"zz\r\nabc\r\n", b"-5\r\nabc\r\n", b"fffffffffffffffffffffff\r\nabc\r\n",
                        b"5;ext=1\r\nab", b"3\r\nabcdef\r\n", b"3\r\nabc", b"\r\n\r\n", b"0x10\r\n",
                        b" 5\r\nabcde\r\n", b"5 \r\nabcde\r\n", b"1" * 70000, b"\xff\xfe\r\n"):
            server = self.serve([head(), good, framing, CLOSE])
            response, elapsed = bounded(self, self.client(server).chat_stream, 5, HI, Writes())
            check_response(self, response)
            self.assertEqual((response.stop_reason, response.content), ("error", "kept "), framing[:20])
            self.assertLess(elapsed, 2)

    def test_invalid_utf8_anywhere(self):
        body = b'data: {"choices": [{"delta": {"content": "a\xff\xc3b\xed\xa0\x80c"}}]}\n\n'
        server = self.serve(sse(delta("kept "), chunk(body), chunk(b"data: \xff\xff\n\n"), delta("!", "stop")))
        response = self.client(server).chat_stream(HI, Writes())
        check_response(self, response)
        self.assertTrue(response.content.startswith("kept a"))
        self.assertTrue(response.content.endswith("!"))
        server = self.serve([head(status=400, content_type="application/json", chunked=False, length=8)
                             + b'{"e\xff\xfe":1}'[:8]])
        check_response(self, self.client(server).chat(HI))

    def test_deeply_nested_json_in_any_field(self):
        for depth in (50, 900, 5000, 100000):
            nested = "[" * depth + "]" * depth
            body = ('data: {"choices": [{"delta": {"content": "x", "extra": %s}}]}\n\n' % nested).encode()
            usage = ('data: {"choices": [], "usage": %s}\n\n' % nested).encode()
            server = self.serve(sse(delta("kept "), chunk(body), chunk(usage), delta("!", "stop")))
            response, _ = bounded(self, self.client(server).chat_stream, 10, HI, Writes())
            check_response(self, response)
            self.assertTrue(response.content.startswith("kept "))
            whole = ('{"choices": [{"message": {"content": "kept", "x": %s}}], "usage": %s}'
                     % (nested, nested)).encode()
            server = self.serve(answer(whole))
            check_response(self, bounded(self, self.client(server).chat, 10, HI)[0])

    # found: ToolCall() parses the arguments with json.loads and catches only
    # ValueError: arguments that are deeply nested JSON text raise RecursionError
    # out of chat() and chat_stream().
    def test_deeply_nested_tool_arguments_do_not_raise(self):
        nested = "[" * 100000 + "]" * 100000
        call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": nested}}
        server = self.serve(answer(message(None, "tool_calls", tool_calls=[call])))
        response = self.client(server).chat(HI)
        self.assertEqual((response.stop_reason, response.tool_calls[0].args), ("tool_calls", None))
        server = self.serve(sse(delta(tool_calls=[dict(call, index=0)], finish="tool_calls")))
        response = self.client(server).chat_stream(HI, Writes())
        self.assertEqual(response.tool_calls[0].arguments, nested)

    # found: a JSON integer of more than 4300 digits anywhere in a reply (here in
    # usage) makes Python 3.11+ reject the whole reply as invalid JSON, or drop
    # the event with its content; on Pythons without that limit (3.6 to 3.10) it
    # costs time quadratic in its length (600,000 digits: 1.5 s; 30 MB: hours).
    def test_huge_integers_keep_the_content_and_cost_little(self):
        def reply(digits):
            body = (b'{"choices": [{"message": {"role": "assistant", "content": "kept"}, "finish_reason": "stop"}],'
                    b' "usage": {"total_tokens": ' + b"9" * digits + b'}}')
            return [head(content_type="application/json", chunked=False, length=len(body)) + body]
        client = self.client(self.serve(reply(150000), reply(150000), reply(150000), reply(600000)))
        responses = []
        assert_linear(self, lambda digits: responses.append(client.chat(HI)), 150000, 600000)
        self.assertEqual({(r.content, r.error) for r in responses}, {("kept", "")})
        event_body = (b'data: {"choices": [{"delta": {"content": "kept"}}], "usage": {"total_tokens": '
                      + b"9" * 600000 + b'}}\n\n')
        server = self.serve(sse(chunk(event_body), delta("", "stop")))
        self.assertEqual(self.client(server).chat_stream(HI, Writes()).content, "kept")

    def test_huge_and_odd_numbers_elsewhere(self):
        for number in (b"1e999999", b"-1e999999", b"NaN", b"Infinity", b"-0", b"123456789" * 400,
                       b"0.000000000000000000000000000000001"):
            body = (b'data: {"choices": [{"index": %s, "delta": {"content": "x"}}], "usage": {"prompt_tokens": %s}}\n\n'
                    % (number, number))
            server = self.serve(sse(delta("kept "), chunk(body), delta("!", "stop")))
            response = self.client(server).chat_stream(HI, Writes())
            check_response(self, response)
            self.assertTrue(response.content.startswith("kept "))

    # found: a finish_reason of "error" (OpenRouter sends one when a provider
    # fails mid-stream) or "cancelled" is passed through as the stop_reason: the
    # response says "error" with an empty error, or "cancelled" though no one
    # cancelled it.
    def test_finish_reason_error_from_the_server_comes_with_a_message(self):
        for finish in ("error", "cancelled", "ERROR"):
            server = self.serve(sse(delta("partial", finish)))
            response = self.client(server).chat_stream(HI, Writes())
            self.assertEqual(response.stop_reason, "error")
            self.assertIn(finish, response.error)
            self.assertEqual(response.content, "partial")

    # found: a finish_reason that is not a string (an object, a list, a number,
    # true) becomes its Python repr as the stop_reason ("{'type': 'stop'}", "5",
    # "True"), which is neither a known reason nor what the server sent.
    def test_finish_reason_that_is_not_a_string_is_ignored(self):
        for finish in ({"type": "stop"}, ["stop"], 5, True):
            server = self.serve(sse(delta("x", finish), done=True))
            response = self.client(server).chat_stream(HI, Writes())
            self.assertEqual(response.stop_reason, "stop", finish)

    # found: errors made from http.client's exceptions are not cut to one line:
    # a garbled status line gives an error that ends in "\r\n", and a long one
    # (UnknownProtocol, up to 64 KiB) is copied whole into the error.
    def test_network_errors_are_one_short_line(self):
        for steps in ([b"HTTP/1.1 abc OK\r\n\r\n", CLOSE], [b"SSH-2.0-OpenSSH_9.6\r\n", CLOSE],
                      [b"HTTP/9" + b"x" * 60000 + b" 200 OK\r\n\r\n", CLOSE]):
            response = self.client(self.serve(steps)).chat(HI)
            self.assertEqual(response.stop_reason, "error")
            self.assertNotIn("\n", response.error)
            self.assertNotIn("\r", response.error)
            self.assertLess(len(response.error), 400)

    # found: a bad client argument is reported with its value in full: a
    # 100,000-character string given as timeout gives an error that long.
    def test_bad_arguments_give_one_short_line(self):
        for options in (dict(timeout="x" * 100000), dict(retries="1\n2"), dict(max_bytes=[0] * 50000),
                        dict(base_url="ftp://" + "x" * 100000)):
            response = llm.Client(**options).chat(HI)
            self.assertEqual(response.stop_reason, "error")
            self.assertNotIn("\n", response.error)
            self.assertLess(len(response.error), 400)

    # found: an "event: error" message is not cut to one line: its data, of any
    # length and with its line breaks, becomes the error whole.
    def test_in_band_error_events_are_one_short_line(self):
        body = b"event: error\ndata: first line\ndata: " + b"x" * 200000 + b"\n\n"
        server = self.serve(sse(delta("kept "), chunk(body), done=False))
        response = self.client(server).chat_stream(HI, Writes())
        self.assertEqual((response.stop_reason, response.content), ("error", "kept "))
        self.assertNotIn("\n", response.error)
        self.assertLess(len(response.error), 400)

    # found: chat_stream looks up out.write and out.flush with getattr, which
    # lets any exception other than AttributeError escape.
    def test_out_whose_write_attribute_raises_is_an_error_response(self):
        server = self.serve(sse(delta("x", "stop")))
        response = self.client(server).chat_stream(HI, WriteProperty())
        self.assertEqual(response.stop_reason, "error")

    # found: _describe() calls str() on the exception, and image() formats its
    # source with %r, outside any guard: a writer or a message that raises an
    # exception whose __str__ fails, or an image source whose __repr__ fails,
    # makes chat_stream, chat and image raise.
    def test_exceptions_that_cannot_be_printed_do_not_escape(self):
        server = self.serve(sse(delta("a"), delta("b", "stop")))
        client = self.client(server)
        response = client.chat_stream(HI, Out(fail_after=0, error=Unprintable))
        self.assertEqual((response.stop_reason, response.content), ("error", "a"))

        class Message(dict):
            def get(self, *args):
                raise Unprintable()
        self.assertEqual(client.chat([Message(role="user")]).stop_reason, "error")
        self.assertEqual(llm.image(Unshowable()).get("type"), "text")

    # found: Stream.close() from another thread, while the stream is being read,
    # raises "ValueError: generator already executing" and does not wake the
    # blocked read (it ends only when the read times out).
    def test_stream_close_from_another_thread_ends_it(self):
        server = self.serve(sse(delta("a"), HANG))
        stream = self.client(server, timeout=10).stream(HI)
        got = []
        thread = threading.Thread(target=lambda: got.extend(stream), daemon=True)
        thread.start()
        # "a" came, and the thread reads on, inside the stream
        self.assertTrue(wait_until(lambda: got and read_elsewhere(stream)),
                        "the stream did not start")
        try:
            stream.close()
        finally:
            thread.join(1.5)
        self.assertFalse(thread.is_alive())
        self.assertEqual((stream.response.stop_reason, stream.response.content), ("cancelled", "a"))

    # found: image() hands anything that is not a URL to open(), which takes an
    # int as a file descriptor: image(3) reads whatever fd 3 is, and closes it
    # (image(True) reads and closes stdout).
    def test_image_of_a_number_neither_reads_nor_closes_a_file_descriptor(self):
        read_end, write_end = os.pipe()
        os.write(write_end, b"\x89PNG not really")
        os.close(write_end)  # so that a read of the pipe ends
        part = llm.image(read_end)
        try:
            os.fstat(read_end)
            os.close(read_end)
        except OSError:
            self.fail("image() closed file descriptor %d" % read_end)
        self.assertNotEqual(part.get("type"), "image_url")

    # found: a base_url with port 0 sends the request to port 80: urlsplit gives
    # port 0, and "parts.port or 80" takes it for no port.
    def test_port_zero_is_not_port_80(self):
        response = llm.Client("http://127.0.0.1:0", timeout=1).chat(HI)
        self.assertEqual(response.stop_reason, "error")
        self.assertNotIn(":80", response.error)

    # found: models() that is cancelled mid-answer reports what the cut did to
    # the reading ("connection closed in the middle of a chunk: ..."), not "cancelled".
    def test_models_that_is_cancelled_says_so(self):
        body = b'{"data": [{"id": "m"}]}'
        sent = threading.Event()
        first = head(content_type="application/json", chunked=False, length=len(body)) + body[:5]
        server = self.serve([first, sent.set, HANG])
        client = self.client(server, timeout=10)
        box = []
        thread = threading.Thread(target=lambda: box.append(client.models()), daemon=True)
        thread.start()
        self.assertTrue(sent.wait(5), "the request did not come")

        def reading():  # mid-answer: the client has read all that was sent, and waits for more
            sock = call_socket(client)
            return sock is not None and not readable(sock, 0)
        self.assertTrue(wait_until(reading), "the client did not read the answer")
        client.cancel()
        thread.join(5)
        self.assertEqual((list(box[0]), box[0].error), ([], "cancelled"))

    # found: with n > 1 the reply keeps to the choice whose index is 0 (or
    # missing), and a reply whose only choice has another index (1, or "0" as a
    # string) loses all its content.
    def test_a_single_choice_with_another_index_keeps_its_content(self):
        def event_with(index, text, finish=None):
            return chunk(event({"choices": [{"index": index, "delta": {"content": text},
                                             "finish_reason": finish}]}))
        # n = 2, interleaved: the first choice only
        server = self.serve(sse(event_with(0, "a"), event_with(1, "X"), event_with(0, "b", "stop"),
                                event_with(1, "Y", "stop")))
        self.assertEqual(self.client(server).chat_stream(HI, Writes()).content, "ab")
        for index in (1, "0", 7):
            server = self.serve(sse(event_with(index, "kept"), event_with(index, "!", "stop")))
            self.assertEqual(self.client(server).chat_stream(HI, Writes()).content, "kept!", index)
            whole = message("whole")
            whole["choices"][0]["index"] = index
            self.assertEqual(self.client(self.serve(answer(whole))).chat(HI).content, "whole", index)

    def test_a_stream_cut_at_every_byte_keeps_every_complete_event(self):
        events = [delta(role="assistant", content=None), delta("Hel"), delta("lo, \u00e9\u2028"),
                  delta(reasoning_content="hm"), delta(" w\U0001F600rld", "stop")]
        texts = ["", "Hel", "lo, \u00e9\u2028", "", " w\U0001F600rld"]
        body = b"".join(event(item) for item in events) + b"data: [DONE]\n\n"
        ends = []
        for item in events:
            ends.append((ends[-1] if ends else 0) + len(event(item)))
        cut = [0]
        for framing in ("close", "chunked"):
            if framing == "close":
                top = head(chunked=False)
                raw = top + body
                carried = lambda at: max(0, at - len(top))
            else:  # one chunk per event: the cut leaves whole chunks and part of one
                top = head()
                pieces = [event(item) for item in events] + [b"data: [DONE]\n\n"]
                raw, spans = top, []
                for piece in pieces:
                    size = b"%x\r\n" % len(piece)
                    spans.append((len(raw) + len(size), len(piece)))
                    raw += size + piece + b"\r\n"
                raw += END

                def carried(at, spans=spans):
                    return sum(max(0, min(size, at - start)) for start, size in spans)
            server = self.serve(lambda request: [raw[:cut[0]], CLOSE])
            client = self.client(server, timeout=(1, 1))
            for at in range(len(top), len(raw) + 1):
                cut[0] = at
                writes = []
                response = client.chat_stream(HI, Writes(writes))
                check_response(self, response)
                complete = "".join(text for text, end in zip(texts, ends) if end <= carried(at))
                self.assertTrue(response.content.startswith(complete), (framing, at, response))
                self.assertTrue("".join(texts).startswith(response.content), (framing, at, response))
                self.assertEqual("".join(writes), response.content)
                if at < len(raw) - (len(END) if framing == "chunked" else 0) and response.stop_reason != "error":
                    self.assertEqual(response.stop_reason, "stop")  # the finish came whole
                    self.assertEqual(response.content, "".join(texts))
            self.assertEqual(response.content, "".join(texts))

    # found: a base_url that lost a slash ("http:/127.0.0.1:8080") becomes
    # http://http:/127.0.0.1:8080, a request to the host "http" on port 80: a DNS
    # query leaves the machine for a plain typo. (Only the configuration is
    # looked at here, so that nothing is resolved while the defect is open.)
    def test_a_url_missing_a_slash_is_refused_not_resolved(self):
        for url in ("http:/127.0.0.1:8080", "https:/localhost", "http:/localhost:11434/v1"):
            client = llm.Client(url)
            self.assertTrue(client._settings.problem, (url, getattr(client, "_host", None)))
            self.assertIn("base_url", client._settings.problem)

    # found: urlsplit() drops tabs (and CR, LF) from a URL before it parses it, so
    # the check for a tab in the host never sees one: "http://a\tb:8080" goes to
    # the host "ab". (Only the configuration is looked at, so nothing is resolved.)
    def test_a_tab_in_the_host_is_refused_not_dropped(self):
        for url in ("http://a\tb:8080", "http://local\thost:11434", "http://127.0.0.1:80\t80/v1"):
            client = llm.Client(url)
            self.assertTrue(client._settings.problem, (url, getattr(client, "_host", None)))

    # found: extra headers replaced the client's own only when spelled with the same
    # case: headers={"authorization": ...} with an api_key sent two Authorization
    # headers, and "content-type" or "accept" a second Content-Type or Accept.
    def test_extra_headers_replace_the_clients_own_whatever_their_case(self):
        listener = self.listener(1)
        heads = []

        def serve():
            sock, _ = listener.accept()
            sock.settimeout(5)
            data = b""
            try:
                while b"\r\n\r\n" not in data:
                    data += sock.recv(65536) or b"\r\n\r\n"
                heads.append(data.split(b"\r\n\r\n")[0].decode("latin-1").lower().split("\r\n")[1:])
                sock.sendall(b"HTTP/1.1 500 No\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            finally:
                sock.close()
        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        client = self.client("http://127.0.0.1:%d" % listener.getsockname()[1], api_key=KEY,
                             headers={"authorization": "Bearer other", "content-type": "application/json; x=1",
                                      "accept": "application/json"})
        client.chat(HI)
        thread.join(5)
        names = [line.partition(":")[0] for line in heads[0]]
        for name in ("authorization", "content-type", "accept"):
            self.assertEqual(names.count(name), 1, (name, heads[0]))
        self.assertIn("authorization: bearer other", heads[0])

    def test_odd_outs_never_raise(self):
        server = self.serve(sse(delta("a"), delta(reasoning_content="hm"), delta("b", "stop")))
        client = self.client(server)
        outs = [Out(), Out(returns=-1), Out(returns=Boom()), Out(flush="missing"), Out(flush="raises"),
                Out(flush=5), Out(fail_after=0), Out(fail_after=1), Out(fail_after=1, error=ValueError),
                Out(fail_after=0, error=StopIteration), Out(fail_after=0, error=UnicodeEncodeError),
                WriteNotCallable(), None, 5, "text", io.StringIO(), io.BytesIO(), llm.SSEWriter(io.BytesIO()),
                llm.SSEWriter(io.StringIO()), llm.SSEWriter(Out(fail_after=1)), llm.SSEWriter(None),
                llm.SSEWriter(Boom()), llm.SSEWriter(Out(flush="raises")), llm.SSEWriter(WriteNotCallable())]
        closed = io.StringIO()
        closed.close()
        outs.append(closed)
        outs += [Out(reasoning="ok"), Out(reasoning="raises"), Out(reasoning=5)]
        for out in outs:
            response = client.chat_stream(HI, out)
            check_response(self, response)
            self.assertIn(response.content, ("", "a", "ab"))
            self.assertEqual(response.content == "ab" and response.ok,
                             response.stop_reason == "stop", repr(type(out)))


# ---------------------------------------------------------------- bounded work


def cpu_seconds(function):
    """The least process CPU time of three runs of function."""
    times = []
    for _ in range(3):
        started = time.process_time()
        function()
        times.append(time.process_time() - started)
    return min(times)


def assert_linear(test, work, small, large):
    """Fail unless work(large) costs less than 8 times the CPU of work(small): large is 4
    times small, so linear work costs about 4 times, and quadratic work 16. Work that
    may not end stops itself after 2 s of CPU, and that fails too."""
    small_cpu = cpu_seconds(lambda: work(small))
    large_cpu = cpu_seconds(lambda: work(large))
    figures = "%s: %.4fs of CPU, %s: %.4fs" % (small, small_cpu, large, large_cpu)
    test.assertLess(large_cpu, 2, figures)
    test.assertLess(large_cpu / max(small_cpu, 1e-3), 8, figures)


def tool_call_stream(calls, fragments):
    """An event stream of calls tool calls, each sent as its start and then fragments pieces."""
    body = []
    for index in range(calls):
        start = {"index": index, "id": "call_%d" % index, "type": "function",
                 "function": {"name": "f", "arguments": ""}}
        body.append(event(delta(tool_calls=[start])))
    for _ in range(fragments):
        for index in range(calls):
            body.append(event(delta(tool_calls=[{"index": index, "function": {"arguments": " "}}])))
    body.append(event(delta(None, "tool_calls")) + b"data: [DONE]\n\n")
    data = b"".join(body)
    return [head(chunked=False, length=len(data)), data]


class BoundedWorkTest(HostileCase):
    """CPU grows linearly with the bytes received; memory stays within 3 x max_bytes."""

    # found: tool-call assembly scanned every earlier call for each fragment
    # (8,000 indexed calls in 630 KB: 4.8 s; four times the input: fifteen times the time)
    def test_more_tool_calls_than_the_cap_is_a_clear_error(self):
        for style in ("stream", "whole"):
            calls = [{"index": n, "id": "c%d" % n, "function": {"name": "f", "arguments": "{}"}}
                     for n in range(8000)]
            steps = (tool_call_stream(8000, 0) if style == "stream"
                     else answer(message(None, "tool_calls", tool_calls=calls)))
            client = self.client(self.serve(steps), deadline=30)
            response, _ = bounded(self, client.chat_stream if style == "stream" else
                                  (lambda messages, out: client.chat(messages)), 60, HI, Writes())
            check_response(self, response)
            self.assertEqual(response.error, "the reply asks for more than %d tool calls"
                             % llm._MAX_TOOL_CALLS, style)
            self.assertEqual(len(response.tool_calls), llm._MAX_TOOL_CALLS)

    def test_tool_call_fragments_cost_linear_time(self):
        client = self.client(self.serve(tool_call_stream(200, 5), tool_call_stream(200, 20)))
        small = cpu_seconds(lambda: client.chat_stream(HI, Writes()))
        client = self.client(self.serve(tool_call_stream(200, 20)))
        large = cpu_seconds(lambda: client.chat_stream(HI, Writes()))
        response = client.chat_stream(HI, Writes())
        self.assertEqual((len(response.tool_calls), response.tool_calls[0].arguments), (200, " " * 20))
        self.assertLess(large / max(small, 1e-3), 8, "4x the fragments: %.1fx the time" % (large / small))

    # found: an event of up to 64 data lines that each end in } or ] was joined and
    # parsed again at every line
    def test_each_data_line_is_parsed_at_most_twice(self):
        parsed = []
        real_loads = llm._loads

        def counting(text):
            parsed.append(len(text))
            return real_loads(text)
        bodies = {"lines ending in }": b"".join(b"data: x%04d}\n" % n for n in range(64)) + b"\n",
                  "deep brackets": b"data: {\n" + b"data: [1, 2]}\n" * 63 + b"\n",
                  "no JSON": b"data: {]\n" * 64 + b"\n",
                  "one pretty JSON": b'data: {\n' + b'data: "a": [1,\n' * 31 + b'data: 1' + b']' * 31
                  + b'}\n\n'}
        for name, body in bodies.items():
            with self.subTest(name), mock.patch.object(llm, "_loads", counting):
                del parsed[:]
                stream = body * 50
                llm._SSEDecoder().feed(stream)
                self.assertTrue(parsed, name)
                self.assertLessEqual(sum(parsed), 2 * len(stream), name)

    def test_trailer_lines_without_end_are_bounded_and_the_reply_stands(self):
        # after the last chunk a server may send trailer lines: one that sends them without
        # end kept chat() and chat_stream() reading (gigabytes, with max_bytes of 1 MiB)
        line = b"X-Trailer: " + b"t" * 100 + b"\r\n"
        bodies = {"stream": chunk(event(delta("a", "stop"))) + chunk(b"data: [DONE]\n\n"),
                  "whole": chunk(json.dumps(message("a")).encode())}
        for name, body in bodies.items():
            for kind in ("endless", "one long line"):
                with self.subTest(name=name, trailers=kind):
                    sent = []

                    def steps(request):
                        yield head(content_type="text/event-stream" if name == "stream"
                                   else "application/json") + body + b"0\r\n"
                        while sum(sent) < 64 * MIB:  # a bound for the test: the client stops sooner
                            piece = line * 100 if kind == "endless" else b"t" * 100000
                            sent.append(len(piece))
                            yield piece
                        yield b"\r\n\r\n"
                    server = self.serve(steps)
                    client = self.client(server, max_bytes=MIB)
                    for call in (lambda: client.chat(HI), lambda: client.chat_stream(HI, Writes())):
                        response, _ = bounded(self, call, 60)
                        check_response(self, response)
                        self.assertEqual((response.content, response.stop_reason), ("a", "stop"))
                        self.assertLess(sum(sent), 16 * MIB)
                    self.assertEqual(server.connections, 2)  # never reused with trailers unread

    def test_the_deadline_bounds_work_on_data_that_keeps_coming(self):
        # 60 KB of content per send, as fast as it goes, for longer than any client reads
        # within the deadline: this one reads 50 to 100 MB a second, by Python, so 0.5 s
        # is at most 50 MB of the gigabyte; a call the deadline did not end reads it all
        piece = event(delta("x" * 100)) * 600
        client = self.client(self.serve(lazy(head(chunked=False), piece, 1024 * MIB)),
                             deadline=0.5, max_bytes=8192 * MIB)
        response, _ = bounded(self, client.chat_stream, 60, HI, Writes())
        check_response(self, response)
        self.assertEqual(response.error, "deadline of 0.5s exceeded")
        self.assertLess(len(response.content), 256 * MIB)

    def assert_memory_bounded(self, call, limit):
        response, peak = self.assert_bounded_peak(call, 3 * limit + MIB)
        check_response(self, response)
        return response

    SHAPES = {"tiny objects": b"{},", "tiny lists": b"[],", "floats": b"1.5,", "short strings": b'"ab",',
              "nested": b'[{"a":[{}]}],', "numbers": b"1000,"}

    # found: JSON of tiny containers costs ~27x its size as Python objects
    # (a 16 MiB body peaked at 440-500 MiB)
    def test_a_whole_reply_of_any_shape_stays_within_three_times_max_bytes(self):
        limit = 4 * MIB
        for name, item in self.SHAPES.items():
            with self.subTest(name):
                junk = b"[" + item * ((limit - 200) // len(item)) + b"0]"
                body = b'{"choices": [{"message": {"content": "hi"}}], "junk": ' + junk + b"}"
                steps = [head(200, "application/json", chunked=False, length=len(body)) + body]
                client = self.client(self.serve(steps), max_bytes=limit + 100)
                response = self.assert_memory_bounded(lambda: client.chat(HI), limit)
                if response.ok:
                    self.assertEqual(response.content, "hi")
                else:
                    self.assertIn("too many to parse within max_bytes", response.error)

    def test_one_event_of_any_shape_stays_within_three_times_max_bytes(self):
        limit = 4 * MIB
        for name, item in self.SHAPES.items():
            with self.subTest(name):
                junk = b"[" + item * ((limit - 200) // len(item)) + b"0]"
                body = (b'data: {"choices": [{"delta": {"content": "hi"}}], "junk": ' + junk
                        + b"}\n\ndata: [DONE]\n\n")
                client = self.client(self.serve(raw_sse(body, chunked=False)), max_bytes=limit + 100)
                response = self.assert_memory_bounded(lambda: client.chat_stream(HI, Writes()), limit)
                if response.ok:
                    self.assertEqual(response.content, "hi")
                else:
                    self.assertIn("too many to parse within max_bytes", response.error)

    def test_a_long_reply_with_ordinary_text_is_still_read(self):
        text = "Commas, colons: [brackets] and {braces}, all in a string. " * 40000  # 2.3 MB
        client = self.client(self.serve(answer(message(text))), max_bytes=4 * MIB)
        response = self.assert_memory_bounded(lambda: client.chat(HI), 4 * MIB)
        self.assertEqual(response.content, text)

    def test_wide_text_up_to_max_bytes_is_read_within_a_bounded_peak(self):
        # one emoji makes Python store every character of a string in four bytes: the
        # text costs up to four times its UTF-8 size, and is read all the same
        limit = 4 * MIB
        text = "plain words, " * ((limit - 64 * 1024) // 13) + "\U0001F600"
        whole = json.dumps(message(text), ensure_ascii=False).encode("utf-8")
        streamed = event(delta(text, "stop")) + b"data: [DONE]\n\n"
        for steps in ([head(200, "application/json", chunked=False, length=len(whole)) + whole],
                      raw_sse(streamed, chunked=False)):
            client = self.client(self.serve(steps), max_bytes=limit)
            response, peak = self.assert_bounded_peak(lambda: client.chat_stream(HI, Writes()), 10 * limit)
            check_response(self, response)
            self.assertEqual(response.content, text)

    def test_log_probabilities_are_kept_within_max_bytes(self):
        limit = MIB

        def logprob_chunk(n):
            entry = {"token": "t", "logprob": -0.5, "bytes": [116],
                     "top_logprobs": [{"token": "t%d" % k, "logprob": -1.0, "bytes": [116]}
                                      for k in range(5)]}
            return {"choices": [{"index": 0, "delta": {"content": "t"}, "logprobs": {"content": [entry]}}]}
        client = self.client(self.serve(sse(*[logprob_chunk(n) for n in range(3000)])), max_bytes=limit)
        response = self.assert_memory_bounded(lambda: client.chat_stream(HI, Writes()), limit)
        self.assertEqual(response.error, "the reply carries more log-probabilities than max_bytes"
                         " (%d bytes) allows to keep" % limit)
        self.assertLessEqual(len(response.logprobs) * 6, limit // llm._LOGPROB_COST + 6)
        self.assertEqual(len(response.content), len(response.logprobs))  # nothing lost before it

    # found: a huge usage object stayed alive in the Response
    def test_usage_keeps_only_the_token_counts(self):
        usage = {"prompt_tokens": 3, "completion_tokens": 2, "junk": "x" * MIB,
                 "completion_tokens_details": {"reasoning_tokens": 1, "junk": ["y"] * 1000},
                 "nested": {"deeper": {"deepest": list(range(1000))}}}
        for steps in (answer(message("a", usage=usage)), sse(delta("a", "stop"), {"choices": [], "usage": usage})):
            response = self.client(self.serve(steps)).chat_stream(HI, Writes())
            self.assertEqual(response.usage, {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5,
                                              "completion_tokens_details": {"reasoning_tokens": 1}})


def nested(depth, inner=b"0"):
    """JSON text that nests arrays and objects ``depth`` deep around inner."""
    return b'[{"a":' * (depth // 2) + b"[" * (depth % 2) + inner + b"]" * (depth % 2) + b"}]" * (depth // 2)


DEEP_CHILD = r"""
import gc, io, json, sys
sys.path.insert(0, sys.argv[1])
import llm

def callback(phase, info):  # Python code at every collection, as profilers and hypothesis run
    def deeper(n):
        return deeper(n - 1) if n else n
    deeper(5)

gc.callbacks.append(callback)
gc.set_threshold(1)
client = llm.Client(sys.argv[2], model="m", api_key="")
hi = [{"role": "user", "content": "Hi"}]
seen = [client.chat(hi).error, client.chat_stream(hi, io.StringIO()).error, client.models().error,
        client.chat(hi).error, client.chat(hi).tool_calls[0].args]
client.close()
print(json.dumps(seen))
"""


# found: JSON nested 50,000 deep ran the decoder into Python's recursion limit; with a
# gc callback installed (profilers and hypothesis install one), CPython 3.6 to 3.8
# aborted the whole process: "Fatal Python error: Cannot recover from stack overflow"
class DeepNestingTest(HostileCase):
    """JSON nested more than llm._MAX_DEPTH deep is refused before it is parsed, wherever it comes."""

    TOO_DEEP = "the reply is JSON nested more than %d deep: too deep to parse" % llm._MAX_DEPTH
    DEEP = nested(50000)

    @staticmethod
    def json_answer(body, status=200):
        """An answer of JSON text as it is (answer() would write it out from an object)."""
        return [head(status, "application/json", chunked=False, length=len(body)) + body]

    def whole(self, junk, **fields):
        return self.json_answer(json.dumps(message(**fields)).encode()[:-1] + b', "junk": ' + junk + b"}")

    def models(self):
        return self.json_answer(b'{"data": [{"id": "m"}], "junk": ' + self.DEEP + b"}")

    def test_a_whole_reply_a_stream_and_the_model_list(self):
        stream = raw_sse(event(delta("a")) + b'data: {"choices": [], "junk": ' + self.DEEP + b"}\n\n")
        server = self.serve(self.whole(self.DEEP, content="hi"), stream, self.models())
        client = self.client(server)
        reply = client.chat(HI)
        self.assertEqual((reply.content, reply.error), ("", self.TOO_DEEP))
        writes = []
        reply = client.chat_stream(HI, Writes(writes))
        self.assertEqual((reply.content, writes, reply.error), ("a", ["a"], self.TOO_DEEP))
        self.assertEqual(client.models().error, self.TOO_DEEP)

    def test_as_deep_as_the_limit_is_read_one_deeper_is_not(self):
        client = self.client(self.serve(self.whole(nested(llm._MAX_DEPTH - 1), content="hi"),
                                        self.whole(nested(llm._MAX_DEPTH), content="hi")))
        self.assertEqual(client.chat(HI).content, "hi")  # the reply's own object is one level
        self.assertEqual(client.chat(HI).error, self.TOO_DEEP)

    def test_brackets_in_strings_do_not_nest(self):
        text = "[{" * 50000 + " Commas, colons: [brackets] and {braces}"
        client = self.client(self.serve(answer(message(text)), sse(delta(text, "stop"))))
        self.assertEqual(client.chat(HI).content, text)
        self.assertEqual(client.chat_stream(HI, Writes()).content, text)
        self.assertEqual(llm._json(json.dumps(text)), text)  # no bracket outside the string at all

    def test_deep_tool_arguments_and_error_bodies(self):
        client = self.client(self.serve(*self.tool_call_and_error()))
        reply = client.chat(HI)
        self.assertEqual((reply.error, reply.tool_calls[0].arguments, reply.tool_calls[0].args),
                         ("", self.DEEP.decode(), None))  # kept as text, as arguments that are no JSON are
        reply = client.chat(HI)
        self.assertEqual((reply.status, reply.error), (500, 'HTTP 500: {"error": {"message":'))

    def tool_call_and_error(self):
        call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": self.DEEP.decode()}}
        return (answer(message(None, "tool_calls", tool_calls=[call])),
                self.json_answer(b'{"error": {"message": ' + self.DEEP + b"}}", 500))

    def test_a_process_with_a_gc_callback_lives_through_it(self):
        if not hasattr(gc, "callbacks"):
            self.skipTest("%s has no gc.callbacks" % sys.implementation.name)
        call, error = self.tool_call_and_error()
        server = self.serve(self.whole(self.DEEP, content="hi"),
                            raw_sse(b'data: {"choices": [], "junk": ' + self.DEEP + b"}\n\n"),
                            self.models(), error, call)
        child = subprocess.run([sys.executable, "-c", DEEP_CHILD, ROOT, server.url], timeout=120,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.assertEqual(child.returncode, 0, child.stderr.decode("utf-8", "replace")[-2000:])
        self.assertEqual(json.loads(child.stdout.decode()),
                         [self.TOO_DEEP] * 3 + ['HTTP 500: {"error": {"message":', None])


# ---------------------------------------------------------------- properties (hypothesis)


if hypothesis is None:
    class PropertyTest(unittest.TestCase):
        @unittest.skip("hypothesis is not installed (pip install hypothesis)")
        def test_properties(self):
            pass
else:
    # ------------------------------------------------------------ values of any type

    SPECIAL = [Boom, object, lambda: EvilDict(role="user", content="x"), lambda: EvilList([1]),
               recursive_list, lambda: deep(3000), lambda: float("nan"), lambda: float("inf"),
               lambda: {1, 2}, lambda: bytearray(b"x"), lambda: (lambda: 1), lambda: Ellipsis,
               lambda: 10 ** 400, lambda: -(2 ** 63), lambda: b"\xff\xfe", lambda: "\ud800",
               lambda: "x" * 100000, lambda: {("tuple", "key"): 1}, lambda: {1: "int key"},
               lambda: iter([1, 2]), lambda: (i for i in range(2)), lambda: type, io.StringIO]
    special = st.sampled_from(SPECIAL).map(lambda make: make())
    leaves = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=30),
                       st.binary(max_size=10), special)
    anything = st.recursive(
        leaves, lambda children: st.one_of(
            st.lists(children, max_size=4), st.tuples(children, children),
            st.dictionaries(st.one_of(st.text(max_size=8), st.integers()), children, max_size=4)),
        max_leaves=8)
    json_values = st.recursive(
        st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False),
                  st.text(max_size=20)),
        lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children,
                                                                         max_size=3),
        max_leaves=8)
    texts = st.text(max_size=40) | st.sampled_from(
        ["", " ", "\r\n", "\n", "\r", "\0", "\u2028", "\x85", "\u20ac", "caf\u00e9", "\ud800", "x" * 5000])

    # ------------------------------------------------------------ URLs, loopback only

    def urls(live_port, refused_port):
        """base_url strings of many shapes, that name only loopback hosts or hosts refused at once.

        Every host part is loopback or invalid, and every port is explicit (so
        that nothing reaches a service on 80 or 443); https goes to the refused
        port only (the live server speaks plain HTTP).
        """
        schemes = ["http://", "https://", "HTTP://", "", "ftp://", "file://", "http:", "://",
                   "javascript:", "HtTpS://"]
        schemes.append("http:/")  # now "http" is a host name: it must fail before resolving
        schemes = st.sampled_from(schemes)
        hosts = ["127.0.0.1", "localhost", "[::1]", "LOCALHOST",
                 # refused by the client before anything is resolved
                 "", "a b", "a\\b", "[::1", "[]", "127.0.0.1 x"]
        hosts.append("a\tb")  # urlsplit drops tabs: "ab" must not be resolved
        hosts = st.sampled_from(hosts)
        # (not ":", ": 80" or ":+80": port 80 to some Pythons, which the guard keeps clear of)
        bad_ports = [":65536", ":-1", ":abc", ":99999999", ":1e3", ":0x50"]
        bad_ports.append(":0")
        ports = st.one_of(st.sampled_from(["live", "refused"]), st.sampled_from(bad_ports))
        paths = st.one_of(st.just(""), st.sampled_from(["/", "/v1", "/v1/", "/v1/chat/completions",
                                                       "/openai/v1", "/chat/completions", "//", "/%00",
                                                       "/v1?a=b", "/v1#frag", "/v1?a=\r\n", "/v1\r\nX: y",
                                                       "/v1?a=b c"]),
                          st.text(alphabet=st.characters(max_codepoint=127), max_size=20)
                          .map(lambda text: "/" + text))
        userinfo = st.sampled_from(["", "user@", "user:pass@", ":@"])

        def build(scheme, user, host, port, path, pad):
            if port == "live":
                port = ":%d" % (refused_port if scheme.lower().startswith("https") else live_port)
            elif port == "refused":
                port = ":%d" % refused_port
            return pad + scheme + user + host + port + path + pad
        return st.builds(build, schemes, userinfo, hosts, ports, paths, st.sampled_from(["", " ", "\t"]))

    def assert_loopback_only(test, client):
        """Refuse to use a generated client that could reach beyond loopback."""
        if client._settings.problem:
            return
        test.assertIn(client._settings.host.lower(), SAFE_HOSTS, "a generated URL left loopback")
        test.assertIsNone(client._settings.proxy)
        test.assertNotIn(client._settings.port, (80, 443), "a generated URL has no port")

    # ------------------------------------------------------------ a valid streamed reply

    FINISHES = ["stop", "length", "tool_calls", "content_filter", "end_turn", "max_tokens", "eos",
                "tool_use", "function_call", "STOP", "Length", "something_new"]
    FINISHES += ["error", "cancelled"]

    @st.composite
    def replies(draw):
        """A valid reply: its chunks (each with the text it carries), and what it amounts to.

        Its content never opens a <think> block (ThinkTagTest has those).
        """
        pieces = draw(st.lists(st.text(max_size=12), max_size=8).filter(
            lambda pieces: not "".join(pieces).lstrip().startswith("<think>")))
        thoughts = draw(st.lists(st.text(max_size=6), max_size=3))
        finish = draw(st.one_of(st.none(), st.sampled_from(FINISHES), st.text(min_size=1, max_size=8)))
        calls = draw(st.lists(st.tuples(st.text(min_size=1, max_size=6), st.text(max_size=6),
                                        st.lists(st.text(max_size=8), max_size=3)), max_size=2))
        calls = [("call_%d_%s" % (n, call_id), name, fragments)
                 for n, (call_id, name, fragments) in enumerate(calls)]
        tool_style = draw(st.sampled_from(["indexed", "whole", "unindexed"]))
        usage = draw(st.one_of(st.none(), st.fixed_dictionaries(
            {"prompt_tokens": st.integers(0, 10 ** 6), "completion_tokens": st.integers(0, 10 ** 6)})))
        chunks = []
        if draw(st.booleans()):
            chunks.append((delta(role="assistant", content=None), ""))
        for thought in thoughts:
            field = draw(st.sampled_from(["reasoning_content", "reasoning"]))
            chunks.append((delta(**{field: thought}), ""))
        for piece in pieces:
            chunks.append((delta(piece), piece))
        for index, (call_id, name, fragments) in enumerate(calls):
            if tool_style == "whole":
                whole = {"index": index, "id": call_id, "type": "function",
                         "function": {"name": name, "arguments": "".join(fragments)}}
                chunks.append((delta(tool_calls=[whole]), ""))
                continue
            first = {"id": call_id, "type": "function", "function": {"name": name, "arguments": ""}}
            if tool_style == "indexed":
                first["index"] = index
            chunks.append((delta(tool_calls=[first]), ""))
            for fragment in fragments:
                more = {"function": {"arguments": fragment}}
                if tool_style == "indexed":
                    more["index"] = index
                chunks.append((delta(tool_calls=[more]), ""))
        last = draw(st.text(max_size=5))
        if finish is not None:
            chunks.append((delta(last or None, finish), last))
        if usage:
            chunks.append(({"id": "chatcmpl-1", "choices": [], "usage": usage}, ""))
        expected = {
            "content": "".join(text for _, text in chunks),
            "reasoning": "".join(thoughts),
            # a call with neither a name nor arguments is no call; one with no name, a failure
            "calls": [(call_id, name, "".join(fragments)) for call_id, name, fragments in calls
                      if name or "".join(fragments)],
            "finish": finish,
            "usage": usage,
        }
        return chunks, expected

    def written(pieces):
        """The writes of these pieces of content: each as it comes, but the content's start
        while it may open a <think> block (whitespace, "<th"), which goes with what follows."""
        writes, held = [], ""
        for number, piece in enumerate(pieces):
            start = (held + piece).lstrip()
            if not writes and len(start) < 7 and "<think>".startswith(start):
                held += piece
                continue
            writes.append(held + piece)
            held = ""
        return writes + ([held] if held else [])

    def expected_reason(expected):
        finish = expected["finish"]
        reason = llm._STOP_REASONS.get(finish.lower(), finish) if finish else "stop"
        if reason.lower() in ("error", "cancelled", "canceled", "abort", "aborted"):  # its failure
            return "error"
        if any(not name for _, name, _ in expected["calls"]):  # a call that cannot be run
            return "error"
        if reason == "tool_calls" and not expected["calls"]:  # no call came: nothing to run
            return "stop"
        return "tool_calls" if reason == "stop" and expected["calls"] else reason

    def whole_reply(expected):
        """The same reply as one JSON body."""
        fields = {"role": "assistant", "content": expected["content"] or None}
        if expected["reasoning"]:
            fields["reasoning_content"] = expected["reasoning"]
        if expected["calls"]:
            fields["tool_calls"] = [{"id": call_id, "type": "function",
                                     "function": {"name": name, "arguments": arguments}}
                                    for call_id, name, arguments in expected["calls"]]
        reply = {"id": "chatcmpl-9", "model": "m", "object": "chat.completion",
                 "choices": [{"index": 0, "message": fields, "finish_reason": expected["finish"]}]}
        if expected["usage"]:
            reply["usage"] = expected["usage"]
        return reply

    def render(chunks, rnd, done=True):
        """The chunks as an event stream, written in one of the many legal ways.

        Returns the body and, for each chunk, the offset where its event ends.
        """
        ends = [rnd.choice([b"\n", b"\r\n", b"\r"])]
        if rnd.random() < 0.3:
            ends = [b"\n", b"\r\n", b"\r"]  # mixed line ends
        single = rnd.random() < 0.2  # events end with one line end, not a blank line
        body = bytearray(b"\xef\xbb\xbf" if rnd.random() < 0.1 else b"")
        offsets = []

        def line(text):
            body.extend(text + rnd.choice(ends))

        for item, _ in chunks + ([("DONE", "")] if done else []):
            if rnd.random() < 0.15:
                line(b":" + rnd.choice([b" keep-alive", b" OPENROUTER PROCESSING", b""]))
            if rnd.random() < 0.1:
                line(b"event: ping")
                line(b"")
            if rnd.random() < 0.1:
                line(b"event: " + rnd.choice([b"message", b"delta", b"completion"]))
            if rnd.random() < 0.1:
                line(rnd.choice([b"id: 7", b"retry: 100", b"id", b"unknown: field"]))
            if item == "DONE":
                lines = [b"[DONE]"]
            else:
                text = json.dumps(item, ensure_ascii=rnd.random() < 0.5,
                                  indent=1 if rnd.random() < 0.1 else None)
                lines = [part.encode("utf-8") for part in text.split("\n")]
            prefix = b"data: " if rnd.random() < 0.8 else b"data:"
            for part in lines:
                line(prefix + part)
            if not single:
                line(b"")
            offsets.append(len(body))
        return bytes(body), offsets

    def frame(body, rnd, mode):
        """Head and body as one HTTP/1.1 answer.

        Returns the answer, the length of its head, and for a chunked body the
        spans (answer offset, body offset, size) of its chunks' data.
        """
        ctype = rnd.choice(["text/event-stream", "text/event-stream; charset=utf-8", "TEXT/EVENT-STREAM"])
        if mode == "close":
            top = head(content_type=ctype, chunked=False)
            return top + body, len(top), None
        if mode == "length":
            top = head(content_type=ctype, chunked=False, length=len(body))
            return top + body, len(top), None
        top = head(content_type=ctype)
        out, spans, start = bytearray(top), [], 0
        while start < len(body):
            piece = body[start:start + rnd.choice([1, 2, 3, 7, 64, 500, 4096, len(body)])]
            size_line = b"%x" % len(piece)
            if rnd.random() < 0.1:
                size_line += b";ext=1"
            if rnd.random() < 0.1:
                size_line = size_line.upper()
            out.extend(size_line + b"\r\n")
            spans.append((len(out), start, len(piece)))
            out.extend(piece + b"\r\n")
            start += len(piece)
        out.extend(b"0\r\n" + (b"X-Trailer: 1\r\n" if rnd.random() < 0.1 else b"") + b"\r\n")
        return bytes(out), len(top), spans

    def delivered(cut, top, spans):
        """How many body bytes an answer cut at ``cut`` carries."""
        if spans is None:
            return max(0, cut - top)
        total = 0
        for at, start, size in spans:
            if cut <= at:
                break
            total = start + min(size, cut - at)
        return total

    def sends(data, rnd):
        """Split bytes into a few sends at random places."""
        if len(data) < 2:
            return [data] if data else []
        cuts = sorted(rnd.sample(range(1, len(data)), min(len(data) - 1, rnd.randint(0, 6))))
        return [data[start:end] for start, end in zip([0] + cuts, cuts + [len(data)])]

    def server_reasons(response):
        """A stop_reason outside the known ones is fine when the server sent it."""
        return [response.stop_reason] if response.stop_reason not in REASONS else []

    class FuzzCase(HostileCase):
        @classmethod
        def setUpClass(cls):
            cls.server = Server(answer(message("ok")))
            cls.refused = free_port()
            cls.url = cls.server.url

        @classmethod
        def tearDownClass(cls):
            cls.server.close()

        def answer_with(self, steps):
            with self.server.lock:
                self.server.answers = [steps]
                del self.server.requests[:]

        def calls(self, hows, limit=10, **options):
            """Call a new client each way in hows; return [(response, writes)], each within limit."""
            options.setdefault("model", "m")
            client = llm.Client(self.url, **options)
            results = []
            try:
                for how in hows:
                    writes = []
                    if how == "chat":
                        response, _ = bounded(self, client.chat, limit, HI)
                    elif how == "stream":
                        def iterate():
                            stream = client.stream(HI)
                            writes.extend(stream)
                            return stream.response
                        response, _ = bounded(self, iterate, limit)
                    else:
                        response, _ = bounded(self, client.chat_stream, limit, HI, Writes(writes))
                    results.append((response, writes))
            finally:
                client.close()
            return results

    # ------------------------------------------------------------ any arguments

    class ArgumentFuzzTest(FuzzCase):
        """Arguments of any type to every public function: an answer, never an exception."""

        def client_options(self, data):
            no_framing = lambda name: name.lower().strip() not in (
                "content-length", "transfer-encoding", "expect", "connection", "host")
            choices = [
                # strings only from urls(): any other text could name a host to resolve
                ("base_url", st.one_of(urls(self.server.port, self.refused), st.none(),
                                       anything.filter(lambda value: not isinstance(value, str)))),
                ("model", st.one_of(texts, st.none(), anything)),
                ("api_key", st.one_of(st.just(KEY), texts, st.none(), anything)),
                ("system", st.one_of(texts, st.none(), anything)),
                ("timeout", st.one_of(st.floats(0.05, 3), st.tuples(st.floats(0.05, 3), st.floats(0.05, 3)),
                                      st.just((1, 2, 3)), anything)),
                ("deadline", st.one_of(st.none(), st.floats(0.05, 3), anything)),
                ("headers", st.one_of(st.none(), st.dictionaries(texts.filter(no_framing), texts, max_size=3),
                                      anything)),
                ("retries", st.one_of(st.integers(-2, 2), anything)),
                ("verify", anything),
                ("ca_file", st.one_of(st.none(), texts, anything)),
                ("params", st.one_of(st.none(), st.dictionaries(st.text(max_size=8), anything, max_size=3),
                                     anything)),
                ("stream_usage", anything),
                ("max_bytes", st.one_of(st.integers(-1, 10 ** 6), anything)),
            ]
            options = {}
            for name, strategy in choices:
                if data.draw(st.booleans(), label="give " + name):
                    options[name] = data.draw(strategy, label=name)
            retries = options.get("retries")
            if isinstance(retries, int) and not isinstance(retries, bool) and retries > 0:
                options["deadline"] = 0.3  # backoff against a refused port stays short
            return options

        def messages(self, data):
            sources = st.one_of(st.text(max_size=30), st.sampled_from(
                ["http://127.0.0.1/x.png", "data:image/png;base64,AAAA", "/nonexistent/x.png", ".", "/",
                 __file__, b"/nonexistent"]))
            one = st.one_of(
                st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool"]),
                                       "content": st.one_of(texts, anything)}),
                st.builds(llm.Message, st.one_of(st.sampled_from(["user", "system"]), anything),
                          st.one_of(texts, anything)),
                st.builds(lambda text, source, detail: llm.Message(
                    "user", [{"type": "text", "text": text}, llm.image(source, detail)]),
                    texts, sources, st.one_of(st.none(), anything)),
                anything)
            return data.draw(st.one_of(st.lists(one, max_size=3), st.lists(one, max_size=3).map(tuple),
                                       anything), label="messages")

        def out(self, data):
            errors = [OSError, BrokenPipeError, ValueError, TypeError, RuntimeError, StopIteration,
                      UnicodeEncodeError, MemoryError, RecursionError, Exception]
            errors.append(Unprintable)
            plain = st.one_of(
                st.builds(Out, st.one_of(st.none(), st.integers(0, 3)), st.sampled_from(errors),
                          st.one_of(st.none(), anything), st.sampled_from(["ok", "missing", "raises", 5, None]),
                          st.sampled_from(["missing", "ok", "raises", 5, None])),
                st.sampled_from([None, 5, "text"]), st.builds(WriteNotCallable), st.builds(io.StringIO),
                st.builds(io.BytesIO))
            plain = plain | st.builds(WriteProperty) | st.builds(Boom)
            return data.draw(plain | st.builds(llm.SSEWriter, plain | anything), label="out")

        def params(self, data):
            return data.draw(st.dictionaries(st.text(max_size=10).filter(
                lambda name: name not in ("self", "messages", "out")), anything, max_size=3), label="params")

        def one_call(self, client, how, data):
            """One call the given way; its result, checked."""
            messages, params = self.messages(data), self.params(data)
            if how in ("chat", "chat_stream", "llm.chat", "llm.chat_stream"):
                function = {"chat": client.chat, "chat_stream": client.chat_stream,
                            "llm.chat": llm.chat, "llm.chat_stream": llm.chat_stream}[how]
                out = [self.out(data)] if how.endswith("stream") else []
                response, _ = bounded(self, lambda: function(messages, *out, **params), 15)
                check_response(self, response)
            elif how in ("stream", "stream_close"):
                def iterate():
                    stream = client.stream(messages, **params)
                    if how == "stream_close":
                        next(stream, None)
                        stream.close()
                    pieces = list(stream)
                    if how == "stream":
                        self.assertEqual("".join(pieces), stream.response.content)
                    return stream.response
                response, _ = bounded(self, iterate, 15)
                check_response(self, response, cancelled_ok=how == "stream_close")
            elif how == "models":
                models, _ = bounded(self, client.models, 15)
                self.assertIsInstance(models, list)
                self.assertTrue(all(isinstance(name, str) for name in models))
                self.assertIsInstance(models.error, str)
                self.assertIsInstance(models.status, int)
                self.assertNotIn(KEY, models.error)
            else:
                self.assertIsNone(bounded(self, getattr(client, how), 15)[0])

        @fuzz(100)
        @given(st.data())
        def test_any_arguments_to_every_public_function(self, data):
            started = time.monotonic()
            self.answer_with(lambda request: (
                answer({"data": [{"id": "m"}]}) if "/models" in request.path
                else sse(delta("o"), delta("k", "stop")) if b'"stream": true' in request.body
                else answer(message("ok"))))
            environment = {"LLM_BASE_URL": "http://127.0.0.1:%d" % self.refused, "LLM_API_KEY": KEY}
            with mock.patch.dict(os.environ, environment):
                for name in ("OPENAI_BASE_URL", "OPENAI_API_KEY", "OLLAMA_HOST", "LLM_MODEL"):
                    os.environ.pop(name, None)
                client = llm.Client(**self.client_options(data))
                assert_loopback_only(self, client)
                self.assertNotIn(KEY, repr(client))
                try:
                    for _ in range(data.draw(st.integers(1, 3), label="calls")):
                        how = data.draw(st.sampled_from(
                            ["chat", "chat_stream", "stream", "stream_close", "models", "cancel", "close",
                             "llm.chat", "llm.chat_stream"]), label="how")
                        self.one_call(client, how, data)
                finally:
                    client.close()
            count("any arguments to every public function", started)

        @fuzz(300)
        @given(st.data())
        def test_any_arguments_to_message_image_and_sse_writer(self, data):
            started = time.monotonic()
            values = st.one_of(texts, anything)
            fields = data.draw(st.dictionaries(st.text(min_size=1, max_size=8).filter(
                lambda name: name not in ("role", "content", "self")), values, max_size=3))
            self.assertIsInstance(llm.Message(data.draw(values), data.draw(values), **fields), dict)
            self.assertIsInstance(llm.Message(data.draw(values)), dict)
            # any source but numbers, which open() takes for file descriptors
            # (see test_image_of_a_number_neither_reads_nor_closes_a_file_descriptor)
            source = data.draw(st.one_of(
                st.text(max_size=50), st.binary(max_size=20), st.none(), st.floats(), st.lists(st.integers()),
                st.sampled_from(["http://x/y.png", "data:,x", "https://", __file__, ".", "", "/dev/null"])))
            part = llm.image(source, data.draw(st.one_of(st.none(), values)))
            self.assertIsInstance(part, dict)
            self.assertIn(part.get("type"), ("image_url", "text"))
            llm.SSEWriter(data.draw(values))
            count("any arguments to Message, image, SSEWriter", started)

    # ------------------------------------------------------------ the server's bytes

    MODES = st.sampled_from(["chunked", "close", "length"])

    class ServerBytesFuzzTest(FuzzCase):
        """Bytes from the server, valid or not: an answer in time, and nothing received lost."""

        @fuzz(80)
        @given(replies(), st.randoms(use_true_random=False), MODES)
        def test_a_valid_stream_in_any_framing_gives_the_same_reply_in_every_mode(self, reply, rnd, mode):
            started = time.monotonic()
            chunks, expected = reply
            body, _ = render(chunks, rnd)
            raw, _, _ = frame(body, rnd, mode)
            self.answer_with(sends(raw, rnd) + ([CLOSE] if mode == "close" else []))
            reason = expected_reason(expected)
            outcomes = self.calls(["chat_stream", "stream", "chat"], timeout=5)
            for (response, writes), how in zip(outcomes, ["chat_stream", "stream", "chat"]):
                check_response(self, response, reasons=[reason])
                self.assertEqual((bool(response.error), response.content),
                                 (reason == "error", expected["content"]), how)
                if how != "chat":
                    self.assertEqual(writes, written([text for _, text in chunks if text]), how)
            # the same reply as one JSON body, with chat and with chat_stream
            self.answer_with(answer(whole_reply(expected)))
            as_json = self.calls(["chat", "chat_stream"], timeout=5)
            self.assertEqual("".join(as_json[1][1]), expected["content"])
            for response, _ in outcomes + as_json:
                check_response(self, response, reasons=[reason])
                self.assertEqual(response.content, expected["content"])
                self.assertEqual(response.reasoning, expected["reasoning"])
                self.assertEqual(response.stop_reason, reason)
                self.assertEqual([(call.id, call.name, call.arguments) for call in response.tool_calls],
                                 expected["calls"])
                if expected["usage"]:
                    self.assertEqual(response.usage["prompt_tokens"], expected["usage"]["prompt_tokens"])
            count("valid stream: chat_stream = stream = chat = JSON", started)

        @fuzz(100)
        @given(replies(), st.randoms(use_true_random=False), MODES, st.floats(0, 1), st.booleans())
        def test_a_stream_cut_at_any_byte_keeps_every_complete_event(self, reply, rnd, mode, where, done):
            started = time.monotonic()
            chunks, expected = reply
            body, offsets = render(chunks, rnd, done=done)
            raw, top, spans = frame(body, rnd, mode)
            cut = top + int(where * (len(raw) - top))
            self.answer_with(sends(raw[:cut], rnd) + [CLOSE])
            got = delivered(cut, top, spans)
            complete = "".join(text for (_, text), end in zip(chunks, offsets) if end <= got)
            for (response, writes), how in zip(self.calls(["chat_stream", "chat"], limit=5, timeout=(1, 1)),
                                               ["chat_stream", "chat"]):
                check_response(self, response, reasons=[expected_reason(expected)])
                self.assertTrue(response.content.startswith(complete), (how, response, complete))
                self.assertTrue(expected["content"].startswith(response.content), (how, response))
                if how == "chat_stream":
                    self.assertEqual("".join(writes), response.content)
                if response.stop_reason != "error":
                    self.assertEqual(response.stop_reason, expected_reason(expected))
            count("stream cut at any byte", started)

        @fuzz(100)
        @given(replies(), st.randoms(use_true_random=False), MODES,
               st.lists(st.tuples(st.floats(0, 1), st.sampled_from(["flip", "insert", "delete", "repeat", "token"]),
                                  st.integers(1, 40), st.binary(min_size=1, max_size=8)), min_size=1, max_size=4))
        def test_mutated_answers_never_raise_or_hang_and_keep_what_came_before(self, reply, rnd, mode, edits):
            started = time.monotonic()
            chunks, expected = reply
            body, offsets = render(chunks, rnd)
            raw, top, spans = frame(body, rnd, mode)
            data = bytearray(raw)
            first = len(data)  # bytes before the first edit are as they were
            tokens = [b"\r\n", b"\n\n", b"\r", b"0\r\n\r\n", b"data: [DONE]\n\n", b"\xff", b"{", b"}", b"]",
                      b"data: ", b"event: error\n", b":", b"\xef\xbb\xbf", b"ffffffff\r\n", b"HTTP/1.1 200 OK\r\n"]
            for where, kind, size, extra in edits:
                at = int(where * len(data))
                first = min(first, at)
                if kind == "flip" and at < len(data):
                    data[at] ^= extra[0] or 1
                elif kind == "insert":
                    data[at:at] = extra
                elif kind == "delete":
                    del data[at:at + size]
                elif kind == "repeat":
                    data[at:at] = data[at:at + size]
                else:
                    data[at:at] = tokens[size % len(tokens)]
            self.answer_with(sends(bytes(data), rnd) + [CLOSE])
            got = delivered(first, top, spans) if first >= top else -1
            complete = "".join(text for (_, text), end in zip(chunks, offsets) if end <= got)
            for (response, writes), how in zip(self.calls(["chat_stream", "chat"], limit=8, timeout=(1, 1)),
                                               ["chat_stream", "chat"]):
                check_response(self, response, reasons=server_reasons(response))
                self.assertTrue(response.content.startswith(complete), (how, response, complete))
                if how == "chat_stream":
                    self.assertEqual("".join(writes), response.content)
            count("mutated answers", started)

        @fuzz(150)
        @given(st.data())
        def test_random_status_lines_headers_and_bodies(self, data):
            started = time.monotonic()
            code = data.draw(st.one_of(st.integers(100, 599), st.sampled_from([200, 204, 301, 400, 401, 429, 500]),
                                       st.integers(-10, 10 ** 6)), label="status")
            status = data.draw(st.one_of(
                st.builds(lambda version, reason: ("%s %s %s" % (version, code, reason)).encode(
                    "utf-8", "surrogatepass"),
                    st.sampled_from(["HTTP/1.1", "HTTP/1.0", "HTTP/2", "HTTP/0.9", "http/1.1", "HTTP/1.1 "]),
                    st.text(max_size=20).filter(lambda text: "\n" not in text and "\r" not in text)),
                st.binary(max_size=40)), label="status line")
            header_lines = data.draw(st.lists(st.one_of(
                st.sampled_from([b"Content-Type: application/json", b"Content-Type: text/event-stream",
                                 b"Content-Type: text/html", b"Content-Type: ", b"Transfer-Encoding: chunked",
                                 b"Transfer-Encoding: gzip, chunked", b"Content-Length: 0",
                                 b"Content-Length: 5", b"Content-Length: -1", b"Content-Length: abc",
                                 b"Content-Length: 99999999999999999999", b"Content-Length: 3, 4",
                                 b"Retry-After: 1", b"Retry-After: 99999", b"Retry-After: soon",
                                 b"Retry-After: Wed, 21 Oct 2015 07:28:00 GMT", b"Location: http://127.0.0.1:1/",
                                 b"Location: " + KEY.encode(), b"Connection: close", b"Connection: keep-alive",
                                 b"Content-Encoding: gzip", b" folded: continuation", b"no colon",
                                 b":", b"X-\xff: \xfe"]),
                st.binary(max_size=30).filter(lambda line: b"\n" not in line and b"\r" not in line)),
                max_size=6), label="headers")
            body = data.draw(st.one_of(st.binary(max_size=200), st.sampled_from(
                [json.dumps(message("ok")).encode(), event(delta("ok", "stop")) + b"data: [DONE]\n\n",
                 b'{"error": {"message": "no"}}', b"<html>no</html>", b"", b"5\r\nhello\r\n0\r\n\r\n",
                 b"zz\r\n"])), label="body")
            raw = status + b"\r\n" + b"".join(line + b"\r\n" for line in header_lines) + b"\r\n" + body
            self.answer_with(sends(raw, data.draw(st.randoms(use_true_random=False))) + [CLOSE])
            retries = data.draw(st.sampled_from([0, 0, 0, 0, 0, 1, 2]), label="retries")
            # a retry waits (backoff, Retry-After): the deadline keeps that short
            options = dict(timeout=(1, 1), retries=retries, deadline=0.3 if retries else None, api_key=KEY)
            for response, _ in self.calls(["chat", "chat_stream"], limit=8, **options):
                check_response(self, response, reasons=server_reasons(response))
                if response.status and not 200 <= response.status < 300:
                    self.assertEqual(response.stop_reason, "error")
            client = llm.Client(self.url, **options)
            try:
                models, _ = bounded(self, client.models, 8)
            finally:
                client.close()
            self.assertNotIn(KEY, models.error)
            count("random status lines, headers, bodies", started)

        @fuzz(100)
        @given(replies(), st.data())
        def test_wrong_types_in_any_field_keep_the_events_before_them(self, reply, data):
            started = time.monotonic()
            chunks, expected = reply
            placeholders = ["@HUGE@", "@DEEP@", "@DEEPER@", "@DEEPTEXT@", "@BADUTF8@", "@NAN@"]  # see dumps_odd()
            odd = st.one_of(json_values, st.sampled_from(placeholders),
                            st.sampled_from([None, "", [], {}, "a string", 0, -1, 1e308, True, [None], {"": None}]))
            mutated, first = [], None
            for number, (item, _) in enumerate(chunks):
                item = json.loads(json.dumps(item))
                if data.draw(st.integers(0, 3), label="mutate?") == 0:
                    first = number if first is None else first
                    for _ in range(data.draw(st.integers(1, 3), label="edits")):
                        mutate(item, data, odd)
                mutated.append(item)
            body = b"".join(dumps_odd(item) for item in mutated) + b"data: [DONE]\n\n"
            self.answer_with([head()] + [chunk(body[i:i + 700]) for i in range(0, len(body), 700)] + [END])
            (response, writes), = self.calls(["chat_stream"], timeout=(1, 2))
            check_response(self, response, reasons=server_reasons(response))
            pristine = "".join(text for _, text in chunks[:len(chunks) if first is None else first])
            self.assertTrue(response.content.startswith(pristine), (response, pristine))
            self.assertEqual("".join(writes), response.content)
            if first is None:
                self.assertEqual(response.content, expected["content"])
            whole = whole_reply(expected)  # and as one JSON body
            for _ in range(data.draw(st.integers(0, 3), label="whole edits")):
                mutate(whole, data, odd)
            self.answer_with([head(content_type="application/json"), chunk(dumps_odd(whole, event=False)), END])
            (response, _), = self.calls(["chat"], timeout=(1, 2))
            check_response(self, response, reasons=server_reasons(response))
            count("wrong types in any field", started)

        @fuzz(200)
        @given(st.binary(max_size=300) | st.builds(lambda reply, rnd: render(reply[0], rnd)[0],
                                                    replies(), st.randoms(use_true_random=False)),
               st.lists(st.integers(1, 400), max_size=12))
        def test_the_event_decoder_gives_the_same_events_however_the_bytes_are_cut(self, body, cuts):
            started = time.monotonic()
            whole = llm._SSEDecoder()
            expected = (whole.feed(body) if body else []) + whole.close()
            decoder = llm._SSEDecoder()
            events, start = [], 0
            for cut in sorted(set(c for c in cuts if c < len(body))) + [len(body)]:
                if cut > start:  # the client never feeds an empty read
                    events += decoder.feed(body[start:cut])
                start = cut
            events += decoder.close()
            self.assertEqual(comparable(events), comparable(expected))
            count("decoder: any cuts give the same events", started)

    def comparable(events):
        return [(kind, "<DONE>" if payload is llm._DONE else json.dumps(payload, sort_keys=True))
                for kind, payload in events]

    FIELDS = ["choices", "delta", "message", "content", "usage", "index", "tool_calls", "function",
              "arguments", "name", "id", "type", "role", "finish_reason", "reasoning_content", "reasoning",
              "model", "object", "error", "x_groq", "prompt_tokens", "text"]

    def mutate(value, data, odd):
        """Put an odd value in one place in value: a field, an item, or a new field."""
        containers = []

        def walk(node, depth):
            if isinstance(node, (dict, list)) and depth < 8:
                containers.append(node)
                for child in (list(node.values()) if isinstance(node, dict) else node):
                    walk(child, depth + 1)
        walk(value, 0)
        node = data.draw(st.sampled_from(containers), label="where")
        replacement = copy.deepcopy(data.draw(odd, label="odd value"))  # never shared: no cycles
        if isinstance(node, dict):
            keys = [key for key in node if key != "finish_reason" or key in FIELDS]
            key = data.draw(st.sampled_from(keys + FIELDS), label="field")
            node[key] = replacement
        elif node:
            node[data.draw(st.integers(0, len(node) - 1), label="item")] = replacement
        else:
            node.append(replacement)

    def dumps_odd(item, event=True):
        """JSON text of item, with its placeholders made into what json.dumps cannot write."""
        text = json.dumps(item).encode()
        deep_text = b"[" * 50000 + b"]" * 50000
        deep_text = b'"' + deep_text + b'"'  # as text: what ToolCall parses
        text = (text.replace(b'"@HUGE@"', b"9" * 5000).replace(b'"@DEEP@"', b"[" * 800 + b"]" * 800)
                .replace(b'"@DEEPER@"', b"[" * 50000 + b"]" * 50000).replace(b'"@BADUTF8@"', b'"\xff\xc3("')
                .replace(b'"@NAN@"', b"NaN").replace(b'"@DEEPTEXT@"', deep_text))
        return b"data: " + text + b"\n\n" if event else text


if __name__ == "__main__":
    unittest.main()
