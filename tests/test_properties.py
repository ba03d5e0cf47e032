"""Properties of llm.py that no single example pins, each pinned by its own tests.

    python -m unittest tests.test_properties                          # the short run
    LLM_FUZZ_EXAMPLES=500 python -m unittest tests.test_properties    # more examples a property

Each property is pinned by a deterministic test that needs nothing beyond the
standard library and, where it speaks of a space of inputs, also by a
hypothesis test that draws from that space (skipped without hypothesis;
``LLM_FUZZ_EXAMPLES`` as in tests/test_hostile.py):

1. a cancel or a passed deadline is final: no text after it, even when the
   rest of the reply, ``[DONE]`` included, is already in the client's buffer;
2. the SSE decoder's events do not depend on where the reads split, in every
   framing;
3. every Response has every documented field, with its default, however it
   was made;
4. ``to_message()`` keeps the text;
5. nothing raises over a client's lifetime;

and two bounds: the pauses before retries, and how many entries of an error
list the message names.

Every HTTP exchange is real, with a loopback server from tests/loopback.py
that sends the exact bytes given; threads are ordered with events, and no test
asserts a wall-clock time.
"""

import contextlib
import http.client
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import threading
import traceback
import unittest
from unittest import mock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as a file: this checkout's llm.py and tests
    sys.path.insert(0, ROOT)

import llm
from tests.loopback import (CLOSE, END, HANG, HI, RESET, LoopbackCase, Server, Writes, answer,
                            chunk, delta, free_port, fuzz, head, in_thread, message, sse)
from tests.test_cli import environment as cli_environment, read_until

try:
    import hypothesis
    from hypothesis import given
    from hypothesis import strategies as st
except ImportError:  # the property tests are skipped
    hypothesis = None

WAIT = 20  # seconds: the longest any one wait may take before the test fails
DONE = b"data: [DONE]\n\n"


def event(obj):
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode("utf-8") + b"\n\n"


def say(text):
    return [{"role": "user", "content": text}]


def at_once(steps):
    """An answer's bytes in one send (a server's small sends one by one can wait on delayed ACKs)."""
    return [b"".join(steps)]


class SharedServerCase(LoopbackCase):
    """One loopback server for the whole class, its answer set by each example."""

    @classmethod
    def setUpClass(cls):
        cls.server = Server(answer(message("ok")))

    @classmethod
    def tearDownClass(cls):
        cls.server.close()

    def answer_with(self, *answers):
        with self.server.lock:
            self.server.answers = list(answers)
            del self.server.requests[:]

    def fresh_client(self, **options):
        options.setdefault("model", "m")
        options.setdefault("timeout", 5)
        options.setdefault("api_key", "")
        return llm.Client(self.server.url, **options)


# ---------------------------------------------------------------- 1. cancel and deadline are final


PIECES = ["Once", " upon", " a time"]


def reply_events(pieces):
    """The events of a streamed reply of these pieces, [DONE] included."""
    return ([event(delta(piece)) for piece in pieces[:-1]]
            + [event(delta(pieces[-1], "stop")), DONE])


def sent_at_once(events, groups=None):
    """An answer sent in ONE send: its head and every HTTP chunk (a list of events each).

    The client's first read of the socket takes it all into its buffer; each
    later read of the body is served from there. ``groups=None``: a body with
    a Content-Length instead, which one read takes whole.
    """
    if groups is None:
        body = b"".join(events)
        return [head(chunked=False, length=len(body)) + body]
    return [head() + b"".join(chunk(b"".join(group)) for group in groups) + END]


def framings(events):
    """The same events framed each way that leaves the rest of the reply in the buffer."""
    return {
        "each event its own chunk": sent_at_once(events, [[one] for one in events]),
        "the first event, then the rest in one chunk": sent_at_once(events, [events[:1], events[1:]]),
        "every event in one chunk": sent_at_once(events, [events]),
        "one body with a Content-Length": sent_at_once(events),
    }


class HangUpServer(Server):
    """A Server that says when the client's end of a connection is gone (shut down or closed)."""

    def __init__(self, *answers):
        self.hung_up = threading.Event()
        Server.__init__(self, *answers)

    def serve(self, sock, number):
        try:
            Server.serve(self, sock, number)  # returns when the client's end reads as closed
        finally:
            self.hung_up.set()


