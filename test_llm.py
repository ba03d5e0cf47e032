"""Tests for llm.py: run with ``python -m unittest`` (standard library only).

Every HTTP test talks to a real server on 127.0.0.1 (port 0, in a thread) that
sends the exact bytes of its case, in the steps the case gives: each ``bytes``
step is one send (a flush boundary the client sees), a number is a pause.
"""

import base64
import io
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import unittest
from unittest import mock

import llm

HERE = os.path.dirname(os.path.abspath(__file__))
CA_FILE = os.path.join(HERE, "testdata", "ca.pem")
SERVER_PEM = os.path.join(HERE, "testdata", "server.pem")
KEY = "sk-test-SECRET-0123456789"
HI = [{"role": "user", "content": "Hi"}]
CLOSE, RESET, HANG = "close", "reset", "hang"


# ---------------------------------------------------------------- the loopback server


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


class Request:
    def __init__(self, connection, line, headers, body):
        self.connection, self.line, self.headers, self.body = connection, line, headers, body
        self.method, self.path = line.split()[:2]

    def json(self):
        return json.loads(self.body.decode())


class Server:
    """A loopback HTTP server that answers each request with the steps of an answer.

    Answers are used in order and the last one repeats. An answer is a list of
    steps, or a function of the Request that returns one. Steps: bytes (one
    send), a number (seconds to pause), a function (called), CLOSE, RESET
    (a TCP reset) or HANG (wait until the test ends).
    """

    def __init__(self, *answers, tls=False):
        self.answers = list(answers)
        self.requests = []
        self.connections = 0
        self.ended = threading.Event()
        self.lock = threading.Lock()
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        self.context = None
        if tls:
            self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.context.load_cert_chain(SERVER_PEM)
        self.url = "%s://127.0.0.1:%d" % ("https" if tls else "http", self.port)
        self.sockets = []
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self):
        self.ended.set()
        self.listener.close()
        for sock in self.sockets:
            try:
                sock.close()
            except OSError:
                pass

    def _accept(self):
        while not self.ended.is_set():
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            with self.lock:
                self.connections += 1
                number = self.connections
            self.sockets.append(sock)
            threading.Thread(target=self._serve, args=(sock, number), daemon=True).start()

    def _serve(self, sock, number):
        reader = None
        try:
            sock.settimeout(10)
            if self.context is not None:
                sock = self.context.wrap_socket(sock, server_side=True)
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
        line = reader.readline()
        if not line:
            return False
        headers = {}
        while True:
            header = reader.readline()
            if header in (b"\r\n", b"\n", b""):
                break
            name, _, value = header.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        body = reader.read(int(headers.get("content-length", 0)))
        request = Request(number, line.decode("latin-1"), headers, body)
        with self.lock:
            self.requests.append(request)
            steps = self.answers[min(len(self.requests), len(self.answers)) - 1]
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
            elif step == RESET:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
                return False
            elif step == HANG:
                self.ended.wait(10)
                return False
        return True


class LoopbackCase(unittest.TestCase):
    """A test case with helpers to start loopback servers and clients for them."""

    def serve(self, *answers, **options):
        server = Server(*answers, **options)
        self.addCleanup(server.close)
        return server

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


def in_thread(function, *args):
    """Run function in a thread; return (thread, results list)."""
    results = []
    thread = threading.Thread(target=lambda: results.append(function(*args)), daemon=True)
    thread.start()
    return thread, results


# ---------------------------------------------------------------- public surface


class PublicSurfaceTest(unittest.TestCase):
    def test_all_names_exactly_the_public_ones(self):
        public = {name for name in vars(llm) if not name.startswith("_")}
        modules = {name for name in public if type(getattr(llm, name)) is type(os)}
        self.assertEqual(set(llm.__all__), public - modules)

    def test_importing_loads_nothing_heavy_and_reads_no_environment(self):
        code = ("import os, sys, json, http.client, threading, weakref\n"
                "before = set(sys.modules)\n"
                "class Watch(dict):\n"
                "    def __getitem__(self, key): raise SystemExit('read ' + key)\n"
                "    get = __getitem__\n"
                "os.environ = Watch(os.environ)\n"
                "import llm\n"
                "print(sorted(set(sys.modules) - before))")
        output = subprocess.check_output([sys.executable, "-c", code], cwd=HERE)
        self.assertEqual(output.strip(), b"['llm']")  # nothing beyond json and http.client

    def test_message_is_a_plain_wire_dict(self):
        self.assertEqual(llm.Message("user", "Hi"), {"role": "user", "content": "Hi"})
        self.assertEqual(llm.Message("tool", "42", tool_call_id="c1"),
                         {"role": "tool", "content": "42", "tool_call_id": "c1"})
        self.assertEqual(json.loads(json.dumps(llm.Message("user", "x")))["role"], "user")


# ---------------------------------------------------------------- the SSE decoder


def decode(data, cuts=()):
    """Feed data to a decoder cut at the given offsets; return the events."""
    decoder = llm._SSEDecoder()
    events, start = [], 0
    for cut in list(cuts) + [len(data)]:
        events += decoder.feed(data[start:cut])
        start = cut
    return events + decoder.close()


class SSEDecoderTest(unittest.TestCase):
    def test_spec_example_with_multiline_data_and_comments(self):
        data = b": test stream\n\ndata: first event\nid: 1\n\ndata:second event\nid\n\ndata:  third event\n\n"
        self.assertEqual(decode(data), [("message", "first event"), ("message", "second event"),
                                        ("message", " third event")])

    def test_data_lines_join_with_newline(self):
        self.assertEqual(decode(b"data: YHOO\ndata: +2\ndata: 10\n\n"), [("message", "YHOO\n+2\n10")])

    def test_multiline_json_is_parsed_once_complete(self):
        self.assertEqual(decode(b'data: {"a":\ndata: {"b": 1}}\n\n'), [("message", {"a": {"b": 1}})])

    def test_crlf_cr_and_lf_line_ends_give_the_same_events(self):
        body = b'event: x\ndata: {"a": 1}\n\n: c\ndata: [DONE]\n\n'
        expected = decode(body)
        self.assertEqual(decode(body.replace(b"\n", b"\r\n")), expected)
        self.assertEqual(decode(body.replace(b"\n", b"\r")), expected)
        self.assertEqual(expected, [("x", {"a": 1}), ("message", llm._DONE)])

    def test_every_cut_of_a_stream_gives_the_same_events(self):
        body = ('\ufeffdata: {"c": "h\u00e9\u2028llo \U0001F600"}\r\n\r\n: keep-alive\r\n'
                'event: ping\r\n\r\nid: 7\rretry: 10\rdata:{"c": 2}\r\rdata: [DONE]\r\n\r\n').encode()
        expected = decode(body)
        self.assertEqual(expected, [("message", {"c": "h\u00e9\u2028llo \U0001F600"}),
                                    ("message", {"c": 2}), ("message", llm._DONE)])
        for cut in range(len(body) + 1):
            self.assertEqual(decode(body, [cut]), expected, "cut at %d" % cut)
        for step in (1, 2, 3, 7):
            self.assertEqual(decode(body, range(step, len(body), step)), expected, step)

    def test_leading_bom_is_dropped_once(self):
        self.assertEqual(decode(b"\xef\xbb\xbfdata: a\n\n"), [("message", "a")])
        self.assertEqual(decode(b"\xef\xbb\xbf\xef\xbb\xbfdata: a\n\n"), [])  # the second is part of a field name

    def test_event_without_data_is_not_dispatched(self):
        self.assertEqual(decode(b"event: ping\n\nretry: 5\n\n"), [])

    def test_event_type_applies_to_its_event_only(self):
        self.assertEqual(decode(b'event: error\ndata: {"m": 1}\n\ndata: {"m": 2}\n\n'),
                         [("error", {"m": 1}), ("message", {"m": 2})])

    def test_single_newline_events_are_taken_at_once(self):
        decoder = llm._SSEDecoder()
        self.assertEqual(decoder.feed(b'data: {"a": 1}\n'), [("message", {"a": 1})])
        self.assertEqual(decoder.feed(b'data: {"a": 2}\ndata: [DONE]\n'),
                         [("message", {"a": 2}), ("message", llm._DONE)])

    def test_done_with_and_without_space(self):
        self.assertEqual(decode(b"data:[DONE]\n\n"), [("message", llm._DONE)])

    def test_invalid_utf8_is_replaced_not_raised(self):
        self.assertEqual(decode(b'data: {"c": "a\xffb"}\n\n'), [("message", {"c": "a\ufffdb"})])

    def test_unterminated_last_line_is_taken_at_the_end(self):
        self.assertEqual(decode(b"data: [DONE]"), [("message", llm._DONE)])


