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

Every HTTP exchange is real, with a loopback server from test_llm that sends
the exact bytes given; threads are ordered with events, and no test asserts
a wall-clock time.
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
if ROOT not in sys.path:  # run as a file: this checkout's llm.py and test_llm.py
    sys.path.insert(0, ROOT)

import llm
from test_llm import (CLOSE, END, HANG, HI, RESET, LoopbackCase, Server, Writes, answer, chunk,
                      delta, free_port, head, in_thread, message, sse)
from tests.test_cli import environment as cli_environment, read_until

try:
    import hypothesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # the property tests are skipped
    hypothesis = None

WAIT = 20  # seconds: the longest any one wait may take before the test fails
DONE = b"data: [DONE]\n\n"


def examples(weight):
    """How many examples a property tries: LLM_FUZZ_EXAMPLES, else a quarter of its weight."""
    try:
        return int(os.environ.get("LLM_FUZZ_EXAMPLES") or weight // 4)
    except ValueError:
        return weight // 4


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


if __name__ == "__main__":
    unittest.main()