class CancelIsFinalTest(LoopbackCase):
    """After cancel() or a passed deadline a call yields no more text and ends so."""

    def assert_cancelled(self, response, pieces):
        self.assertEqual((response.stop_reason, response.error, response.content),
                         ("cancelled", "", "".join(pieces)))

    def test_a_stream_yields_nothing_after_cancel_even_with_the_rest_in_its_buffer(self):
        for name, steps in framings(reply_events(PIECES)).items():
            server = self.serve(steps)
            for count in range(1, len(PIECES) + 1):
                with self.subTest(framing=name, cancelled_after=count):
                    client = self.client(server)
                    stream = client.stream(HI)
                    got = [next(stream) for _ in range(count)]
                    client.cancel()
                    self.assertEqual(list(stream), [])
                    self.assertEqual(got, PIECES[:count])
                    self.assert_cancelled(stream.response, got)

    def test_chat_stream_writes_nothing_after_its_writer_cancels(self):
        for name, steps in framings(reply_events(PIECES)).items():
            server = self.serve(steps)
            for count in range(1, len(PIECES) + 1):
                with self.subTest(framing=name, cancelled_after=count):
                    client = self.client(server)
                    writes = []
                    out = Writes(writes, on_write=lambda text: (
                        len(writes) == count and client.cancel()))
                    response = client.chat_stream(HI, out)
                    self.assertEqual(writes, PIECES[:count])
                    self.assert_cancelled(response, writes)

    def test_a_cancel_from_the_reasoning_writer_ends_the_call_before_the_next_text(self):
        thinking = event({"choices": [{"index": 0, "delta": {"reasoning_content": "Hmm."}}]})
        events = [thinking] + reply_events(PIECES)
        for name, steps in framings(events).items():
            with self.subTest(framing=name):
                client = self.client(self.serve(steps))
                out = Writes()
                out.write_reasoning = lambda text: client.cancel()
                response = client.chat_stream(HI, out)
                self.assertEqual(out.writes, [])
                self.assert_cancelled(response, [])
                self.assertEqual(response.reasoning, "Hmm.")

    def test_a_deadline_that_passes_while_text_is_buffered_ends_the_call(self):
        # Each call waits in its first write, or after its first piece, until its server sees
        # the connection end: the deadline's timer shuts the socket down when the deadline
        # passes. The rest of the reply is in the client's buffer by then.
        calls = []
        for name, steps in framings(reply_events(PIECES)).items():
            for way in ("chat_stream", "stream"):
                server = HangUpServer(steps)
                self.addCleanup(server.close)
                client = self.client(server, deadline=1)
                calls.append(((name, way), server) + in_thread(self.after_first_piece, client, way,
                                                               server.hung_up))
        for (name, way), server, thread, results in calls:
            with self.subTest(framing=name, way=way):
                thread.join(WAIT)
                self.assertFalse(thread.is_alive())
                self.assertTrue(server.hung_up.is_set())
                pieces, response = results[0]
                self.assertEqual(pieces, PIECES[:1])
                self.assertEqual((response.stop_reason, response.error, response.content),
                                 ("error", "deadline of 1s exceeded", PIECES[0]))

    @staticmethod
    def after_first_piece(client, way, passed):
        """The pieces a call gives, and its response, when it waits after the first piece."""
        if way == "stream":
            stream = client.stream(HI)
            pieces = [next(stream)]
            passed.wait(WAIT)
            return pieces + list(stream), stream.response
        writes = []
        response = client.chat_stream(HI, Writes(writes, on_write=lambda text: passed.wait(WAIT)))
        return writes, response


# ---------------------------------------------------------------- 2. the decoder, cut anywhere


def decoded(body, cuts=()):
    """The events of body fed to a decoder in reads cut at the given offsets (none empty)."""
    decoder = llm._SSEDecoder()
    events, start = [], 0
    for cut in sorted(set(cuts)) + [len(body)]:
        if start < cut <= len(body):  # the client never feeds an empty read
            events += decoder.feed(body[start:cut])
            start = cut
    return events + decoder.close()


# the line ends: (within an event, after its last line and its blank line)
LINE_ENDS = (("LF", b"\n", b"\n"), ("CR", b"\r", b"\r"), ("CRLF", b"\r\n", b"\r\n"),
             ("CR within an event, LF after it", b"\r", b"\n"))
# the data lines of one JSON value: (on several lines, with brackets inside its strings) -> lines;
# the strings' brackets do not balance, one string ends in an escaped backslash, one holds an
# escaped quote, one value is an array, and an array opens on one line and closes on the next
DATA_LINES = {
    (False, False): ['{"c": "caf\u00e9"}'],
    (False, True): ['{"c": "}]\\"{[", "d": ["]"]}'],
    (True, False): ['{"c": ["caf\u00e9",', '1], "d":', '{}}'],
    (True, True): ['["}]\\\\", {"c":', '"[[\\"", "d": ["{"]}]'],
}


def sse_body(ends, space, blank, lines, short=False):
    """An event stream: a comment, an event of these data lines, the same again as an
    ``event: delta`` (unless short), a keep-alive comment, then [DONE]. ``blank``: each
    event ends with a blank line, else with its last line's end alone."""
    within, after = ends
    prefix = b"data: " if space else b"data:"
    out = []

    def put(*lines_of_an_event):
        out.extend(line + within for line in lines_of_an_event[:-1])
        out.append(lines_of_an_event[-1] + after)
        if blank:
            out.append(after)

    put(b":")
    put(*[prefix + line.encode("utf-8") for line in lines])
    if not short:
        put(b"event: delta", *[prefix + line.encode("utf-8") for line in lines])
    put(b": keep-alive")
    put(prefix + b"[DONE]")
    return b"".join(out)


