"""Replay tests: the bytes a real llama-server and a real vLLM sent, played back to llm.py.

``tests/testdata/llama_server/NAME.bin`` holds one answer exactly as llama.cpp's
``llama-server`` sent it (status line, headers, chunked framing and all;
``tests/testdata/vllm/`` the same from vLLM's OpenAI server), and
``NAME.txt`` the request and the socket reads it came in; ``tests/record.py``
makes both. Each test here serves a recording byte for byte from a loopback
server in a thread, cut into several chunkings, and checks what llm.py makes
of it against what the bytes say (read by the small reference reader below)
and against the tiny model's known answers.

No real server needed; standard library only; Python 3.6 and later::

    python -m unittest -v tests.test_recorded
"""

import ast
import io
import json
import os
import random
import socket
import sys
import threading
import time
import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as a file: this checkout's llm.py
    sys.path.insert(0, ROOT)

import llm

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "testdata", "llama_server")
VLLM = os.path.join(os.path.dirname(DATA), "vllm")
HELLO = "Hello from a tiny llama!"
TOKENS = ["Hello", " from", " a", " tiny", " llama", "!"]
ASK = [{"role": "user", "content": "Say hello."}]
STREAMS = ("stream_usage", "stream_no_usage", "stream_length", "stream_tool_call",
           "stream_json_schema", "stream_error_midway", "stream_random_text")
REPLIES = ("chat", "chat_length", "chat_tool_call")
ERRORS = ("error_context_stream", "error_context", "error_bad_json", "error_auth",
          "error_stream_options")
WAIT = 5.0  # no single step of a replay may take longer than this


# ---------------------------------------------------------------- the recordings


def recording(name, folder=DATA):
    """(the answer's bytes, the socket reads they arrived in)."""
    with open(os.path.join(folder, name + ".bin"), "rb") as f:
        data = f.read()
    reads = []
    with open(os.path.join(folder, name + ".txt"), encoding="utf-8") as f:
        for line in f:
            if line.startswith("recv +"):
                reads.append(ast.literal_eval(line.split(" ", 2)[2].strip()))
    return data, reads


def split_answer(data):
    """(head bytes, body bytes, chunk start offsets in data or None) of one HTTP answer."""
    head_end = data.index(b"\r\n\r\n") + 4
    head = data[:head_end]
    if b"transfer-encoding: chunked" not in head.lower():
        return head, data[head_end:], None
    body, starts, position = [], [], head_end
    while True:
        starts.append(position)
        line_end = data.index(b"\r\n", position)
        size = int(data[position:line_end].split(b";")[0], 16)
        if size == 0:
            return head, b"".join(body), starts
        body.append(data[line_end + 2:line_end + 2 + size])
        position = line_end + 2 + size + 2


def token_counts(usage):
    """The numbers of a usage object (nested ones too): what a Response keeps of it."""
    if not isinstance(usage, dict):
        return None
    numbers = {key: value for key, value in usage.items()
               if isinstance(value, (int, float)) and not isinstance(value, bool)}
    numbers.update((key, token_counts(value)) for key, value in usage.items()
                   if isinstance(value, dict) and token_counts(value))
    return numbers


class Expected:
    """What a recording says, read plainly: the reference the tests compare to."""

    def __init__(self, data):
        head, body, self.chunk_starts = split_answer(data)
        self.status = int(head.split(b" ", 2)[1])
        self.streamed = b"text/event-stream" in head.lower()
        self.keep_alive = b"connection: close" not in head.lower()
        self.content, self.finish, self.usage, self.error, self.done = "", None, None, "", False
        self.deltas, self.calls, self.reasoning = [], {}, ""
        if self.status != 200:
            answer = json.loads(body.decode("utf-8"))
            error = answer.get("error", answer.get("detail"))  # vLLM: "Unauthorized", FastAPI's detail
            error = error["message"] if isinstance(error, dict) else error
            self.error = " ".join(error.split())  # one line, as llm.py gives it
        elif self.streamed:
            for event in body.decode("utf-8").split("\n\n"):
                if not event.startswith("data: "):
                    continue
                if event == "data: [DONE]":
                    self.done = True
                    continue
                self.take(json.loads(event[len("data: "):]), "delta")
        else:
            self.take(json.loads(body.decode("utf-8")), "message")
        self.content = "".join(self.deltas)

    def take(self, chunk, key):
        if "error" in chunk:
            self.error = chunk["error"]["message"]
            return
        self.usage = token_counts(chunk.get("usage")) or self.usage
        for choice in chunk.get("choices") or []:
            if choice.get("index") not in (None, 0):
                continue  # n > 1: the response holds the first choice
            self.finish = choice.get("finish_reason") or self.finish
            part = choice.get(key) or {}
            if part.get("content"):
                self.deltas.append(part["content"])
            self.reasoning += part.get("reasoning_content") or part.get("reasoning") or ""
            for number, call in enumerate(part.get("tool_calls") or []):
                index = call.get("index", number)
                entry = self.calls.setdefault(index, {"id": "", "name": "", "arguments": ""})
                entry["id"] = entry["id"] or call.get("id", "")
                function = call.get("function") or {}
                entry["name"] = entry["name"] or function.get("name", "")
                entry["arguments"] += function.get("arguments") or ""