# ---------------------------------------------------------------- streaming


class StreamingTest(LoopbackCase):
    def test_deltas_are_written_in_order_and_concatenate_to_content(self):
        response, writes, _ = self.stream(sse(delta(role="assistant", content=None),
                                              delta("Hel"), delta("lo"), delta("!", "stop")))
        self.assertEqual(writes, ["Hel", "lo", "!"])
        self.assertEqual(response.content, "Hello!")
        self.assertEqual((response.stop_reason, response.status, response.error), ("stop", 200, ""))
        self.assertEqual((response.model, response.id, response.role), ("m", "chatcmpl-1", "assistant"))
        self.assertTrue(response.ok)

    def test_each_delta_reaches_out_before_the_server_sends_the_rest(self):
        first_written = threading.Event()
        waited = []
        steps = sse(delta("one"), lambda: waited.append(first_written.wait(5)), delta("two", "stop"))
        server = self.serve(steps)
        out = Writes(on_write=lambda text: first_written.set())
        response = self.client(server).chat_stream(HI, out)
        self.assertEqual(waited, [True])  # the server held "two" back until "one" was written
        self.assertEqual(response.content, "onetwo")
        self.assertEqual(out.flushes, 2)

    def test_events_split_across_reads_and_several_per_read(self):
        body = event(delta("a")) + event(delta("b"))
        body += event(delta("c", "stop")) + b"data: [DONE]\n\n"
        parts = [body[:7], 0.02, body[7:50], 0.02, body[50:]]
        steps = [head(), chunk(parts[0]), parts[1], chunk(parts[2]), parts[3], chunk(parts[4]), END]
        response, writes, _ = self.stream(steps)
        self.assertEqual(response.content, "abc")

    def test_multibyte_character_split_across_reads_stays_whole(self):
        body = event(delta("h\u00e9llo \U0001F600", "stop")) + b"data: [DONE]\n\n"
        cut = body.index(b"\xc3") + 1
        steps = [head(), chunk(body[:cut]), 0.05, chunk(body[cut:cut + 9]), 0.05, chunk(body[cut + 9:]), END]
        response, writes, _ = self.stream(steps)
        self.assertEqual(response.content, "h\u00e9llo \U0001F600")

    def test_line_separator_inside_json_is_not_a_line_end(self):
        response, _, _ = self.stream(sse(delta("a\u2028b\u0085c\u2029", "stop")))
        self.assertEqual(response.content, "a\u2028b\u0085c\u2029")

    def test_crlf_line_ends_split_between_reads(self):
        body = (event(delta("x")) + event(delta("y", "stop")) + b"data: [DONE]\n\n").replace(b"\n", b"\r\n")
        cut = body.index(b"\r\n") + 1
        response, writes, _ = self.stream([head(), chunk(body[:cut]), 0.05, chunk(body[cut:]), END])
        self.assertEqual(writes, ["x", "y"])

    def test_bare_cr_line_ends(self):
        body = (event(delta("x")) + event(delta("y", "stop")) + b"data: [DONE]\n\n").replace(b"\n", b"\r")
        response, writes, _ = self.stream(raw_sse(body))
        self.assertEqual((writes, response.stop_reason), (["x", "y"], "stop"))

    def test_comments_event_id_retry_lines_and_empty_events_are_ignored(self):
        body = [b": OPENROUTER PROCESSING\n\n", b"event: ping\n\n", b"id: 4\nretry: 100\n\n",
                b"event: message\n" + event(delta("a")), b":\n\n", event(delta("b", "stop")),
                b"data: [DONE]\n\n"]
        response, writes, _ = self.stream(raw_sse(body))
        self.assertEqual((writes, response.ok), (["a", "b"], True))

    def test_data_without_space_and_done_without_space(self):
        body = b'data:' + json.dumps(delta("a", "stop")).encode() + b"\n\ndata:[DONE]\n\n"
        response, writes, _ = self.stream(raw_sse(body))
        self.assertEqual((response.content, response.stop_reason), ("a", "stop"))

    def test_events_ended_by_a_single_newline(self):
        body = b"".join(b"data: " + json.dumps(d).encode() + b"\n" for d in (delta("a"), delta("b", "stop")))
        first_seen = threading.Event()
        steps = [head(), chunk(body + b"data: [DONE]\n"), END]
        response, writes, _ = self.stream(steps)
        self.assertEqual((writes, response.stop_reason), (["a", "b"], "stop"))

    def test_leading_bom_is_dropped(self):
        response, _, _ = self.stream(raw_sse(b"\xef\xbb\xbf" + event(delta("a", "stop")) + b"data: [DONE]\n\n"))
        self.assertEqual(response.content, "a")

    def test_null_content_role_only_and_finish_with_content(self):
        response, writes, _ = self.stream(sse(delta(role="assistant", content=None), delta(None),
                                              {"choices": [{"index": 0, "delta": {}}]}, delta("end", "length")))
        self.assertEqual((writes, response.stop_reason), (["end"], "length"))

    def test_usage_only_final_chunk(self):
        usage = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
        response, _, server = self.stream(sse(delta("a", "stop"), {"choices": [], "usage": usage}))
        self.assertEqual(response.usage, usage)
        self.assertEqual(server.requests[0].json()["stream_options"], {"include_usage": True})

    def test_usage_where_other_servers_put_it(self):
        groq = {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                "x_groq": {"usage": {"prompt_tokens": 1, "completion_tokens": 2}}}
        response, _, _ = self.stream(sse(delta("a"), groq))
        self.assertEqual(response.usage["total_tokens"], 3)
        in_choice = {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop",
                                  "usage": {"input_tokens": 4, "output_tokens": 1}}]}
        response, _, _ = self.stream(sse(delta("a"), in_choice))
        self.assertEqual((response.usage["prompt_tokens"], response.usage["total_tokens"]), (4, 5))

    def test_no_usage_is_none_and_stream_usage_false_does_not_ask(self):
        server = self.serve(sse(delta("a", "stop")))
        response = self.client(server, stream_usage=False).chat_stream(HI, Writes())
        self.assertIsNone(response.usage)
        self.assertNotIn("stream_options", server.requests[0].json())

    def test_server_that_rejects_stream_options_gets_one_resend_without_it(self):
        rejection = answer({"error": {"message": "1 validation error: stream_options: Extra inputs are not permitted",
                                      "type": "BadRequestError"}}, status=400)
        server = self.serve(rejection, sse(delta("ok", "stop")))
        client = self.client(server)
        writes = []
        response = client.chat_stream(HI, Writes(writes))
        self.assertEqual((response.content, response.ok, writes), ("ok", True, ["ok"]))
        bodies = [request.json() for request in server.requests]
        self.assertIn("stream_options", bodies[0])
        self.assertNotIn("stream_options", bodies[1])
        client.chat_stream(HI, Writes())  # remembered for this client
        self.assertNotIn("stream_options", server.requests[2].json())

    def test_stream_options_given_by_the_caller_are_not_dropped(self):
        rejection = answer({"error": {"message": "stream_options: not permitted"}}, status=400)
        server = self.serve(rejection, sse(delta("ok", "stop")))
        response = self.client(server).chat_stream(HI, Writes(), stream_options={"include_usage": True})
        self.assertEqual((response.error, len(server.requests)), ("HTTP 400: stream_options: not permitted", 1))

    def test_only_the_first_choice_is_kept_when_n_is_more_than_one(self):
        def choice(index, content, finish=None):
            return {"choices": [{"index": index, "delta": {"content": content}, "finish_reason": finish}]}
        response, writes, _ = self.stream(sse(choice(0, "a"), choice(1, "X"), choice(0, "b", "stop"),
                                              choice(1, "Y", "length"),
                                              {"choices": [{"index": 1, "delta": {"content": "Z"}},
                                                           {"index": 0, "delta": {"content": "c"}}]}))
        self.assertEqual((writes, response.stop_reason), (["a", "b", "c"], "stop"))

    def test_other_400_errors_are_not_resent(self):
        server = self.serve(answer({"error": {"message": "bad temperature"}}, status=400))
        response = self.client(server).chat_stream(HI, Writes())
        self.assertEqual((response.error, len(server.requests)), ("HTTP 400: bad temperature", 1))

    def test_server_that_ignores_stream_true_answers_json_written_once(self):
        writes = []
        server = self.serve(answer(message("whole answer")))
        response = self.client(server).chat_stream(HI, Writes(writes))
        self.assertEqual((writes, response.content, response.stop_reason), (["whole answer"], "whole answer", "stop"))

    def test_server_that_answers_sse_to_a_plain_request(self):
        server = self.serve(sse(delta("a"), delta("b", "stop")))
        self.assertEqual(self.client(server).chat(HI).content, "ab")

    def test_event_stream_without_content_type_is_sniffed(self):
        body = event(delta("a", "stop")) + b"data: [DONE]\n\n"
        server = self.serve([head(content_type=None, chunked=False, length=len(body)) + body])
        self.assertEqual(self.client(server).chat_stream(HI, Writes()).content, "a")

    def test_close_delimited_stream(self):
        body = event(delta("a")) + event(delta("b", "stop")) + b"data: [DONE]\n\n"
        response, writes, _ = self.stream([head(chunked=False), body[:20], 0.02, body[20:], CLOSE])
        self.assertEqual((response.content, response.ok), ("ab", True))

    def test_stream_without_done_but_with_finish_reason_is_complete(self):
        response, _, _ = self.stream(sse(delta("a", "stop"), done=False))
        self.assertEqual((response.stop_reason, response.error), ("stop", ""))

    def test_connection_closed_before_done_and_finish_is_an_error_keeping_content(self):
        response, writes, _ = self.stream([head(chunked=False), event(delta("par")), event(delta("tial")), CLOSE])
        self.assertEqual((response.stop_reason, response.error), ("error", "stream ended before [DONE]"))
        self.assertEqual(response.content, "partial")

    def test_chunked_body_cut_short_is_an_error_not_a_clean_end(self):
        body = event(delta("kept"))
        steps = [head(), chunk(body), b"64\r\n" + b"data: {\"cho", CLOSE]
        response, writes, _ = self.stream(steps)
        self.assertEqual(response.stop_reason, "error")
        self.assertIn("cut short", response.error)
        self.assertEqual(response.content, "kept")

    def test_missing_terminating_chunk_is_an_error(self):
        response, _, _ = self.stream([head(), chunk(event(delta("kept"))), CLOSE])
        self.assertEqual((response.stop_reason, response.content), ("error", "kept"))
        self.assertIn("cut short", response.error)

    def test_error_object_mid_stream_ends_with_its_message(self):
        error = {"error": {"message": "model overloaded", "type": "server_error"}}
        response, writes, _ = self.stream(sse(delta("so far"), error, delta("never")))
        self.assertEqual((response.stop_reason, response.error, response.content),
                         ("error", "model overloaded", "so far"))

    def test_object_error_mid_stream(self):
        error = {"object": "error", "message": "out of memory", "code": 500}
        response, _, _ = self.stream(sse(delta("x"), error))
        self.assertEqual((response.error, response.content), ("out of memory", "x"))

    def test_error_event_is_honoured(self):
        body = event(delta("x")) + b'event: error\ndata: {"message": "rate limited upstream"}\n\n'
        response, _, _ = self.stream(raw_sse(body))
        self.assertEqual((response.error, response.content), ("rate limited upstream", "x"))

    def test_error_event_with_plain_text_data(self):
        response, _, _ = self.stream(raw_sse(b"event: error\ndata: upstream went away\n\n"))
        self.assertEqual(response.error, "upstream went away")

    def test_non_json_data_lines_are_skipped(self):
        body = b"data: keep-alive\n\n" + event(delta("a", "stop")) + b"data: [DONE]\n\n"
        self.assertEqual(self.stream(raw_sse(body))[0].content, "a")

    def test_html_answer_is_an_error(self):
        server = self.serve([head(200, "text/html", chunked=False, length=15) + b"<html>hi</html>"])
        response = self.client(server).chat_stream(HI, Writes())
        self.assertEqual(response.stop_reason, "error")
        self.assertIn("text/html", response.error)

    def test_response_larger_than_max_bytes_is_an_error_keeping_content(self):
        events = [delta("x" * 100) for _ in range(50)] + [delta("", "stop")]
        response, _, _ = self.stream(sse(*events), max_bytes=2000)
        self.assertEqual(response.stop_reason, "error")
        self.assertIn("max_bytes", response.error)
        self.assertTrue(response.content.startswith("x" * 100))