def every_framing(data=DATA_LINES):
    """(name, line ends, space after data:, blank line after each event, data lines) of each body."""
    for (end_name, within, after), space, (multi, bracket), blank in itertools.product(
            LINE_ENDS, (True, False), sorted(data), (True, False)):
        name = "%s, %s, %s, %s, events ended by %s" % (
            end_name, "data: " if space else "data:", "multi-line" if multi else "one line",
            "brackets in strings" if bracket else "plain strings",
            "a blank line" if blank else "one line end")
        yield name, (within, after), space, blank, data[multi, bracket]


def cut_anywhere(body):
    """Where a body is cut: at every offset, and in reads of 1, 2, 3 and 7 bytes."""
    for cut in range(1, len(body)):
        yield "cut at %d" % cut, [cut]
    for size in (1, 2, 3, 7):
        yield "reads of %d bytes" % size, range(size, len(body), size)


def cut_twice_anywhere(body):
    """Where a short body is cut: at every pair of offsets."""
    for first in range(1, len(body)):
        for second in range(first + 1, len(body)):
            yield "cut at %d and %d" % (first, second), [first, second]


class DecoderCutTest(unittest.TestCase):
    """The decoder gives the events a body carries, wherever the reads split it."""

    def assert_events(self, body, expected, cuts):
        self.assertEqual(decoded(body), expected, "not cut")
        for where, offsets in cuts(body):
            self.assertEqual(decoded(body, offsets), expected, where)

    def test_every_framing_gives_its_events_cut_at_every_offset(self):
        for name, ends, space, blank, lines in every_framing():
            value = json.loads("\n".join(lines))
            with self.subTest(framing=name):
                self.assert_events(sse_body(ends, space, blank, lines),
                                   [("message", value), ("delta", value), ("message", llm._DONE)],
                                   cut_anywhere)

    def test_short_bodies_give_their_events_cut_at_every_pair_of_offsets(self):
        # the one-line plain value and the multi-line one with brackets in strings: the others
        # mix what these two have
        data = {key: DATA_LINES[key] for key in ((False, False), (True, True))}
        for name, ends, space, blank, lines in every_framing(data):
            value = json.loads("\n".join(lines))
            with self.subTest(framing=name):
                self.assert_events(sse_body(ends, space, blank, lines, short=True),
                                   [("message", value), ("message", llm._DONE)], cut_twice_anywhere)

    def test_a_bom_is_dropped_at_the_start_of_the_stream_only(self):
        bom = b"\xef\xbb\xbf"
        rest = b'data: {"a": 1}\n\n' + bom + b'data: {"b": 2}\n\ndata: [DONE]\n\n'
        for body in (rest, bom + rest):
            with self.subTest(body=body):
                self.assert_events(body, [("message", {"a": 1}), ("message", llm._DONE)],
                                   cut_twice_anywhere)


# ---------------------------------------------------------------- 3. every field, however made


DEFAULTS = {"content": "", "role": "assistant", "stop_reason": "stop", "error": "", "status": 0,
            "usage": None, "tool_calls": [], "reasoning": "", "refusal": "", "model": "", "id": "",
            "logprobs": None, "first_token_seconds": None, "total_seconds": 0.0, "timings": None,
            "warnings": [], "error_kind": "", "overflow": None}
MEASURED = object()  # a duration the call measured: a float >= 0