# ---------------------------------------------------------------- chunkings


def whole(data):
    return [data]


def every(size):
    def cut(data):
        return [data[i:i + size] for i in range(0, len(data), size)]
    cut.__name__ = "every_%d_bytes" % size
    return cut


def lines(data):
    """After every LF: each chunk-size line, SSE line and blank line alone."""
    pieces = data.split(b"\n")
    return [piece + b"\n" for piece in pieces[:-1]] + ([pieces[-1]] if pieces[-1] else [])


def mid_lines(data):
    """Every line cut in its middle (inside the JSON of each data line)."""
    pieces = []
    for line in lines(data):
        half = max(1, len(line) // 2)
        pieces.extend(filter(None, (line[:half], line[half:])))
    return pieces


def crlf_split(data):
    """Between every CR and its LF."""
    pieces = data.split(b"\r")
    return [pieces[0] + b"\r"] + [piece + b"\r" for piece in pieces[1:-1]] + [pieces[-1]]


def shuffled_sizes(data, seed=7):
    rng = random.Random(seed)
    pieces, position = [], 0
    while position < len(data):
        size = rng.randint(1, 97)
        pieces.append(data[position:position + size])
        position += size
    return pieces


# (chunking, pause between pieces): a pause makes each piece arrive on its own
CHUNKINGS = [
    (whole, 0.0),
    (every(1), 0.0),
    (every(7), 0.0),
    (every(1000), 0.0005),
    (lines, 0.0003),
    (mid_lines, 0.0003),
    (crlf_split, 0.0002),
    (shuffled_sizes, 0.0),
]


# ---------------------------------------------------------------- the loopback server


class Replay:
    """A server on 127.0.0.1 that answers each request with the next recorded answer.

    ``answers``: a list of (pieces, pause) or raw bytes, served in order, the
    last one again for any further request. After each answer the
    connection is closed unless ``keep_open``. ``requests`` keeps what came
    (head, body); ``connections`` counts the connections accepted.
    """

    def __init__(self, answers, keep_open=False):
        self.answers = [(answer, 0.0) if isinstance(answer, bytes) else answer
                        for answer in answers]
        self.keep_open = keep_open
        self.requests, self.connections, self.problems = [], 0, []
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.listener.settimeout(WAIT)
        self.port = self.listener.getsockname()[1]
        self.stopped = threading.Event()
        self.threads = []
        self.thread = threading.Thread(target=self.accept)
        self.thread.daemon = True
        self.thread.start()

    @property
    def url(self):
        return "http://127.0.0.1:%d" % self.port

    def accept(self):
        while not self.stopped.is_set():
            try:
                connection, _ = self.listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            if self.stopped.is_set():  # the wake-up call of close()
                connection.close()
                return
            self.connections += 1
            thread = threading.Thread(target=self.serve, args=(connection,))
            thread.daemon = True
            self.threads.append(thread)
            thread.start()

    def serve(self, connection):
        connection.settimeout(WAIT)
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buffer = b""
        try:
            for _ in range(16):  # requests on one connection
                request, buffer = self.read_request(connection, buffer)
                if request is None:
                    return
                number = len(self.requests)
                self.requests.append(request)
                pieces, pause = self.answers[min(number, len(self.answers) - 1)]
                if isinstance(pieces, bytes):
                    pieces = [pieces]
                for index, piece in enumerate(pieces):
                    if pause and index:
                        time.sleep(pause)
                    connection.sendall(piece)
                if not self.keep_open:
                    return
        except OSError as exc:  # the client went away: fine for some tests
            self.problems.append(repr(exc))
        finally:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            connection.close()

    @staticmethod
    def read_request(connection, buffer):
        while b"\r\n\r\n" not in buffer:
            data = connection.recv(65536)
            if not data:
                return None, b""
            buffer += data
        head, _, rest = buffer.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value.strip())
        while len(rest) < length:
            data = connection.recv(65536)
            if not data:
                return None, b""
            rest += data
        return (head.decode("latin-1"), rest[:length]), rest[length:]

    def close(self):
        self.stopped.set()
        try:  # wake the accept() that waits in the thread
            socket.create_connection(("127.0.0.1", self.port), timeout=WAIT).close()
        except OSError:
            pass
        self.thread.join(WAIT)
        self.listener.close()
        for thread in self.threads:
            thread.join(WAIT)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