class StopReasonTest(LoopbackCase):
    def test_each_stop_reason_and_its_synonyms(self):
        cases = [("stop", "stop"), ("length", "length"), ("tool_calls", "tool_calls"),
                 ("content_filter", "content_filter"), ("end_turn", "stop"), ("eos", "stop"),
                 ("stop_sequence", "stop"), ("max_tokens", "length"), ("tool_use", "tool_calls"),
                 ("function_call", "tool_calls"), ("STOP", "stop"), ("SAFETY", "content_filter"),
                 ("something_new", "something_new")]
        for sent, expected in cases:
            with self.subTest(sent=sent):
                self.assertEqual(self.stream(sse(delta("a", sent)))[0].stop_reason, expected)
                server = self.serve(answer(message("a", sent)))
                self.assertEqual(self.client(server).chat(HI).stop_reason, expected)

    def test_done_without_finish_reason_is_stop(self):
        self.assertEqual(self.stream(sse(delta("a")))[0].stop_reason, "stop")


class ToolCallTest(LoopbackCase):
    TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]

    def check(self, response):
        self.assertEqual(response.stop_reason, "tool_calls")
        self.assertEqual([(c.id, c.name, c.arguments, c.args) for c in response.tool_calls],
                         [("call_a", "get_weather", '{"city": "Paris"}', {"city": "Paris"}),
                          ("call_b", "get_time", "{}", {})])

    def test_tool_calls_streamed_in_indexed_fragments(self):
        def call(index, **fields):
            return delta(tool_calls=[dict(index=index, **fields)])
        response, _, _ = self.stream(sse(
            call(0, id="call_a", type="function", function={"name": "get_weather", "arguments": ""}),
            call(0, function={"arguments": '{"city": '}),
            call(1, id="call_b", type="function", function={"name": "get_time", "arguments": "{"}),
            call(0, function={"arguments": '"Paris"}'}),
            call(1, function={"arguments": "}"}),
            delta(None, "tool_calls")))
        self.check(response)

    def test_tool_calls_sent_whole_in_one_chunk(self):
        calls = [{"index": 0, "id": "call_a", "type": "function",
                  "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
                 {"index": 1, "id": "call_b", "type": "function",
                  "function": {"name": "get_time", "arguments": "{}"}}]
        self.check(self.stream(sse(delta(tool_calls=calls), delta(None, "tool_calls")))[0])

    def test_tool_calls_without_index(self):
        response, _, _ = self.stream(sse(
            delta(tool_calls=[{"id": "call_a", "function": {"name": "get_weather", "arguments": '{"city": '}}]),
            delta(tool_calls=[{"function": {"arguments": '"Paris"}'}}]),
            delta(tool_calls=[{"id": "call_b", "function": {"name": "get_time", "arguments": {}}}]),
            delta(None, "tool_calls")))
        self.check(response)

    def test_index_reused_for_a_new_call(self):
        response, _, _ = self.stream(sse(
            delta(tool_calls=[{"index": 0, "id": "call_a", "function": {"name": "get_weather",
                                                                       "arguments": '{"city": "Paris"}'}}]),
            delta(tool_calls=[{"index": 0, "id": "call_b", "function": {"name": "get_time", "arguments": "{}"}}]),
            delta(None, "tool_calls")))
        self.check(response)

    def test_tool_calls_in_a_whole_reply(self):
        calls = [{"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
                 {"id": "call_b", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]
        server = self.serve(answer(message(None, "tool_calls", tool_calls=calls)))
        response = self.client(server).chat(HI, tools=self.TOOLS)
        self.check(response)
        self.assertEqual(server.requests[0].json()["tools"], self.TOOLS)

    def test_tool_calls_with_finish_stop_are_reported_as_tool_calls(self):
        calls = [{"id": "c", "function": {"name": "f", "arguments": "{}"}}]
        server = self.serve(answer(message("", "stop", tool_calls=calls)))
        self.assertEqual(self.client(server).chat(HI).stop_reason, "tool_calls")

    def test_missing_ids_are_made_up_and_bad_json_parses_to_none(self):
        response, _, _ = self.stream(sse(delta(tool_calls=[{"index": 0, "function": {"name": "f", "arguments": "{oops"}}]),
                                         delta(None, "tool_calls")))
        call = response.tool_calls[0]
        self.assertEqual((call.id, call.name, call.arguments, call.args), ("call_0", "f", "{oops", None))
        self.assertEqual(llm.ToolCall("c", "f", "").args, {})  # no arguments at all: an empty object

    def test_reply_becomes_the_assistant_message_with_its_tool_calls(self):
        calls = [{"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]
        server = self.serve(answer(message(None, "tool_calls", tool_calls=calls)), answer(message("Sunny")))
        client = self.client(server)
        history = HI + []
        reply = client.chat(history, tools=self.TOOLS)
        history.append(reply.to_message())
        history.append(llm.Message("tool", "21 C", tool_call_id=reply.tool_calls[0].id))
        self.assertEqual(client.chat(history).content, "Sunny")
        sent = server.requests[1].json()["messages"]
        self.assertEqual(sent[1], {"role": "assistant", "content": None, "tool_calls": calls})
        self.assertEqual(sent[2], {"role": "tool", "content": "21 C", "tool_call_id": "call_a"})


class ReasoningTest(LoopbackCase):
    def test_reasoning_content_and_reasoning_spellings(self):
        for field in ("reasoning_content", "reasoning"):
            with self.subTest(field=field):
                response, writes, _ = self.stream(sse({"choices": [{"index": 0, "delta": {field: "think "}}]},
                                                      {"choices": [{"index": 0, "delta": {field: "more"}}]},
                                                      delta("answer", "stop")))
                self.assertEqual((response.reasoning, response.content, writes), ("think more", "answer", ["answer"]))
                self.assertEqual(response.to_message(), {"role": "assistant", "content": "answer", field: "think more"})

    def test_reasoning_goes_live_to_write_reasoning_when_out_has_it(self):
        seen = []

        class Both(Writes):
            def write_reasoning(self, text):
                seen.append(("reasoning", text))

            def write(self, text):
                seen.append(("content", text))
        server = self.serve(sse({"choices": [{"index": 0, "delta": {"reasoning": "hmm "}}]},
                                {"choices": [{"index": 0, "delta": {"reasoning": "ok"}}]}, delta("yes", "stop")))
        response = self.client(server).chat_stream(HI, Both())
        self.assertEqual(seen, [("reasoning", "hmm "), ("reasoning", "ok"), ("content", "yes")])
        self.assertEqual(response.reasoning, "hmm ok")

    def test_a_failing_reasoning_writer_ends_the_call(self):
        class Failing(Writes):
            def write_reasoning(self, text):
                raise OSError("closed")
        server = self.serve(sse({"choices": [{"index": 0, "delta": {"reasoning": "hmm"}}]}, delta("yes", "stop")))
        response = self.client(server).chat_stream(HI, Failing())
        self.assertEqual((response.stop_reason, response.error, response.reasoning),
                         ("error", "writing the reasoning failed: OSError: closed", "hmm"))

    def test_reasoning_in_a_whole_reply(self):
        server = self.serve(answer(message("4", reasoning_content="2+2")))
        response = self.client(server).chat(HI)
        self.assertEqual((response.reasoning, response.content), ("2+2", "4"))

    def test_no_reasoning_is_empty_and_not_in_the_message(self):
        response, _, _ = self.stream(sse(delta("a", "stop")))
        self.assertEqual((response.reasoning, response.to_message()), ("", {"role": "assistant", "content": "a"}))


class WholeReplyTest(LoopbackCase):
    def test_chat_returns_content_usage_model_and_id(self):
        usage = {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}
        server = self.serve(answer(message("Hello", usage=usage)))
        response = self.client(server).chat(HI, temperature=0)
        self.assertEqual((response.content, response.stop_reason, response.usage, response.status),
                         ("Hello", "stop", usage, 200))
        self.assertEqual((response.model, response.id), ("m", "chatcmpl-9"))
        body = server.requests[0].json()
        self.assertEqual((body["stream"], body["temperature"], body["model"]), (False, 0, "m"))
        self.assertNotIn("stream_options", body)

    def test_content_as_a_list_of_parts(self):
        server = self.serve(answer(message([{"type": "text", "text": "a"}, {"type": "text", "text": "b"}])))
        self.assertEqual(self.client(server).chat(HI).content, "ab")

    def test_invalid_json_is_an_error(self):
        server = self.serve([head(200, "application/json", chunked=False, length=9) + b'{"choices'])
        response = self.client(server).chat(HI)
        self.assertEqual(response.stop_reason, "error")
        self.assertIn("invalid JSON", response.error)

    def test_json_without_choices_is_an_error(self):
        server = self.serve(answer({"hello": "world"}))
        self.assertIn("no choices", self.client(server).chat(HI).error)

    def test_error_object_with_status_200(self):
        server = self.serve(answer({"error": {"message": "context too long"}}))
        self.assertEqual(self.client(server).chat(HI).error, "context too long")


# ---------------------------------------------------------------- errors the server sends


class ServerErrorTest(LoopbackCase):
    def error_for(self, steps):
        server = self.serve(steps)
        response = self.client(server).chat(HI)
        self.assertEqual((response.stop_reason, response.content), ("error", ""))
        return response

    def test_each_error_body_shape(self):
        cases = [
            ({"error": {"message": 'model "x" not found', "type": "invalid_request_error"}}, 404,
             'HTTP 404: model "x" not found'),
            ({"error": 'model "x" not found, try pulling it first'}, 404,
             'HTTP 404: model "x" not found, try pulling it first'),
            ({"message": "Unauthorized"}, 401, "HTTP 401: Unauthorized"),
            ({"detail": "Not Found"}, 404, "HTTP 404: Not Found"),
            ({"detail": [{"loc": ["body", "messages"], "msg": "field required", "type": "missing"}]}, 422,
             "HTTP 422: body.messages: field required"),
            ({"object": "error", "message": "max_tokens is too large", "code": 400}, 400,
             "HTTP 400: max_tokens is too large"),
            ({"error": {"message": "Provider returned error", "code": 429,
                        "metadata": {"raw": "quota exceeded", "provider_name": "X"}}}, 429,
             "HTTP 429: Provider returned error (quota exceeded)"),
        ]
        for body, status, expected in cases:
            with self.subTest(expected=expected):
                response = self.error_for(answer(body, status))
                self.assertEqual((response.error, response.status), (expected, status))

    def test_html_and_empty_bodies_give_the_status_line(self):
        page = b"<html><body><h1>502 Bad Gateway</h1></body></html>"
        self.assertEqual(self.error_for([head(502, "text/html", chunked=False, length=len(page)) + page]).error,
                         "HTTP 502: Status")
        self.assertEqual(self.error_for([b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n"]).error,
                         "HTTP 503: Service Unavailable")

    def test_plain_text_body(self):
        text = b"upstream connect error\nor disconnect"
        self.assertEqual(self.error_for([head(500, "text/plain", chunked=False, length=len(text)) + text]).error,
                         "HTTP 500: upstream connect error or disconnect")

    def test_long_bodies_are_cut(self):
        body = {"error": {"message": "x" * 5000000}}
        response = self.error_for(answer(body, 400))
        self.assertLess(len(response.error), 400)
        self.assertTrue(response.error.startswith("HTTP 400: "))

    def test_redirects_are_not_followed(self):
        server = self.serve([b"HTTP/1.1 307 Temporary Redirect\r\nLocation: http://127.0.0.1:1/elsewhere\r\n"
                             b"Content-Length: 0\r\n\r\n"])
        response = self.client(server, api_key=KEY).chat(HI)
        self.assertEqual(response.error, "HTTP 307: redirect to http://127.0.0.1:1/elsewhere not followed")
        self.assertEqual((response.status, len(server.requests)), (307, 1))

    def test_the_api_key_is_redacted_from_an_echoing_error(self):
        server = self.serve(lambda request: answer({"error": {"message": "bad key " + request.headers["authorization"]}}, 401))
        response = self.client(server, api_key=KEY).chat(HI)
        self.assertEqual(server.requests[0].headers["authorization"], "Bearer " + KEY)
        self.assertNotIn(KEY, response.error)
        self.assertEqual(response.error, "HTTP 401: bad key Bearer ***")


# ---------------------------------------------------------------- the network


class NetworkTest(LoopbackCase):
    def test_connection_refused(self):
        port = free_port()
        response = llm.Client("http://127.0.0.1:%d" % port, api_key=KEY).chat(HI)
        self.assertEqual((response.stop_reason, response.status, response.error),
                         ("error", 0, "connection refused: 127.0.0.1:%d" % port))

    def test_dns_failure(self):
        # a name the resolver rejects locally: the test sends no query off the machine
        response = llm.Client("http://no such host.invalid:80", api_key=KEY).chat(HI)
        self.assertEqual(response.stop_reason, "error")
        self.assertIn("no such host.invalid", response.error)
        with mock.patch("socket.getaddrinfo", side_effect=socket.gaierror(-2, "Name or service not known")):
            response = llm.Client("http://llm.invalid", api_key=KEY).chat(HI)
        self.assertEqual(response.error, "cannot resolve host llm.invalid (Name or service not known)")

    def test_timeout_mid_stream_keeps_what_came(self):
        response, _, _ = self.stream(sse(delta("slow "), HANG), timeout=0.3)
        self.assertEqual((response.stop_reason, response.error, response.content),
                         ("error", "timed out after 0.3s waiting for data", "slow "))

    def test_timeout_waiting_for_the_answer(self):
        server = self.serve([HANG])
        response = self.client(server, timeout=(1, 0.2)).chat(HI)
        self.assertEqual(response.error, "timed out after 0.2s waiting for data")

    def test_reset_mid_stream_keeps_what_came(self):
        response, _, _ = self.stream(sse(delta("half"), 0.05, RESET))
        self.assertEqual((response.stop_reason, response.content), ("error", "half"))
        self.assertIn("reset", response.error)

    def test_server_that_closes_after_the_headers(self):
        response, _, _ = self.stream([head(), CLOSE])
        self.assertEqual(response.stop_reason, "error")

    def test_deadline_is_not_extended_by_keep_alive_comments(self):
        steps = sse(delta("kept"), *([0.05, ] * 1)) [:-2]  # headers and one delta, no end
        steps += [chunk(b": keep-alive\n\n"), 0.05] * 60
        response, _, _ = self.stream(steps, timeout=5, deadline=0.5)
        self.assertEqual((response.stop_reason, response.error, response.content),
                         ("error", "deadline of 0.5s exceeded", "kept"))

    def test_cancel_from_another_thread_wakes_a_blocked_read_at_once(self):
        server = self.serve(sse(delta("partial"), HANG))
        client = self.client(server, timeout=60)
        written = threading.Event()
        thread, results = in_thread(client.chat_stream, HI, Writes(on_write=lambda text: written.set()))
        self.assertTrue(written.wait(5))
        client.cancel()
        thread.join(5)  # the read timeout is 60 s: only the cancel can end it this soon
        self.assertFalse(thread.is_alive())
        response = results[0]
        self.assertEqual((response.stop_reason, response.content, response.ok), ("cancelled", "partial", False))
        server.answers = [sse(delta("again", "stop"))]
        self.assertEqual(client.chat_stream(HI, Writes()).content, "again")  # later calls work

    def test_cancel_ends_a_whole_reply_wait_and_stream_iteration(self):
        server = self.serve([HANG])
        client = self.client(server, timeout=60)
        thread, results = in_thread(client.chat, HI)
        thread2, results2 = in_thread(lambda: list(client.stream(HI)))
        deadline = time.time() + 5
        while len(server.requests) < 2 and time.time() < deadline:
            time.sleep(0.01)
        client.cancel()
        thread.join(5)
        thread2.join(5)
        self.assertEqual(results[0].stop_reason, "cancelled")
        self.assertEqual(results2, [[]])

    def test_keep_alive_one_connection_for_many_calls(self):
        server = self.serve(answer(message("a")))
        client = self.client(server)
        for _ in range(5):
            self.assertEqual(client.chat(HI).content, "a")
        server.answers = [sse(delta("b", "stop"))]
        with server.lock:
            server.requests.clear()
        for _ in range(5):
            self.assertEqual(client.chat_stream(HI, Writes()).content, "b")
        self.assertEqual(server.connections, 1)

    def test_connection_the_server_closed_while_idle_is_retried_once(self):
        server = self.serve(answer(message("first")) + [CLOSE], answer(message("second")))
        client = self.client(server)
        self.assertEqual(client.chat(HI).content, "first")
        time.sleep(0.05)  # the server's FIN arrives while the connection is idle
        response = client.chat(HI)
        self.assertEqual((response.content, response.error), ("second", ""))
        self.assertEqual(server.connections, 2)

    def test_threads_share_one_client(self):
        def echo(request):
            return answer(message(request.json()["messages"][-1]["content"]))
        server = self.serve(echo)
        client = self.client(server)
        failures = []

        def work(number):
            for call in range(20):
                text = "%d-%d" % (number, call)
                reply = client.chat([{"role": "user", "content": text}])
                if reply.content != text:
                    failures.append((text, reply))
        threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        self.assertEqual(failures, [])
        self.assertEqual((len(server.requests), server.connections), (160, 8))

    def test_overlapping_calls_in_one_thread_use_separate_connections(self):
        server = self.serve(sse(delta("a"), delta("b", "stop")))
        client = self.client(server)
        stream = client.stream(HI)
        self.assertEqual(next(stream), "a")
        self.assertEqual(client.chat_stream(HI, Writes()).content, "ab")
        self.assertEqual(list(stream), ["b"])


class RetryTest(LoopbackCase):
    def test_retries_are_off_by_default(self):
        server = self.serve(answer({"error": "busy"}, 503))
        self.assertEqual(self.client(server).chat(HI).error, "HTTP 503: busy")
        self.assertEqual(len(server.requests), 1)

    def test_retryable_status_is_retried_honouring_retry_after(self):
        busy = answer({"error": "busy"}, 503, extra="Retry-After: 0")
        server = self.serve(busy, answer({"error": "slow down"}, 429, extra="Retry-After: 0"), answer(message("ok")))
        response = self.client(server, retries=2).chat(HI)
        self.assertEqual((response.content, len(server.requests)), ("ok", 3))

    def test_backoff_without_retry_after(self):
        server = self.serve(answer({"error": "busy"}, 502), answer(message("ok")))
        self.assertEqual(self.client(server, retries=1).chat(HI).content, "ok")

    def test_retries_run_out(self):
        server = self.serve(answer({"error": "busy"}, 503, extra="Retry-After: 0"))
        response = self.client(server, retries=2).chat(HI)
        self.assertEqual((response.error, len(server.requests)), ("HTTP 503: busy", 3))

    def test_a_retry_after_too_long_is_not_waited_for(self):
        server = self.serve(answer({"error": "quota"}, 429, extra="Retry-After: 86400"))
        response = self.client(server, retries=3).chat(HI)
        self.assertEqual(response.error, "HTTP 429: quota (the server asks to retry after 86400s)")
        self.assertEqual(len(server.requests), 1)

    def test_client_errors_are_not_retried(self):
        server = self.serve(answer({"error": "bad"}, 400))
        self.client(server, retries=3).chat(HI)
        self.assertEqual(len(server.requests), 1)

    def test_connection_failure_before_any_answer_is_retried(self):
        server = self.serve([RESET], answer(message("ok")))
        response = self.client(server, retries=1).chat(HI)
        self.assertEqual((response.content, server.connections), ("ok", 2))

    def test_never_retried_once_output_started(self):
        server = self.serve(sse(delta("started"), 0.05, RESET), sse(delta("again", "stop")))
        response = self.client(server, retries=3).chat_stream(HI, Writes())
        self.assertEqual((response.stop_reason, response.content, len(server.requests)), ("error", "started", 1))

    def test_retry_after_as_a_date(self):
        self.assertEqual(llm._retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), 0.0)
        self.assertEqual(llm._retry_after("2.5"), 2.5)
        self.assertIsNone(llm._retry_after("soon"))



# ---------------------------------------------------------------- TLS and proxies


class Proxy:
    """A loopback proxy: CONNECT tunnels and absolute-URL forwarding, all to one port."""

    def __init__(self, target_port):
        self.target_port, self.seen = target_port, []
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.url = "http://127.0.0.1:%d" % self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self):
        self.listener.close()

    def _accept(self):
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def _serve(self, sock):
        sock.settimeout(10)
        upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=10)
        reader = None
        try:
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
            threading.Thread(target=pipe, args=(upstream, sock), daemon=True).start()
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


def environment(**values):
    """Patch os.environ: the given values, and no proxy or llm.py settings besides."""
    names = [n for n in os.environ if n.lower().endswith("_proxy") or n in llm._ENVIRONMENT]
    patch = mock.patch.dict(os.environ, values)
    patch.start()
    for name in names:
        if name not in values:
            del os.environ[name]
    return patch


class TLSAndProxyTest(LoopbackCase):
    def env(self, **values):
        self.addCleanup(environment(**values).stop)

    def test_https_with_a_ca_file(self):
        server = self.serve(answer(message("secure")), tls=True)
        self.assertEqual(self.client(server, ca_file=CA_FILE).chat(HI).content, "secure")

    def test_https_verifies_certificates_by_default(self):
        server = self.serve(answer(message("secure")), tls=True)
        response = self.client(server).chat(HI)
        self.assertEqual(response.stop_reason, "error")
        self.assertIn("CERTIFICATE_VERIFY_FAILED", response.error)
        self.assertEqual(server.requests, [])

    def test_verify_may_name_the_ca_file(self):
        server = self.serve(answer(message("secure")), tls=True)
        self.assertEqual(self.client(server, verify=CA_FILE).chat(HI).content, "secure")

    def test_https_verification_can_be_turned_off(self):
        server = self.serve(sse(delta("ok", "stop")), tls=True)
        self.assertEqual(self.client(server, verify=False).chat_stream(HI, Writes()).content, "ok")

    def test_bad_ca_file_is_an_error(self):
        server = self.serve(answer(message("x")), tls=True)
        response = self.client(server, ca_file="/nonexistent/ca.pem").chat(HI)
        self.assertIn("cannot load ca_file", response.error)

    def test_http_through_a_proxy_with_credentials(self):
        server = self.serve(answer(message("proxied")))
        proxy = Proxy(server.port)
        self.addCleanup(proxy.close)
        self.env(HTTP_PROXY=proxy.url.replace("http://", "http://user:p%40ss@"))
        response = self.client("http://llm.test/v1").chat(HI)  # resolved by the proxy only
        self.assertEqual(response.content, "proxied")
        self.assertTrue(proxy.seen[0].startswith("POST http://llm.test:80/v1/chat/completions HTTP/1.1"))
        credentials = base64.b64encode(b"user:p@ss").decode()
        self.assertIn("Proxy-Authorization: Basic " + credentials, proxy.seen[0])

    def test_https_through_a_proxy_uses_connect(self):
        server = self.serve(sse(delta("tunnelled", "stop")), tls=True)
        proxy = Proxy(server.port)
        self.addCleanup(proxy.close)
        self.env(HTTPS_PROXY=proxy.url)
        client = self.client("https://llm.test/v1", ca_file=CA_FILE, api_key=KEY)
        self.assertEqual(client.chat_stream(HI, Writes()).content, "tunnelled")
        self.assertTrue(proxy.seen[0].startswith("CONNECT llm.test:443"))
        self.assertNotIn(KEY, proxy.seen[0])  # the key goes inside the tunnel only
        self.assertEqual(server.requests[0].headers["authorization"], "Bearer " + KEY)

    def test_loopback_never_goes_through_a_proxy(self):
        server = self.serve(answer(message("direct")))
        self.env(HTTP_PROXY="http://127.0.0.1:%d" % free_port(), ALL_PROXY="http://127.0.0.1:1")
        self.assertEqual(self.client(server).chat(HI).content, "direct")
        self.assertIsNone(llm._proxy_for("http", "localhost"))

    def test_no_proxy_is_honoured(self):
        self.env(HTTP_PROXY="http://proxy.example:3128", NO_PROXY="llm.test,.internal")
        self.assertIsNone(llm._proxy_for("http", "llm.test"))
        self.assertIsNone(llm._proxy_for("http", "api.internal"))
        self.assertEqual(llm._proxy_for("http", "other.test"), ("proxy.example", 3128, {}))
        self.assertIsNone(llm._proxy_for("https", "other.test"))

    def test_without_ssl_http_works_and_https_says_why_not(self):
        server = self.serve(answer(message("plain")))
        code = ("import sys; sys.modules['ssl'] = None; sys.path.insert(0, %r)\n"
                "import llm\n"
                "print(llm.Client(%r, api_key='').chat([{'role': 'user', 'content': 'x'}]).content)\n"
                "print(llm.Client('https://127.0.0.1:1', api_key='').chat([{'role': 'user', 'content': 'x'}]).error)\n"
                % (HERE, server.url))
        output = subprocess.check_output([sys.executable, "-c", code]).decode().splitlines()
        self.assertEqual(output[0], "plain")
        self.assertIn("ssl module", output[1])


# ---------------------------------------------------------------- configuration and arguments


class ConfigurationTest(LoopbackCase):
    def env(self, **values):
        self.addCleanup(environment(**values).stop)

    def test_base_url_forms(self):
        cases = [("", "/v1/chat/completions"), ("/", "/v1/chat/completions"),
                 ("/v1", "/v1/chat/completions"), ("/v1/", "/v1/chat/completions"),
                 ("/openai/v1", "/openai/v1/chat/completions"),
                 ("/v1beta/openai/", "/v1beta/openai/chat/completions"),
                 ("/api/v1/chat/completions", "/api/v1/chat/completions"),
                 ("/deploy/chat/completions?api-version=2024-06-01",
                  "/deploy/chat/completions?api-version=2024-06-01")]
        server = self.serve(answer(message("x")))
        for suffix, path in cases:
            with self.subTest(suffix=suffix):
                self.client(server.url + suffix).chat(HI)
                self.assertEqual(server.requests[-1].path, path)
        self.client(server.url.replace("http://", "")).chat(HI)  # no scheme: http
        self.assertEqual(server.requests[-1].path, "/v1/chat/completions")

    def test_environment_configures_the_module_level_functions(self):
        server = self.serve(answer(message("from env")), sse(delta("streamed", "stop")))
        self.env(LLM_BASE_URL=server.url + "/v1", LLM_MODEL="envmodel", LLM_API_KEY=KEY)
        self.assertEqual(llm.chat(HI).content, "from env")
        writes = []
        self.assertEqual(llm.chat_stream(HI, Writes(writes)).content, "streamed")
        self.assertEqual(writes, ["streamed"])
        request = server.requests[0]
        self.assertEqual((request.json()["model"], request.headers["authorization"]), ("envmodel", "Bearer " + KEY))
        self.assertEqual(server.connections, 1)  # the environment's client is reused

    def test_environment_precedence_and_defaults(self):
        self.env()
        self.assertEqual(llm.Client().base_url, "http://localhost:11434")
        self.env(OPENAI_BASE_URL="https://api.example/v1", OLLAMA_HOST="somewhere", OPENAI_API_KEY="k1")
        self.assertEqual((llm.Client().base_url, llm.Client()._api_key), ("https://api.example/v1", "k1"))
        self.env(LLM_BASE_URL="http://a:1", OPENAI_BASE_URL="http://b:2", LLM_API_KEY="k2", OPENAI_API_KEY="k1")
        self.assertEqual((llm.Client().base_url, llm.Client()._api_key), ("http://a:1", "k2"))
        self.assertEqual(llm.Client(api_key="")._api_key, "")  # "" means no key, whatever the environment
        self.assertEqual(llm.Client("http://c:3").base_url, "http://c:3")

    def test_ollama_host_lenient_forms(self):
        cases = [("gpu-box", "http://gpu-box:11434"), (":8080", "http://127.0.0.1:8080"),
                 ("gpu-box:9000", "http://gpu-box:9000"), ("https://ollama.example", "https://ollama.example:443"),
                 ("http://10.0.0.5:11434", "http://10.0.0.5:11434"), ("0.0.0.0", "http://0.0.0.0:11434"),
                 ("[::1]:11434", "http://[::1]:11434")]
        for value, expected in cases:
            with self.subTest(value=value):
                self.assertEqual(llm._base_url_from({"OLLAMA_HOST": value}), expected)

    def test_system_prompt_is_put_first_unless_there_is_one(self):
        server = self.serve(answer(message("x")))
        client = self.client(server, system="Be brief.")
        client.chat(HI)
        self.assertEqual(server.requests[0].json()["messages"],
                         [{"role": "system", "content": "Be brief."}] + HI)
        own = [{"role": "system", "content": "Mine."}] + HI
        client.chat(own)
        self.assertEqual(server.requests[1].json()["messages"], own)

    def test_params_default_and_per_call_and_none_leaves_out(self):
        server = self.serve(answer(message("x")))
        client = self.client(server, params={"temperature": 0.2, "seed": 1, "top_p": 0.9})
        client.chat(HI, temperature=0.7, top_p=None, stream=True, max_tokens=5,
                    response_format={"type": "json_object"}, stop=["\n"])
        body = server.requests[0].json()
        self.assertEqual((body["temperature"], body["seed"], body["max_tokens"], body["stop"]), (0.7, 1, 5, ["\n"]))
        self.assertEqual(body["response_format"], {"type": "json_object"})
        self.assertNotIn("top_p", body)
        self.assertIs(body["stream"], False)  # the library decides streaming

    def test_model_can_be_given_per_call(self):
        server = self.serve(answer(message("x")))
        self.client(server).chat(HI, model="other")
        self.assertEqual(server.requests[0].json()["model"], "other")

    def test_headers_user_agent_and_key(self):
        server = self.serve(answer(message("x")))
        self.client(server, api_key=KEY, headers={"X-Title": "demo"}).chat(HI)
        headers = server.requests[0].headers
        self.assertEqual((headers["x-title"], headers["authorization"]), ("demo", "Bearer " + KEY))
        self.assertTrue(headers["user-agent"].startswith("llm.py/"))
        self.assertEqual(headers["content-type"], "application/json")
        self.client(server).chat(HI)
        self.assertNotIn("authorization", server.requests[1].headers)

    def test_images_from_files_and_urls(self):
        server = self.serve(answer(message("a cat")))
        png = b"\x89PNG\r\n\x1a\n" + b"\0" * 20
        with tempfile.NamedTemporaryFile(suffix=".bin", delete=False) as f:
            f.write(png)
        self.addCleanup(os.unlink, f.name)
        content = [{"type": "text", "text": "What is it?"}, llm.image(f.name, detail="low"),
                   llm.image("https://example.com/cat.jpg")]
        self.assertEqual(self.client(server).chat([llm.Message("user", content)]).content, "a cat")
        sent = server.requests[0].json()["messages"][0]["content"]
        self.assertEqual(sent[1], {"type": "image_url", "image_url": {
            "url": "data:image/png;base64," + base64.b64encode(png).decode(), "detail": "low"}})
        self.assertEqual(sent[2]["image_url"]["url"], "https://example.com/cat.jpg")

    def test_an_image_that_cannot_be_read_is_an_error_before_sending(self):
        server = self.serve(answer(message("x")))
        for bad in ("/nonexistent/cat.png", __file__, None):
            with self.subTest(bad=bad):
                for content in ([llm.image(bad)], llm.image(bad)):
                    response = self.client(server).chat([llm.Message("user", content)])
                    self.assertEqual(response.stop_reason, "error")
                    self.assertIn("image", response.error)
        self.assertEqual(server.requests, [])


class NoExceptionTest(LoopbackCase):
    """Bad arguments are answered with an error response before any byte is sent."""

    def assert_refused(self, response, server, text=""):
        self.assertIsInstance(response, llm.Response)
        self.assertEqual((response.stop_reason, response.ok), ("error", False))
        self.assertTrue(response.error)
        self.assertIn(text, response.error)
        self.assertEqual(server.requests, [])

    def test_bad_messages(self):
        server = self.serve(answer(message("x")))
        client = self.client(server)
        for messages in (None, "Hi", 3, {"role": "user"}, [None], ["Hi"], [{}], [{"role": ""}],
                         [{"role": 5, "content": "x"}], [{"role": "user", "content": object()}],
                         [{"role": "user", "content": b"bytes"}], [{"role": "user", "content": float("nan")}]):
            with self.subTest(messages=messages):
                self.assert_refused(client.chat(messages), server)
                self.assert_refused(client.chat_stream(messages, Writes()), server)
                stream = client.stream(messages)
                self.assertEqual(list(stream), [])
                self.assert_refused(stream.response, server)

    def test_bad_params(self):
        server = self.serve(answer(message("x")))
        client = self.client(server)
        self.assert_refused(client.chat(HI, temperature=object()), server, "JSON")
        self.assert_refused(client.chat(HI, temperature=float("inf")), server, "JSON")

    def test_bad_client_arguments(self):
        server = self.serve(answer(message("x")))
        cases = [dict(base_url=5), dict(base_url="ftp://host"), dict(base_url="http://"),
                 dict(base_url="http://host:99999"), dict(base_url="http://a b"),
                 dict(timeout=0), dict(timeout=-1), dict(timeout="soon"), dict(timeout=(1,)),
                 dict(timeout=float("nan")), dict(deadline=0), dict(retries=-1), dict(retries=1.5),
                 dict(model=7), dict(system=3), dict(headers="x"), dict(headers={1: "x"}),
                 dict(headers={"X": 2}), dict(max_bytes="big"), dict(api_key=12),
                 dict(params="temperature=0"), dict(params=[("a", 1)])]
        for options in cases:
            with self.subTest(options=options):
                options.setdefault("base_url", server.url)
                client = llm.Client(**options)
                self.assert_refused(client.chat(HI), server)
                self.assert_refused(client.chat_stream(HI, Writes()), server)
                repr(client)

    def test_line_breaks_in_headers_key_or_model_are_refused(self):
        server = self.serve(answer(message("x")))
        for options in (dict(api_key="sk-abc\r\nX-Evil: 1"), dict(headers={"X-A": "1\r\nX-Evil: 1"}),
                        dict(headers={"X-A\nB": "1"}), dict(model="m\n"), dict(api_key="sk\0")):
            with self.subTest(options=options):
                response = llm.Client(server.url, **options).chat(HI)
                self.assert_refused(response, server, "line break")
                self.assertNotIn("sk-abc", response.error)
                self.assertNotIn("X-Evil", response.error)

    def test_out_without_write_is_an_error(self):
        server = self.serve(answer(message("x")))
        self.assert_refused(self.client(server).chat_stream(HI, object()), server, "write")
        self.assert_refused(self.client(server).chat_stream(HI, None), server, "write")

    def test_keyboard_interrupt_still_propagates(self):
        server = self.serve(sse(delta("a"), delta("b", "stop")))
        client = self.client(server)

        class Interrupting:
            def write(self, text):
                raise KeyboardInterrupt
        with self.assertRaises(KeyboardInterrupt):
            client.chat_stream(HI, Interrupting())
        self.assertEqual(client.chat_stream(HI, Writes()).content, "ab")  # the client still works

    @unittest.skipUnless(hasattr(signal, "SIGINT") and os.name == "posix", "POSIX signals")
    def test_a_call_interrupted_while_waiting_leaves_a_usable_client(self):
        server = self.serve([HANG], answer(message("after")))
        client = self.client(server)
        timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT))
        timer.start()
        with self.assertRaises(KeyboardInterrupt):
            client.chat(HI)  # blocked reading the answer when Ctrl-C comes
        timer.join()
        self.assertEqual(client.chat(HI).content, "after")  # not the half-used connection

    def test_lone_surrogates_are_sent_as_replacement_characters(self):
        server = self.serve(answer(message("x")))
        self.client(server).chat([{"role": "user", "content": "a\udce9b \U0001F600"}])
        self.assertEqual(server.requests[0].json()["messages"][0]["content"], "a\ufffdb \U0001F600")

    def test_the_key_never_appears_in_repr_or_errors(self):
        client = llm.Client("http://127.0.0.1:%d" % free_port(), api_key=KEY)
        response = client.chat(HI)
        for text in (repr(client), str(client), response.error, repr(response)):
            self.assertNotIn(KEY, text)
        self.assertIn("***", repr(client))


class ModelsTest(LoopbackCase):
    def test_lists_model_ids_in_openai_and_ollama_shapes(self):
        server = self.serve(answer({"object": "list", "data": [{"id": "llama3.2", "object": "model"}, {"id": "qwen"}]}),
                            answer({"models": [{"name": "mistral:7b"}]}))
        client = self.client(server, api_key=KEY)
        models = client.models()
        self.assertEqual((models, models.error, models.status), (["llama3.2", "qwen"], "", 200))
        self.assertEqual(client.models(), ["mistral:7b"])
        request = server.requests[0]
        self.assertEqual((request.method, request.path, request.body), ("GET", "/v1/models", b""))
        self.assertEqual(request.headers["authorization"], "Bearer " + KEY)
        self.assertEqual(server.connections, 1)

    def test_failures_give_an_empty_list_with_the_error(self):
        server = self.serve(answer({"error": "not here"}, 404))
        models = self.client(server).models()
        self.assertEqual((models, models.error, models.status), ([], "HTTP 404: not here", 404))
        refused = llm.Client("http://127.0.0.1:%d" % free_port()).models()
        self.assertEqual(refused, [])
        self.assertIn("connection refused", refused.error)


# ---------------------------------------------------------------- SSEWriter and Stream


class SSEWriterTest(LoopbackCase):
    def test_relays_each_delta_as_an_event_then_done(self):
        server = self.serve(sse(delta("Hel"), delta('lo "x"\n', "stop")))
        out = io.StringIO()
        response = self.client(server).chat_stream(HI, llm.SSEWriter(out))
        self.assertEqual(response.content, 'Hello "x"\n')
        self.assertEqual(out.getvalue(), 'data: {"content": "Hel"}\n\n'
                                         'data: {"content": "lo \\"x\\"\\n"}\n\n'
                                         'data: [DONE]\n\n')

    def test_relays_to_a_binary_stream_and_reports_errors(self):
        server = self.serve(sse(delta("a"), RESET))
        out = io.BytesIO()
        response = self.client(server).chat_stream(HI, llm.SSEWriter(out))
        lines = out.getvalue().decode().split("\n\n")
        self.assertEqual(lines[0], 'data: {"content": "a"}')
        self.assertEqual(json.loads(lines[1][6:]), {"error": response.error})
        self.assertEqual(lines[2:], ["data: [DONE]", ""])

    def test_a_writer_that_fails_ends_the_call_and_closes_the_connection(self):
        server = self.serve(sse(delta("one"), delta("two"), 0.05, delta("three"), delta("four", "stop")))
        client = self.client(server)
        writes = []
        response = client.chat_stream(HI, Writes(writes, fail_after=1))
        self.assertEqual(writes, ["one"])
        self.assertEqual(response.stop_reason, "error")
        self.assertTrue(response.error.startswith("writing the reply failed: BrokenPipeError"))
        self.assertEqual(response.content, "onetwo")  # everything received is kept
        self.assertEqual(client.chat_stream(HI, Writes()).content, "onetwothreefour")
        self.assertEqual(server.connections, 2)

    def test_sse_writer_whose_out_fails(self):
        server = self.serve(sse(delta("a"), delta("b", "stop")))
        out = Writes(fail_after=1)
        response = self.client(server).chat_stream(HI, llm.SSEWriter(out))
        self.assertEqual((response.stop_reason, response.content), ("error", "ab"))


class StreamTest(LoopbackCase):
    def test_iterates_pieces_then_has_the_response(self):
        server = self.serve(sse(delta("a"), delta("b", "length"), {"choices": [], "usage": {"total_tokens": 3}}))
        stream = self.client(server).stream(HI)
        self.assertEqual(list(stream), ["a", "b"])
        response = stream.response
        self.assertEqual((response.content, response.stop_reason, response.usage["total_tokens"]), ("ab", "length", 3))

    def test_response_reads_the_rest_first(self):
        server = self.serve(sse(delta("a"), delta("b", "stop")))
        stream = self.client(server).stream(HI)
        self.assertEqual(next(stream), "a")
        self.assertEqual(stream.response.content, "ab")

    def test_close_ends_early_as_cancelled(self):
        server = self.serve(sse(delta("a"), HANG))
        client = self.client(server)
        with client.stream(HI) as stream:
            self.assertEqual(next(stream), "a")
        self.assertEqual((stream.response.stop_reason, stream.response.content), ("cancelled", "a"))
        server.answers = [sse(delta("b", "stop"))]
        self.assertEqual(client.chat_stream(HI, Writes()).content, "b")

    def test_errors_end_the_iteration_quietly(self):
        server = self.serve(answer({"error": "nope"}, 500))
        stream = self.client(server).stream(HI)
        self.assertEqual(list(stream), [])
        self.assertEqual(stream.response.error, "HTTP 500: nope")


def free_port():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


if __name__ == "__main__":
    unittest.main()