def documented_fields():
    """The field names of the README's Response table and of Response's docstring."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    table = text.split("### `llm.Response`", 1)[1].split("\n\n", 2)[1]
    names = set()
    for row in table.splitlines()[2:]:
        names.update(re.findall(r"`(\w+)`", row.split("|")[1]))
    names.update(re.findall(r"``(\w+)``:", llm.Response.__doc__))
    names.update(re.findall(r"``(\w+)`` and ``(\w+)`` as the server", llm.Response.__doc__)[0])
    return names


class NoWrite:
    write = 5


class WriteRaises:
    @property
    def write(self):
        raise RuntimeError("no write here")


class EveryFieldTest(LoopbackCase):
    """Every Response has every documented field, with its default unless the call set it."""

    def assert_every_field(self, response, **given):
        expected = dict(DEFAULTS, **given)
        for name, value in sorted(expected.items()):
            self.assertTrue(hasattr(response, name), "no %s" % name)
            got = getattr(response, name)
            if value is MEASURED:
                self.assertIsInstance(got, float, name)
                self.assertGreaterEqual(got, 0.0, name)
            elif callable(value):
                self.assertTrue(value(got), "%s is %r" % (name, got))
            else:
                self.assertEqual((type(got), got), (type(value), value), name)
        self.assertIsInstance(response.headers, http.client.HTTPMessage)
        self.assertEqual(list(response.headers.items()), [])
        self.assertEqual(response.headers.get("x-request-id"), None)
        self.assertIs(response.ok, expected["stop_reason"] not in ("error", "cancelled"))
        self.assertEqual(response.to_message(), {"role": "assistant", "content": expected["content"]})
        repr(response)

    def test_the_checked_fields_are_every_documented_and_every_public_one(self):
        checked = set(DEFAULTS) | {"headers", "ok"}
        made = llm.Response()
        public = {name for name in dir(made) if not name.startswith("_")
                  and not callable(getattr(made, name))}
        self.assertLessEqual(documented_fields() | public, checked)
        self.assertIn("logprobs", documented_fields())

    def test_a_response_made_by_hand(self):
        self.assert_every_field(llm.Response())
        self.assert_every_field(llm.Response("Hi"), content="Hi")
        self.assert_every_field(llm.Response("", "cancelled"), stop_reason="cancelled")
        self.assert_every_field(llm.Response("a", "error", "it broke"), content="a",
                                stop_reason="error", error="it broke")
        self.assert_every_field(llm.Response(content="a", stop_reason="length"), content="a",
                                stop_reason="length")

    def test_chat_stream_refusing_its_out(self):
        server = self.serve(sse(delta("x", "stop")))
        client = self.client(server)
        for out in (object(), None, 5, "text", NoWrite(), WriteRaises()):
            with self.subTest(out=type(out).__name__):
                response = client.chat_stream(HI, out)
                self.assert_every_field(response, stop_reason="error", error=lambda error: (
                    error.startswith("out must have a write(str) method")), error_kind="bad_request")
        self.assertEqual(server.requests, [])

    def test_a_call_refused_for_its_arguments(self):
        server = self.serve(sse(delta("x", "stop")))
        client = self.client(server)

        def streamed(messages, **params):
            stream = client.stream(messages, **params)
            self.assertEqual(list(stream), [])
            return stream.response
        calls = [("chat", client.chat), ("stream", streamed),
                 ("chat_stream", lambda m, **p: client.chat_stream(m, Writes(), **p))]
        for (how, call), (messages, params) in itertools.product(calls, [
                ("not a list", {}), ([{"content": "no role"}], {}), (HI, {"temperature": object()}),
                ([llm.Message("user", [llm.image(os.path.join(ROOT, "no such image.png"))])], {})]):
            with self.subTest(how=how, messages=messages, params=params):
                self.assert_every_field(call(messages, **params), stop_reason="error",
                                        error=bool, total_seconds=MEASURED, error_kind="bad_request")
        refused = llm.Client(server.url, timeout=-1)
        self.assert_every_field(refused.chat(HI), stop_reason="error", error=bool,
                                total_seconds=MEASURED, error_kind="bad_request")
        self.assertEqual(server.requests, [])

    @unittest.skipUnless(os.name == "posix", "POSIX signals")
    def test_the_command_line_after_a_second_ctrl_c_prints_every_field(self):
        printed = {"content": "", "stop_reason": "cancelled", "error": "", "status": 0, "model": "",
                   "id": "", "usage": None, "tool_calls": [], "reasoning": "", "refusal": "",
                   "logprobs": None, "headers": {}, "first_token_seconds": None, "total_seconds": 0.0,
                   "timings": None, "warnings": [], "error_kind": "", "overflow": None}
        self.assertEqual(set(printed), documented_fields() - {"role", "ok"})  # the whole response
        for extra in ([], ["--no-stream"]):
            with self.subTest(options=extra):
                asked = threading.Event()
                server = self.serve([asked.set, HANG])
                process = subprocess.Popen(
                    [sys.executable, "-c", SECOND_CTRL_C, ROOT, "--json", "--base-url", server.url]
                    + extra + ["Hi"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE, env=cli_environment())
                self.addCleanup(stop, process)
                self.assertTrue(asked.wait(WAIT), "the request did not come")
                process.send_signal(signal.SIGINT)
                read_until(process.stderr, b"cancel asked\n")
                process.send_signal(signal.SIGINT)  # while the call still waits for its answer
                out, err = process.communicate(timeout=WAIT)
                self.assertEqual((process.returncode, err.decode()), (130, "[stopped]\n"))
                self.assertEqual(json.loads(out.decode()), printed)


# The command line with a cancel that does not end the call (as one waiting for a lock would
# not): the first Ctrl-C asks for it, and only a second one stops the wait.
SECOND_CTRL_C = """\
import sys
sys.path.insert(0, sys.argv[1])
import llm