class Writes:
    def __init__(self):
        self.pieces = []

    def write(self, text):
        self.pieces.append(text)


def client_for(server, **options):
    settings = {"model": "tiny", "timeout": (WAIT, WAIT), "deadline": 4 * WAIT}
    settings.update(options)
    return llm.Client(server.url, **settings)


def replay(answer, streamed=True, **options):
    """Serve ``answer`` once; return (response, pieces written, the Replay)."""
    with Replay([answer]) as server:
        out = Writes()
        client = client_for(server, **options)
        if streamed:
            response = client.chat_stream(ASK, out)
        else:
            response = client.chat(ASK)
        client.close()
    return response, out.pieces, server


# ---------------------------------------------------------------- the tests


class RecordingsTest(unittest.TestCase):

    def test_recordings_match_their_read_logs(self):
        for name in STREAMS + REPLIES + ERRORS + ("stream_n2",):
            data, reads = recording(name)
            self.assertTrue(data.startswith(b"HTTP/1.1 "), name)
            self.assertEqual(b"".join(reads), data, name)
            expected = Expected(data)  # the reference reader understands every one
            self.assertIn(expected.status, (200, 400, 401, 500), name)

    def test_reference_reader_sees_the_tiny_models_answers(self):
        self.assertEqual(Expected(recording("stream_usage")[0]).deltas, TOKENS)
        self.assertEqual(Expected(recording("chat")[0]).content, HELLO)
        call = Expected(recording("stream_tool_call")[0]).calls[0]
        self.assertEqual((call["name"], json.loads(call["arguments"])),
                         ("get_weather", {"city": HELLO}))


class StreamReplayTest(unittest.TestCase):
    """Streamed answers, each in every chunking."""

    def check_stream(self, name, chunkings=CHUNKINGS, folder=DATA):
        data, reads = recording(name, folder)
        expected = Expected(data)
        plans = [(reads, 0.001, "as recorded")] + [
            (cut(data), pause, cut.__name__) for cut, pause in chunkings]
        results = []
        for pieces, pause, label in plans:
            with self.subTest(recording=name, chunking=label):
                self.assertEqual(b"".join(pieces), data)
                response, written, server = replay((pieces, pause))
                self.assertEqual(response.content, expected.content, response)
                self.assertEqual("".join(written), response.content)
                if not expected.error:
                    self.assertEqual(response.error, "", response)
                    self.assertEqual(response.stop_reason, expected.finish, response)
                    self.assertEqual(response.usage, expected.usage)
                else:
                    self.assertEqual(response.stop_reason, "error", response)
                    self.assertEqual(response.error, expected.error)
                self.assertEqual(response.status, 200)
                self.assertEqual([(c.id, c.name, c.arguments) for c in response.tool_calls],
                                 [(c["id"], c["name"], c["arguments"])
                                  for _, c in sorted(expected.calls.items())])
                self.assertEqual(response.model, "tiny")
                self.assertEqual(response.reasoning, expected.reasoning)
                results.append(written)
        return expected, results

    def test_stream_with_usage(self):
        expected, results = self.check_stream("stream_usage")
        self.assertEqual(expected.content, HELLO)
        self.assertEqual(expected.finish, "stop")
        self.assertEqual(expected.usage["completion_tokens"], 7)
        self.assertEqual(results[0], TOKENS)  # as recorded: one write per token

    def test_stream_without_usage_has_no_usage(self):
        expected, _ = self.check_stream("stream_no_usage")
        self.assertIsNone(expected.usage)
        self.assertEqual(expected.content, HELLO)

    def test_stream_cut_by_max_tokens_is_length(self):
        expected, _ = self.check_stream("stream_length")
        self.assertEqual((expected.content, expected.finish), ("Hello from a", "length"))

    def test_stream_tool_call_assembled_from_fragments(self):
        expected, results = self.check_stream("stream_tool_call")
        self.assertEqual(expected.finish, "tool_calls")
        self.assertEqual(json.loads(expected.calls[0]["arguments"]), {"city": HELLO})
        self.assertEqual(results[0], [])  # a tool call writes no text

    def test_stream_json_schema_content_parses(self):
        expected, _ = self.check_stream("stream_json_schema", chunkings=CHUNKINGS[:3])
        self.assertEqual(json.loads(expected.content), {"greeting": HELLO, "count": 1})

    def test_stream_ended_by_in_band_error_keeps_partial_text(self):
        expected, _ = self.check_stream("stream_error_midway", chunkings=CHUNKINGS[:4])
        self.assertEqual(expected.error, "Context size has been exceeded.")
        self.assertTrue(expected.content.startswith(HELLO))
        self.assertFalse(expected.done)

    def test_stream_of_random_text_keeps_every_character(self):
        # the random-weights model: U+FFFD for its invalid UTF-8, control
        # characters and newlines, all inside JSON strings; multibyte
        # characters get split across reads by the small chunkings
        chunkings = [CHUNKINGS[i] for i in (0, 1, 2, 7)] + [(mid_lines, 0.0)]
        expected, _ = self.check_stream("stream_random_text", chunkings)
        self.assertIn("\ufffd", expected.content)
        self.assertIn("\n", expected.content)
        self.assertTrue(any(ord(c) < 32 and c != "\n" for c in expected.content))
        self.assertGreater(len(expected.deltas), 100)

    def test_stream_of_two_choices_keeps_the_first(self):
        # llama-server (like OpenAI) streams each choice of n > 1 in chunks of
        # their own, in either order; taking choices[0] of every chunk would
        # interleave both texts: "HelloHello from from a a ..."
        data, _ = recording("stream_n2")
        expected = Expected(data)
        self.assertEqual(expected.content, HELLO)
        response, written, _ = replay(data)
        self.assertEqual((response.content, "".join(written)), (HELLO, HELLO))

    def test_stream_iterator_and_sse_writer_on_recording(self):
        data, _ = recording("stream_usage")
        with Replay([data]) as server:
            client = client_for(server)
            stream = client.stream(ASK)
            self.assertEqual(list(stream), TOKENS)
            self.assertEqual(stream.response.stop_reason, "stop")
        with Replay([data]) as server:
            sink = io.BytesIO()
            response = client_for(server).chat_stream(ASK, llm.SSEWriter(sink))
        self.assertEqual(response.content, HELLO)
        events = sink.getvalue().decode("utf-8").split("\n\n")
        self.assertEqual([json.loads(e[6:])["content"] for e in events[:-2]], TOKENS)
        self.assertEqual(events[-2:], ["data: [DONE]", ""])

    def test_streamed_answer_to_a_non_streamed_call(self):
        response, _, _ = replay(recording("stream_usage")[0], streamed=False)
        self.assertEqual((response.content, response.stop_reason), (HELLO, "stop"))

    def test_request_asks_for_streamed_usage_as_recorded(self):
        data, _ = recording("stream_usage")
        _, _, server = replay(data)
        head, body = server.requests[0]
        sent = json.loads(body.decode("utf-8"))
        self.assertEqual(sent["stream"], True)
        self.assertEqual(sent["stream_options"], {"include_usage": True})
        self.assertIn("accept: text/event-stream", head.lower())


class CutShortTest(unittest.TestCase):
    """A recorded stream whose connection closes early: an error that keeps the text."""

    def test_stream_closed_after_each_whole_chunk_before_the_end(self):
        data, _ = recording("stream_usage")
        starts = Expected(data).chunk_starts
        for cut in starts[1:-1]:  # after 1..n-1 whole chunks; the last chunk is "0\r\n\r\n"
            with self.subTest(cut=cut):
                prefix = Expected(data[:cut] + b"0\r\n\r\n")
                response, written, _ = replay(data[:cut])
                self.assertEqual(response.stop_reason, "error", response)
                self.assertIn("cut short", response.error)
                self.assertEqual(response.content, prefix.content)
                self.assertEqual("".join(written), prefix.content)

    def test_stream_closed_inside_a_chunk(self):
        data, _ = recording("stream_tool_call")
        starts = Expected(data).chunk_starts
        for cut in (starts[1] + 20, starts[5] + 100, starts[-2] - 3):
            with self.subTest(cut=cut):
                response, written, _ = replay(data[:cut])
                self.assertEqual(response.stop_reason, "error", response)
                self.assertIn("cut short", response.error)
                self.assertEqual(written, [])
                self.assertLessEqual(len(response.tool_calls), 1)

    def test_stream_ending_cleanly_without_done_or_finish(self):
        data, _ = recording("stream_usage")
        starts = Expected(data).chunk_starts
        response, written, _ = replay(data[:starts[3]] + b"0\r\n\r\n")
        self.assertEqual(response.stop_reason, "error", response)
        self.assertEqual(response.error, "stream ended before [DONE]")
        self.assertEqual(response.content, "".join(written))
        self.assertTrue(response.content)