def cancel(client, asked=[]):  # once: close() at the end cancels too
    if not asked:
        asked.append(True)
        sys.stderr.write("cancel asked\\n")
        sys.stderr.flush()


llm.Client.cancel = cancel
sys.exit(llm._main(sys.argv[2:]))
"""


def stop(process):
    if process.poll() is None:
        process.kill()
    process.wait(WAIT)
    process.stdout.close()
    process.stderr.close()


# ---------------------------------------------------------------- 4. to_message() keeps the text


TOOL_CALL = {"index": 0, "id": "call_1", "type": "function",
             "function": {"name": "look", "arguments": '{"at": "sky"}'}}


def reply_parts(text, calls, refusal, reasoning, legacy):
    """A reply as a server sends it, whole and streamed: (whole reply, stream chunks)."""
    fields = {"content": text or None}
    if calls:
        if legacy:
            fields["function_call"] = dict(TOOL_CALL["function"])
        else:
            fields["tool_calls"] = [dict(TOOL_CALL, index=n, id="call_%d" % n) for n in range(calls)]
    if refusal:
        fields["refusal"] = refusal
    if reasoning:
        fields["reasoning_content"] = reasoning
    finish = ("function_call" if legacy else "tool_calls") if calls else "stop"
    whole = message(**dict(fields, finish=finish))
    chunks = [delta(**{key: value}) for key, value in fields.items() if value is not None]
    return whole, chunks + [delta(finish=finish)]


def assert_keeps_the_text(test, reply, text, calls, refusal, reasoning, legacy):
    """The message of a reply of this text, tool calls, refusal and reasoning."""
    said = reply.to_message()
    json.dumps(said)
    if text:
        test.assertEqual(said["content"], text)  # beside tool calls and a refusal too
    elif calls or refusal:
        test.assertIsNone(said["content"])
    else:
        test.assertEqual(said["content"], "")
    test.assertEqual(("function_call" in said, "tool_calls" in said),
                     (bool(calls) and legacy, bool(calls) and not legacy))
    if calls and not legacy:
        test.assertEqual([call["function"]["name"] for call in said["tool_calls"]], ["look"] * calls)
    test.assertEqual(said.get("refusal", ""), refusal)
    test.assertEqual(said.get("reasoning_content", ""), reasoning)
    test.assertEqual(said["role"], "assistant")


class ToMessageTest(LoopbackCase):
    """``to_message()`` keeps the text: content is None only with no text and calls or a refusal."""

    def test_every_mix_of_text_tool_calls_refusal_and_reasoning(self):
        cases = list(itertools.product(["", "Let me look."], [0, 1, 2], ["", "I cannot."],
                                       ["", "Hmm."], [False, True]))
        cases = [case for case in cases if not (case[4] and case[1] != 1)]  # one legacy call
        served = {}

        def reply_for(request):
            whole, chunks = served[request.json()["messages"][-1]["content"]]
            return at_once(sse(*chunks)) if request.json()["stream"] else answer(whole)
        client = self.client(self.serve(reply_for))
        for number, case in enumerate(cases):
            served[str(number)] = reply_parts(*case)
            for how in ("chat", "chat_stream"):
                with self.subTest(case=case, how=how):
                    reply = client.chat(say(str(number))) if how == "chat" else \
                        client.chat_stream(say(str(number)), Writes())
                    self.assertTrue(reply.ok, reply.error)
                    assert_keeps_the_text(self, reply, *case)

    def test_the_text_beside_a_tool_call_goes_back_in_the_history(self):
        server = self.serve(sse(delta("Let me look."), delta(tool_calls=[TOOL_CALL])),
                            sse(delta("Blue.", "stop")))
        client = self.client(server)
        history = say("What colour is the sky?")
        reply = client.chat_stream(history, Writes())
        history.append(reply.to_message())
        history.append(llm.Message("tool", "blue", tool_call_id="call_1"))
        self.assertEqual(client.chat(history).stop_reason, "stop")
        sent = server.requests[1].json()["messages"][1]
        self.assertEqual((sent["content"], sent["tool_calls"][0]["id"]), ("Let me look.", "call_1"))

    def test_made_by_hand(self):
        self.assertEqual(llm.Response().to_message(), {"role": "assistant", "content": ""})
        reply = llm.Response("Let me look.", "tool_calls")
        reply.tool_calls = [llm.ToolCall("call_1", "look", "{}")]
        self.assertEqual(reply.to_message()["content"], "Let me look.")
        reply.content = ""
        self.assertIsNone(reply.to_message()["content"])


# ---------------------------------------------------------------- 5. nothing raises, ever


def lifetime_answer(request):
    """What the lifetime tests' server answers: the last message says which case it is."""
    if request.path.endswith("/models"):
        return answer({"object": "list", "data": [{"id": "m"}]})
    body = request.json()
    said, streamed = body["messages"][-1]["content"], body.get("stream")
    good = at_once(sse(delta("o"), delta("k", "stop"))) if streamed else answer(message("ok"))
    return {"hang": sse(delta("a"), HANG, done=False),
            "cut": [head(), chunk(event(delta("a"))), CLOSE],
            "reset": [RESET],
            "then close": good + [CLOSE]}.get(said, good)