class ReplyReplayTest(unittest.TestCase):
    """Non-streamed answers (Content-Length bodies)."""

    def check_reply(self, name, folder=DATA):
        data, _ = recording(name, folder)
        expected = Expected(data)
        for cut, pause in CHUNKINGS[:5]:
            with self.subTest(recording=name, chunking=cut.__name__):
                response, _, _ = replay((cut(data), pause), streamed=False)
                self.assertEqual(response.error, "", response)
                self.assertEqual(response.content, expected.content)
                self.assertEqual(response.stop_reason, expected.finish)
                self.assertEqual(response.usage, expected.usage)
                self.assertEqual(response.status, 200)
                self.assertEqual(response.reasoning, expected.reasoning)
                self.assertEqual([(c.id, c.name, c.arguments) for c in response.tool_calls],
                                 [(c["id"], c["name"], c["arguments"])
                                  for _, c in sorted(expected.calls.items())])
        return expected, response

    def test_chat(self):
        expected, response = self.check_reply("chat")
        self.assertEqual((expected.content, expected.finish), (HELLO, "stop"))
        self.assertEqual(response.usage["completion_tokens"], 7)

    def test_chat_cut_by_max_tokens_is_length(self):
        expected, _ = self.check_reply("chat_length")
        self.assertEqual((expected.content, expected.finish), ("Hello from a", "length"))

    def test_chat_tool_call(self):
        expected, response = self.check_reply("chat_tool_call")
        self.assertEqual(expected.finish, "tool_calls")
        self.assertEqual(response.tool_calls[0].args, {"city": HELLO})
        message = response.to_message()
        self.assertIsNone(message["content"])  # llama-server sent "" next to the call
        self.assertEqual(message["tool_calls"][0]["function"]["name"], "get_weather")

    def test_chat_body_cut_short(self):
        data, _ = recording("chat")
        response, _, _ = replay(data[:-40], streamed=False)
        self.assertEqual(response.stop_reason, "error", response)
        self.assertEqual(response.content, "")


class ErrorReplayTest(unittest.TestCase):

    def check_error(self, name, streamed, folder=DATA, **options):
        data, _ = recording(name, folder)
        expected = Expected(data)
        for cut, pause in CHUNKINGS[:5]:
            with self.subTest(recording=name, chunking=cut.__name__):
                response, written, server = replay((cut(data), pause), streamed=streamed, **options)
                self.assertEqual(response.stop_reason, "error", response)
                self.assertEqual(response.status, expected.status)
                said = "HTTP %d: %s" % (expected.status, expected.error)
                if expected.status in (404, 405):  # these also name the request that was tried
                    said += " (POST %s/v1/chat/completions)" % server.url
                self.assertEqual(response.error, said)
                self.assertEqual((response.content, written), ("", []))
        return response

    def test_context_overflow_on_a_streamed_request(self):
        response = self.check_error("error_context_stream", streamed=True)
        self.assertIn("exceeds the available context size", response.error)

    def test_context_overflow(self):
        self.check_error("error_context", streamed=False)

    def test_malformed_request_json(self):
        response = self.check_error("error_bad_json", streamed=False)
        self.assertIn("parse error", response.error)

    def test_wrong_api_key_not_in_error(self):
        key = "sk-recorded-test-key-0123456789"
        response = self.check_error("error_auth", streamed=False, api_key=key)
        self.assertEqual(response.error, "HTTP 401: Invalid API Key")
        self.assertNotIn(key, repr(response))

    def test_wrong_api_key_on_a_streamed_request(self):
        response = self.check_error("error_auth", streamed=True, api_key="sk-another-key-42")
        self.assertNotIn("sk-another-key-42", response.error)


    def test_rejected_stream_options_of_the_caller_are_reported(self):
        data, _ = recording("error_stream_options")
        with Replay([data]) as server:
            client = client_for(server)
            response = client.chat_stream(ASK, Writes(), stream_options={"include_usage": "yes"})
        self.assertEqual(response.status, 400)
        self.assertIn("include_usage", response.error)

    def test_rejected_stream_options_of_the_caller_are_not_resent_without(self):
        # The 400 names include_usage, as a server that rejects the stream_options
        # the library adds would; but these are the caller's own: no resend
        # without them, and usage is still asked for on the next call.
        data, _ = recording("error_stream_options")
        usage, _ = recording("stream_usage")
        with Replay([data, usage]) as server:
            client = client_for(server)
            client.chat_stream(ASK, Writes(), stream_options={"include_usage": "yes"})
            later = client.chat_stream(ASK, Writes())
        sent = [json.loads(body.decode("utf-8")) for _, body in server.requests]
        self.assertEqual([body.get("stream_options") for body in sent],
                         [{"include_usage": "yes"}, {"include_usage": True}])
        self.assertIsNotNone(later.usage)


class ConnectionReuseTest(unittest.TestCase):
    """What the recorded headers say about the connection, llm.py follows."""

    def calls_on_one_client(self, names, streamed):
        answers = [recording(name)[0] for name in names]
        with Replay(answers, keep_open=True) as server:
            client = client_for(server)
            responses = []
            for _ in names:
                out = Writes()
                responses.append(client.chat_stream(ASK, out) if streamed else client.chat(ASK))
            client.close()
        return responses, server

    def test_streamed_keep_alive_answers_reuse_one_connection(self):
        responses, server = self.calls_on_one_client(
            ["stream_usage", "stream_tool_call", "stream_length"], streamed=True)
        self.assertEqual([r.stop_reason for r in responses], ["stop", "tool_calls", "length"])
        self.assertEqual(server.connections, 1)

    def test_json_keep_alive_answers_reuse_one_connection(self):
        responses, server = self.calls_on_one_client(["chat", "chat_tool_call"], streamed=False)
        self.assertEqual([r.stop_reason for r in responses], ["stop", "tool_calls"])
        self.assertEqual(server.connections, 1)

    def test_error_with_connection_close_opens_a_new_connection(self):
        # llama-server answers errors with "Connection: close" and closes
        responses, server = self.calls_on_one_client(["error_context", "chat"], streamed=False)
        self.assertEqual([r.stop_reason for r in responses], ["error", "stop"])
        self.assertEqual(server.connections, 2)

    def test_in_band_error_does_not_break_the_next_call(self):
        responses, server = self.calls_on_one_client(
            ["stream_error_midway", "stream_usage"], streamed=True)
        self.assertEqual([r.stop_reason for r in responses], ["error", "stop"])
        self.assertEqual(responses[1].content, HELLO)


# ---------------------------------------------------------------- vLLM's answers


VLLM_STREAMS = ("stream_usage", "stream_no_usage", "stream_length", "stream_tool_call",
                "stream_json_schema", "stream_include_usage_yes", "stream_n2", "stream_reasoning")
VLLM_REPLIES = ("chat", "chat_length", "chat_tool_call", "chat_reasoning")
VLLM_ERRORS = ("error_context_stream", "error_context", "error_bad_json", "error_auth",
               "error_unknown_model", "error_unknown_path")


def vllm_payloads(name):
    """The JSON events of a recorded vLLM stream, in order."""
    _, body, _ = split_answer(recording(name, VLLM)[0])
    return [json.loads(event[len("data: "):]) for event in body.decode("utf-8").split("\n\n")
            if event.startswith("data: {")]