BAD_MESSAGES = ["not a list", None, 5, [None], [{}], [{"content": "no role"}], [{"role": ""}],
                [{"role": "user", "content": object()}], [{"role": "user", "content": float("nan")}],
                [llm.Message("user", [llm.image(os.path.join(ROOT, "no such image.png"))])]]
BAD_PARAMS = [{"temperature": object()}, {"temperature": float("inf")}, {"stop": {"a", "b"}}]
BAD_OUTS = [object(), None, 5, NoWrite(), WriteRaises()]


def bad_calls():
    """Every kind of bad argument, each given to each call: (name, how, args, params)."""
    for messages in BAD_MESSAGES:
        for how in ("chat", "chat_stream", "stream"):
            yield "messages %r" % (messages,), how, messages, {}
    for params in BAD_PARAMS:
        for how in ("chat", "chat_stream", "stream"):
            yield "params %r" % (params,), how, HI, params
    for out in BAD_OUTS:
        yield "out %s" % type(out).__name__, "chat_stream", HI, {"out": out}


class LifetimeCase(LoopbackCase):
    def returns(self, what, function, *args, **params):
        """function(*args, **params), which must return (not raise)."""
        try:
            return function(*args, **params)
        except Exception:
            self.fail("%s raised:\n%s" % (what, traceback.format_exc()))

    def call(self, client, how, messages, **params):
        """One call made the given way: (its Response, the text it gave out)."""
        if how == "chat":
            return self.returns(how, client.chat, messages, **params), []
        if how == "chat_stream":
            out = params.pop("out") if "out" in params else Writes()
            writes = getattr(out, "writes", [])
            return self.returns(how, client.chat_stream, messages, out, **params), writes
        stream = self.returns(how, client.stream, messages, **params)
        pieces = self.returns("iterating a stream", list, stream)
        return self.returns("Stream.response", lambda: stream.response), pieces

    def assert_good(self, client, how="chat"):
        response, pieces = self.call(client, how, say("good"))
        self.assertEqual((response.stop_reason, response.error, response.content), ("stop", "", "ok"))
        self.assertEqual("".join(pieces), "" if how == "chat" else "ok")

    def assert_refused(self, client, server, name, how, messages, params):
        before = len(server.requests)
        response, pieces = self.call(client, how, messages, **dict(params))
        self.assertIsInstance(response, llm.Response, name)
        self.assertEqual((response.stop_reason, bool(response.error), pieces), ("error", True, []),
                         (name, how, response))
        self.assertEqual(len(server.requests), before, "%s was sent" % name)

    def assert_every_bad_call_refused(self, client, server):
        for name, how, messages, params in bad_calls():
            self.assert_refused(client, server, name, how, messages, params)

    def cancelled_by_its_writer(self, client):
        writes = []
        response = self.returns("chat_stream", client.chat_stream, say("hang"),
                                Writes(writes, on_write=lambda text: client.cancel()))
        self.assertEqual((response.stop_reason, response.content, writes), ("cancelled", "a", ["a"]))

    def closed_early(self, client):
        stream = self.returns("stream", client.stream, say("hang"))
        self.assertEqual(self.returns("next", next, stream), "a")
        self.returns("Stream.close", stream.close)
        self.assertEqual((stream.response.stop_reason, stream.response.content), ("cancelled", "a"))

    def failed(self, client, said, content):
        response, _ = self.call(client, "chat_stream", say(said))
        self.assertEqual((response.stop_reason, response.content), ("error", content))
        self.assertTrue(response.error)