class VLLMReplayTest(unittest.TestCase):
    """vLLM 0.32 (CPU build) serving the same tiny model: where its shapes differ."""

    check_stream = StreamReplayTest.check_stream
    check_reply = ReplyReplayTest.check_reply
    check_error = ErrorReplayTest.check_error

    def test_recordings_match_their_read_logs(self):
        for name in VLLM_STREAMS + VLLM_REPLIES + VLLM_ERRORS:
            data, reads = recording(name, VLLM)
            self.assertIn(b"\r\nserver: uvicorn\r\n", data, name)
            self.assertEqual(b"".join(reads), data, name)
            Expected(data)

    def test_empty_string_first_delta_writes_nothing(self):
        first = vllm_payloads("stream_usage")[0]["choices"][0]["delta"]
        self.assertEqual(first, {"role": "assistant", "content": ""})
        expected, results = self.check_stream("stream_usage", folder=VLLM)
        self.assertEqual((expected.content, expected.finish), (HELLO, "stop"))
        self.assertEqual(results[0], TOKENS)  # no "" write for the first delta
        self.assertEqual(expected.usage["completion_tokens"], 7)

    def test_stream_without_usage_has_no_usage(self):
        expected, _ = self.check_stream("stream_no_usage", folder=VLLM)
        self.assertIsNone(expected.usage)

    def test_finish_reason_on_the_last_content_chunk(self):
        last = [p for p in vllm_payloads("stream_length") if p["choices"]][-1]["choices"][0]
        self.assertEqual((last["delta"], last["finish_reason"]), ({"content": " a"}, "length"))
        expected, results = self.check_stream("stream_length", folder=VLLM)
        self.assertEqual((expected.content, expected.finish), ("Hello from a", "length"))
        self.assertEqual(results[0], ["Hello", " from", " a"])

    def test_two_tool_call_entries_with_one_index_in_one_delta(self):
        calls = [p["choices"][0]["delta"].get("tool_calls") for p in vllm_payloads("stream_tool_call")
                 if p["choices"]]
        first = [c for c in calls if c][0]
        self.assertEqual([entry["index"] for entry in first], [0, 0])
        self.assertEqual(first[0]["function"], {"name": "get_weather"})
        self.assertEqual(first[1]["function"], {"arguments": '{"city": "'})
        expected, results = self.check_stream("stream_tool_call", folder=VLLM)
        self.assertEqual(expected.finish, "tool_calls")
        self.assertEqual(results[0], [])
        for chunking in (whole, every(1), lines):
            response, _, _ = replay(recording("stream_tool_call", VLLM)[0] if chunking is whole
                                    else (chunking(recording("stream_tool_call", VLLM)[0]), 0.0))
            self.assertEqual(len(response.tool_calls), 1, response.tool_calls)
            call = response.tool_calls[0]
            self.assertTrue(call.id.startswith("chatcmpl-tool-"), call.id)
            self.assertEqual(call.name, "get_weather")
            # re-serialized by vLLM's tool parser: a space after the colon, kept as sent
            self.assertEqual(call.arguments, '{"city": "Hello from a tiny llama!"}')
            self.assertEqual(call.args, {"city": HELLO})

    def test_chat_tool_call_arguments_re_serialized(self):
        expected, response = self.check_reply("chat_tool_call", folder=VLLM)
        self.assertEqual(expected.finish, "tool_calls")
        self.assertEqual(response.tool_calls[0].arguments, json.dumps({"city": HELLO}))
        message = response.to_message()
        self.assertIsNone(message["content"])
        self.assertEqual(message["tool_calls"][0]["function"]["arguments"],
                         json.dumps({"city": HELLO}))

    def test_chat_and_length(self):
        expected, response = self.check_reply("chat", folder=VLLM)
        self.assertEqual((expected.content, response.usage["completion_tokens"]), (HELLO, 7))
        expected, _ = self.check_reply("chat_length", folder=VLLM)
        self.assertEqual((expected.content, expected.finish), ("Hello from a", "length"))

    def test_stream_json_schema(self):
        expected, _ = self.check_stream("stream_json_schema", chunkings=CHUNKINGS[:3], folder=VLLM)
        self.assertEqual(json.loads(expected.content), {"greeting": HELLO, "count": 1})

    def test_include_usage_yes_is_a_normal_stream(self):
        expected, _ = self.check_stream("stream_include_usage_yes", CHUNKINGS[:3], folder=VLLM)
        self.assertEqual(expected.usage["completion_tokens"], 7)

    def test_interleaved_two_choices_keep_the_first(self):
        indexes = [p["choices"][0]["index"] for p in vllm_payloads("stream_n2") if p["choices"]]
        self.assertIn([0, 1, 0], [indexes[i:i + 3] for i in range(len(indexes) - 2)])
        response, written, _ = replay(recording("stream_n2", VLLM)[0])
        self.assertEqual((response.content, "".join(written)), (HELLO, HELLO))
        self.assertEqual(response.stop_reason, "stop")

    def test_reasoning_field_is_kept_as_reasoning(self):
        # --reasoning-parser deepseek_r1 with no </think>: all text is reasoning,
        # under the field name "reasoning", and content stays null
        deltas = [p["choices"][0]["delta"] for p in vllm_payloads("stream_reasoning") if p["choices"]]
        self.assertTrue(any("reasoning" in d for d in deltas), deltas)
        self.assertFalse(any("reasoning_content" in d for d in deltas), deltas)
        expected, results = self.check_stream("stream_reasoning", CHUNKINGS[:4], folder=VLLM)
        self.assertEqual((expected.reasoning, expected.content), (HELLO, ""))
        self.assertEqual(results[0], [])
        response, _, _ = replay(recording("stream_reasoning", VLLM)[0])
        message = response.to_message()
        self.assertEqual(message.get("reasoning"), HELLO)
        self.assertNotIn("reasoning_content", message)
        expected, response = self.check_reply("chat_reasoning", folder=VLLM)
        self.assertEqual((response.reasoning, response.content), (HELLO, ""))
        self.assertEqual(response.to_message().get("reasoning"), HELLO)

    def test_context_overflow_is_a_400_json_answer_even_for_a_stream(self):
        response = self.check_error("error_context_stream", streamed=True, folder=VLLM)
        self.assertIn("maximum context length is 4096 tokens", response.error)
        self.check_error("error_context", streamed=False, folder=VLLM)

    def test_malformed_request_json_gives_one_line(self):
        response = self.check_error("error_bad_json", streamed=False, folder=VLLM)
        self.assertIn("JSON decode error", response.error)
        self.assertNotIn("\n", response.error)

    def test_unauthorized_as_a_string(self):
        key = "sk-recorded-test-key-0123456789"
        for streamed in (False, True):
            response = self.check_error("error_auth", streamed=streamed, folder=VLLM, api_key=key)
            self.assertEqual(response.error, "HTTP 401: Unauthorized")
            self.assertNotIn(key, repr(response))

    def test_unknown_model_is_404_with_the_message(self):
        response = self.check_error("error_unknown_model", streamed=False, folder=VLLM)
        self.assertIn("does not exist. Valid aliases: tiny.", response.error)

    def test_fastapi_detail_body(self):
        response = self.check_error("error_unknown_path", streamed=True, folder=VLLM)
        self.assertTrue(response.error.startswith("HTTP 404: Not Found (POST http://"), response.error)
        with Replay([recording("error_unknown_path", VLLM)[0]]) as server:
            found = client_for(server).models()
        self.assertEqual((list(found), found.error, found.status),
                         ([], "HTTP 404: Not Found (GET %s/v1/models)" % server.url, 404))

    def test_keep_alive_answers_reuse_one_connection(self):
        # uvicorn sends no Keep-Alive header; HTTP/1.1 keeps the connection open
        answers = [recording(name, VLLM)[0] for name in ("stream_usage", "stream_tool_call",
                                                          "stream_length")]
        with Replay(answers, keep_open=True) as server:
            client = client_for(server)
            responses = [client.chat_stream(ASK, Writes()) for _ in answers]
            client.close()
        self.assertEqual([r.stop_reason for r in responses], ["stop", "tool_calls", "length"])
        self.assertEqual(server.connections, 1)


if __name__ == "__main__":
    unittest.main()


# ---------------------------------------------------------------- what the client tells of them


def recorded_request(name, folder):
    """The JSON body of the request a recording answered (ASK for one that is no JSON)."""
    with open(os.path.join(folder, name + ".txt"), encoding="utf-8") as f:
        lines = [line[4:] for line in f if line.startswith("#   {")]
    try:
        return json.loads(lines[-1])
    except ValueError:  # the malformed requests of error_bad_json
        return {"messages": ASK}


class ToldTest(unittest.TestCase):
    """Warnings, error kinds and server timings, from what the real servers sent."""

    def recordings(self):
        for folder in (DATA, VLLM):
            for name in sorted(os.listdir(folder)):
                if name.endswith(".bin"):
                    yield folder, name[:-4]

    def test_no_recorded_reply_gets_a_warning(self):
        # none of these replies is wrong in a way the client could tell: a warning on any of
        # them would be one the reply does not deserve
        for folder, name in self.recordings():
            request = recorded_request(name, folder)
            data, _ = recording(name, folder)
            params = {key: value for key, value in request.items()
                      if key not in ("model", "messages", "stream", "stream_options")}
            with self.subTest(recording=os.path.basename(folder) + "/" + name), Replay([data]) as server:
                client = client_for(server)
                call = client.chat_stream if request.get("stream") else lambda m, **p: client.chat(m, **p)
                response = call(request["messages"], Writes(), **params) if request.get("stream") \
                    else call(request["messages"], **params)
                client.close()
                self.assertEqual(response.warnings, [])

    def test_a_context_overflow_is_its_kind_with_the_servers_numbers(self):
        for folder, name, numbers in ((DATA, "error_context", {"prompt_tokens": 42059, "context_length": 4096}),
                                      (DATA, "error_context_stream", None),
                                      # "at least 4097 input tokens": a bound, not the prompt's size
                                      (VLLM, "error_context", {"context_length": 4096})):
            data, _ = recording(name, folder)
            with self.subTest(recording=os.path.basename(folder) + "/" + name):
                response, _, _ = replay(data, streamed="stream" in name)
                self.assertEqual(response.error_kind, "context_overflow", response)
                if numbers:
                    self.assertEqual(response.overflow, numbers)
                else:  # what the bytes say, read by hand
                    said = [int(word) for word in response.error.replace("(", " ").split() if word.isdigit()]
                    self.assertEqual(sorted(response.overflow.values()), sorted(said[:2]), response.error)

    def test_the_other_recorded_errors_and_their_kinds(self):
        kinds = {(DATA, "error_auth"): "auth", (DATA, "error_bad_json"): "server",
                 (VLLM, "error_auth"): "auth", (VLLM, "error_bad_json"): "bad_request",
                 (VLLM, "error_unknown_model"): "not_found", (VLLM, "error_unknown_path"): "not_found"}
        for (folder, name), kind in kinds.items():
            data, _ = recording(name, folder)
            with self.subTest(recording=os.path.basename(folder) + "/" + name):
                response, _, _ = replay(data, streamed=False)
                self.assertEqual((response.stop_reason, response.error_kind), ("error", kind))

    def test_llama_servers_timings_are_kept_as_numbers(self):
        for name, streamed in (("chat", False), ("chat_length", False), ("stream_usage", True),
                               ("stream_no_usage", True)):
            data, _ = recording(name)
            with self.subTest(recording=name):
                response, _, _ = replay(data, streamed=streamed)
                body = split_answer(data)[1].decode("utf-8")
                sent = [json.loads(event[6:]) for event in body.split("\n\n")
                        if event.startswith("data: {")] if streamed else [json.loads(body)]
                timings = [chunk["timings"] for chunk in sent if "timings" in chunk][-1]
                self.assertEqual(response.timings, timings)
                self.assertEqual(set(timings) >= {"prompt_n", "prompt_per_second", "predicted_per_second",
                                                  "cache_n"}, True)