class LifetimeTest(LifetimeCase):
    """One client through a lifetime: every call returns a Response, whatever came before."""

    def test_a_client_through_good_calls_cancels_closed_connections_and_bad_arguments(self):
        # a port given: its connections can be left behind for another server to take it again
        server = self.serve(lifetime_answer, port=free_port())
        client = self.client(server)
        self.assert_every_bad_call_refused(client, server)  # fresh
        steps = [
            ("a good call, its connection kept", lambda: self.assert_good(client)),
            ("a good stream", lambda: self.assert_good(client, "chat_stream")),
            ("a good iteration", lambda: self.assert_good(client, "stream")),
            ("the models", lambda: self.assertEqual(self.returns("models", client.models), ["m"])),
            ("a call its writer cancelled", lambda: self.cancelled_by_its_writer(client)),
            ("a stream closed early", lambda: self.closed_early(client)),
            ("a reply cut short", lambda: self.failed(client, "cut", "a")),
            ("a connection reset", lambda: self.failed(client, "reset", "")),
            ("a connection the server closed after its answer", lambda: (
                self.assertEqual(self.call(client, "chat", say("then close"))[0].content, "ok"),
                self.assert_good(client))),
            ("cancel() with nothing in flight", lambda: (
                self.returns("cancel", client.cancel), self.assert_good(client))),
            ("close()", lambda: (self.returns("close", client.close), self.assert_good(client))),
        ]
        for name, step in steps:
            with self.subTest(after=name):
                step()
                self.assert_every_bad_call_refused(client, server)
        port = server.port
        server.close()  # the server goes away
        with self.subTest(after="the server went away"):
            for how in ("chat", "chat_stream", "stream"):
                response, _ = self.call(client, how, say("good"))
                self.assertEqual(response.stop_reason, "error")
                self.assertIn("connection refused", response.error)
            self.assertIn("connection refused", self.returns("models", client.models).error)
            self.assert_every_bad_call_refused(client, server)
        back = Server(lifetime_answer, port=port)  # and comes back where it was
        self.addCleanup(back.close)
        for how in ("chat", "chat_stream", "stream"):
            self.assert_good(client, how)
        self.assert_every_bad_call_refused(client, back)


# ---------------------------------------------------------------- two bounds


class BoundsTest(LoopbackCase):
    def test_each_pause_before_a_retry_is_within_its_documented_range(self):
        # the README: the first pause 0.25 to 0.5 s, the range doubling with each retry up to
        # 15 to 30 s
        ranges = [(0.25, 0.5), (0.5, 1), (1, 2), (2, 4), (4, 8), (8, 16), (15, 30), (15, 30)]
        busy = answer({"error": "busy"}, 503)
        for name, jitter, which in (("random", None, None), ("least", lambda low, high: low, 0),
                                    ("most", lambda low, high: high, 1)):
            with self.subTest(jitter=name):
                server = self.serve(*([busy] * len(ranges) + [answer(message("ok"))]))
                pauses = []
                with contextlib.ExitStack() as stack:
                    stack.enter_context(mock.patch.object(
                        llm._Guard, "sleep", lambda guard, delay, why, kind: pauses.append(delay)))
                    if jitter is not None:
                        stack.enter_context(mock.patch("random.uniform", jitter))
                    response = self.client(server, retries=len(ranges)).chat(HI)
                self.assertEqual((response.content, len(server.requests)), ("ok", len(ranges) + 1))
                self.assertEqual(len(pauses), len(ranges))
                for pause, (least, most) in zip(pauses, ranges):
                    self.assertTrue(least <= pause <= most, (pauses, ranges))
                if which is not None:
                    self.assertEqual(pauses, [bounds[which] for bounds in ranges])

    def test_an_error_list_names_its_first_five_entries(self):
        for entries in (1, 5, 6, 40):
            with self.subTest(entries=entries):
                detail = [{"loc": ["body", "messages", n], "msg": "bad %d" % n, "type": "x"}
                          for n in range(entries)]
                response = self.client(self.serve(answer({"detail": detail}, 422))).chat(HI)
                self.assertEqual(response.error, "HTTP 422: " + "; ".join(
                    "body.messages.%d: bad %d" % (n, n) for n in range(min(entries, 5))))


# ---------------------------------------------------------------- the properties, drawn (hypothesis)


if hypothesis is None:
    class DrawnPropertyTest(unittest.TestCase):
        @unittest.skip("hypothesis is not installed (pip install hypothesis)")
        def test_properties(self):
            pass
else:
    class DrawnCancelTest(SharedServerCase):
        @fuzz(100)
        @given(st.lists(st.text(min_size=1, max_size=8), min_size=1, max_size=6), st.data())
        def test_no_text_after_cancel_however_the_reply_is_framed(self, pieces, data):
            events = reply_events(pieces)
            if data.draw(st.booleans(), label="chunked"):
                ends = data.draw(st.lists(st.booleans(), min_size=len(events) - 1,
                                          max_size=len(events) - 1), label="chunk ends")
                groups, group = [], [events[0]]
                for ended, item in zip(ends, events[1:]):
                    if ended:
                        groups.append(group)
                        group = []
                    group.append(item)
                steps = sent_at_once(events, groups + [group])
            else:
                steps = sent_at_once(events)
            count = data.draw(st.integers(1, len(pieces)), label="cancelled after")
            self.answer_with(steps)
            client = self.fresh_client(think_tags=False)  # each piece written as it comes
            try:
                if data.draw(st.booleans(), label="stream"):
                    stream = client.stream(HI)
                    got = [next(stream) for _ in range(count)]
                    client.cancel()
                    got += list(stream)
                    response = stream.response
                else:
                    got = []
                    response = client.chat_stream(HI, Writes(got, on_write=lambda text: (
                        len(got) == count and client.cancel())))
            finally:
                client.close()
            self.assertEqual(got, pieces[:count])
            self.assertEqual((response.stop_reason, response.content), ("cancelled", "".join(got)))

    # JSON objects and arrays whose strings are full of brackets, quotes, backslashes and
    # characters that str.splitlines() would take for line ends
    STRINGS = st.text(alphabet='{}[]"\\:,ab \u00e9\u2028\x85\t/', max_size=8)
    VALUES = st.recursive(
        st.none() | st.booleans() | st.integers() | STRINGS,
        lambda children: (st.lists(children, max_size=3)
                          | st.dictionaries(STRINGS, children, max_size=3)),
        max_leaves=6)
    CONTAINERS = st.dictionaries(STRINGS, VALUES, max_size=4) | st.lists(VALUES, max_size=4)

    class DrawnDecoderTest(unittest.TestCase):
        @fuzz(400)
        @given(st.lists(st.tuples(CONTAINERS, st.booleans(),
                                  st.sampled_from([None, "delta", "ping"])), min_size=1, max_size=4),
               st.sampled_from([ends[1:] for ends in LINE_ENDS]), st.booleans(), st.booleans(),
               st.booleans(), st.lists(st.integers(1, 2000), max_size=8))
        def test_the_events_of_any_framing_whatever_the_cuts(self, items, ends, space, blank,
                                                            comments, cuts):
            within, after = ends
            prefix = b"data: " if space else b"data:"
            body, expected = [], []
            for value, multi, kind in items + [(None, False, None)]:
                text = json.dumps(value, ensure_ascii=False, indent=1 if multi else None)
                lines = [b"[DONE]"] if value is None else [
                    line.encode("utf-8") for line in text.split("\n")]
                if comments:
                    body.append(b": keep-alive" + after + (after if blank else b""))
                if kind:
                    body.append(b"event: " + kind.encode() + within)
                body.extend(prefix + line + within for line in lines[:-1])
                body.append(prefix + lines[-1] + after + (after if blank else b""))
                expected.append((kind or "message", llm._DONE if value is None else value))
            body = b"".join(body)
            self.assertEqual(decoded(body), expected)
            self.assertEqual(decoded(body, [cut % len(body) for cut in cuts]), expected)

    class DrawnMessageTest(SharedServerCase):
        @fuzz(100)
        @given(st.text(max_size=12), st.integers(0, 2), st.text(max_size=8), st.text(max_size=8),
               st.booleans(), st.booleans())
        def test_to_message_keeps_the_text_of_any_reply(self, text, calls, refusal, reasoning,
                                                       legacy, streamed):
            legacy = legacy and calls == 1
            whole, chunks = reply_parts(text, calls, refusal, reasoning, legacy)
            self.answer_with(at_once(sse(*chunks)) if streamed else answer(whole))
            client = self.fresh_client()
            try:
                reply = client.chat_stream(HI, Writes()) if streamed else client.chat(HI)
            finally:
                client.close()
            self.assertTrue(reply.ok, reply.error)
            assert_keeps_the_text(self, reply, text, calls, refusal, reasoning, legacy)

    STEPS = ["good chat", "good chat_stream", "good stream", "models", "cancelled by its writer",
             "closed early", "cut", "reset", "then close", "cancel()", "close()", "bad argument"]

    class DrawnLifetimeTest(SharedServerCase, LifetimeCase):
        @fuzz(100)
        @given(st.lists(st.sampled_from(STEPS), min_size=1, max_size=8), st.data())
        def test_nothing_raises_whatever_came_before(self, steps, data):
            self.answer_with(lifetime_answer)
            client = self.fresh_client()
            bad = list(bad_calls())
            try:
                for step in steps:
                    # a bad argument before each step, and after the last
                    self.assert_refused(client, self.server, *data.draw(st.sampled_from(bad)))
                    if step.startswith("good"):
                        self.assert_good(client, step.split()[1])
                    elif step == "models":
                        self.assertEqual(self.returns("models", client.models), ["m"])
                    elif step == "cancelled by its writer":
                        self.cancelled_by_its_writer(client)
                    elif step == "closed early":
                        self.closed_early(client)
                    elif step in ("cut", "reset"):
                        self.failed(client, step, "a" if step == "cut" else "")
                    elif step == "then close":
                        self.assertEqual(self.call(client, "chat", say(step))[0].content, "ok")
                    elif step in ("cancel()", "close()"):
                        self.returns(step, getattr(client, step[:-2]))
                    else:
                        self.assert_refused(client, self.server, *data.draw(st.sampled_from(bad)))
                self.assert_refused(client, self.server, *data.draw(st.sampled_from(bad)))
                self.assert_good(client, data.draw(st.sampled_from(["chat", "chat_stream",
                                                                    "stream"])))
            finally:
                client.close()


if __name__ == "__main__":
    unittest.main()
