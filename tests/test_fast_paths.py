"""The fast paths give what the general ones give: ``python -m unittest tests.test_fast_paths``.

A stream's usual events (one content delta each, in the same envelope but for
their text) are taken at once once the general path has taken one of them
(``llm._Envelope``). Every test here sends the same bytes, split the same ways,
to a call with that fast path and to one without it (``_Call.envelopes``
False), and compares the two: the Response, field by field, and every write.
The bodies are real servers' recordings (llama.cpp's, vLLM's) and streams made
to probe the envelope's edges; the hypothesis tests draw more (skipped without
hypothesis).
"""

import json
import os
import random
import sys
import unittest
from unittest import mock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as a file: this checkout's llm.py and tests
    sys.path.insert(0, ROOT)

import llm
from tests.loopback import END, HI, LoopbackCase, chunk, delta, examples, head

try:
    from hypothesis import given, settings, strategies as st
except ImportError:  # the deterministic tests still run
    given = None

DATA = os.path.join(ROOT, "tests", "testdata")
FUZZ = examples(160)  # LLM_FUZZ_EXAMPLES, else 40


def recorded_body(path):
    """The body of a recorded chunked answer: its events, as the server's chunks carried them."""
    with open(path, "rb") as f:
        data = f.read()
    head_end = data.index(b"\r\n\r\n") + 4
    chunks, at = [], head_end
    while True:
        line_end = data.index(b"\r\n", at)
        size = int(data[at:line_end].split(b";")[0], 16)
        if size == 0:
            return chunks
        chunks.append(data[line_end + 2:line_end + 2 + size])
        at = line_end + 2 + size + 2


def event_bytes(obj):
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode("utf-8") + b"\n\n"


def envelope(text, **fields):
    """One content event in a server's usual envelope."""
    chunk_ = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1700000000,
              "model": "m", "choices": [{"index": 0, "delta": {"content": text},
                                         "logprobs": None, "finish_reason": None}]}
    chunk_.update(fields)
    return event_bytes(chunk_)


# streams made to probe the envelope: each a list of events (bytes)
WORDS = ["Hello", " world", "!", " caf\u00e9", " \u6f22\u5b57", " \U0001F600", ' "quoted"', " back\\slash",
         " tab\there", " line\nbreak", " </think>", " x" * 100]
PROBES = {
    "the usual": [event_bytes(delta(role="assistant", content=""))] + [envelope(w) for w in WORDS]
                 + [event_bytes(delta(None, "stop")), b"data: [DONE]\n\n"],
    "escaped text": [envelope(w) for w in WORDS[:3]]
                    + [b'data: {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1700000000, '
                       b'"model": "m", "choices": [{"index": 0, "delta": {"content": "\\u00e9\\ud83d\\ude00\\n\\"x\\""}, '
                       b'"logprobs": null, "finish_reason": null}]}\n\n', envelope(" end"), b"data: [DONE]\n\n"],
    "a lone surrogate": [envelope("a"), envelope("b")]
                        + [b'data: {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1700000000, '
                           b'"model": "m", "choices": [{"index": 0, "delta": {"content": "\\ud800"}, '
                           b'"logprobs": null, "finish_reason": null}]}\n\n', b"data: [DONE]\n\n"],
    "other events between": [envelope("a"), envelope("b"),
                             event_bytes(delta(reasoning="thinking")), envelope("c"),
                             event_bytes(dict(delta("d"), usage={"prompt_tokens": 1})), envelope("e"),
                             event_bytes({"choices": [{"index": 0, "delta": {"content": "f"}, "logprobs": {
                                 "content": [{"token": "f", "logprob": -0.5}]}}]}), envelope("g"),
                             event_bytes(delta(tool_calls=[{"index": 0, "id": "c1", "function": {
                                 "name": "f", "arguments": "{}"}}])), envelope("h"),
                             event_bytes(delta("i", "length")), b"data: [DONE]\n\n"],
    "the envelope changes": [envelope("a"), envelope("b"), envelope("c", created=1700000001),
                             envelope("d", model="other"), envelope("e"), b"data: [DONE]\n\n"],
    "duplicate keys": [envelope("a"), envelope("b")]
                      + [b'data: {"choices": [{"index": 0, "delta": {"content": "one", "content": "two"}}]}\n\n'] * 3
                      + [b"data: [DONE]\n\n"],
    "another choice": [envelope("a"), envelope("b"), event_bytes({"choices": [{"index": 1, "delta": {
        "content": "not ours"}}]}), envelope("c"), b"data: [DONE]\n\n"],
    "an error inside": [envelope("a"), envelope("b"), event_bytes({"error": {"message": "boom"}}),
                        envelope("c"), b"data: [DONE]\n\n"],
    "no done": [envelope("a"), envelope("b"), envelope("c")],
    "after done": [envelope("a"), envelope("b"), b"data: [DONE]\n\n", envelope("c"), envelope("d")],
    "event types and comments": [envelope("a"), envelope("b"), b": keep-alive\n\n", envelope("c"),
                                 b"event: message\n" + envelope("d"), b"event: error\n" + envelope("e"),
                                 envelope("f"), b"data: [DONE]\n\n"],
    "data without a space": [envelope("a"), envelope("b"), envelope("c").replace(b"data: ", b"data:"),
                             envelope("d"), b"data: [DONE]\n\n"],
    "CRLF and CR": [envelope("a"), envelope("b"), envelope("c").replace(b"\n", b"\r\n"),
                    envelope("d").replace(b"\n", b"\r"), envelope("e"), b"data: [DONE]\n\n"],
    "a think block": [envelope("<think>"), envelope("why"), envelope("</think>"), envelope("so"),
                      envelope("answer"), b"data: [DONE]\n\n"],
    "empty texts": [envelope("a"), envelope(""), envelope("b"), envelope(""), b"data: [DONE]\n\n"],
    "big events": [envelope("a"), envelope("b"), envelope("x" * 600), envelope("c"),
                   b"data: [DONE]\n\n"],
    "not UTF-8": [envelope("a"), envelope("b"), envelope("c").replace(b'"c"', b'"\xff"'), envelope("d"),
                  b"data: [DONE]\n\n"],
}


def recordings():
    """Each recorded stream: its events as the server's chunks carried them."""
    found = {}
    for folder in ("llama_server", "vllm"):
        for name in sorted(os.listdir(os.path.join(DATA, folder))):
            if name.startswith("stream") and name.endswith(".bin"):
                found["%s/%s" % (folder, name[:-4])] = recorded_body(os.path.join(DATA, folder, name))
    return found


def framings(events, rnd):
    """The same events, sent several ways: (name, steps)."""
    body = b"".join(events)
    groups, at = [], 0
    while at < len(events):  # several events to a chunk, at random
        size = rnd.randint(1, 4)
        groups.append(b"".join(events[at:at + size]))
        at += size
    cuts = sorted(rnd.sample(range(1, len(body)), min(6, len(body) - 1))) if len(body) > 1 else []
    pieces = [body[a:b] for a, b in zip([0] + cuts, cuts + [len(body)])]
    return [("a chunk an event", [head()] + [chunk(e) for e in events] + [END]),
            ("events grouped", [head()] + [chunk(g) for g in groups] + [END]),
            ("chunks cut anywhere", [head()] + [chunk(p) for p in pieces] + [END]),
            ("one chunk", [head() + chunk(body) + END]),
            ("Content-Length, one send", [head(chunked=False, length=len(body)) + body]),
            ("Content-Length, sends cut anywhere", [head(chunked=False, length=len(body))] + pieces)]


def outcome(response, writes):
    """All that a caller can see of a streamed call."""
    return {"content": response.content, "writes": writes, "stop_reason": response.stop_reason,
            "error": response.error, "error_kind": response.error_kind, "reasoning": response.reasoning,
            "refusal": response.refusal, "usage": response.usage, "model": response.model,
            "id": response.id, "logprobs": response.logprobs, "timings": response.timings,
            "warnings": response.warnings, "message": response.to_message(),
            "calls": [(c.id, c.name, c.arguments, c.args) for c in response.tool_calls],
            "first token": response.first_token_seconds is not None}


class Writes:
    def __init__(self):
        self.writes, self.thoughts = [], []

    def write(self, text):
        self.writes.append(text)

    def write_reasoning(self, text):
        self.thoughts.append(text)


class DifferentialCase(LoopbackCase):
    def both(self, steps, how="chat_stream"):
        """The outcome of the same answer with the fast path and without it."""
        outcomes = []
        for fast in (True, False):
            with mock.patch.object(llm._Call, "envelopes", fast):
                client = self.client(self.serve(steps))
                if how == "stream":
                    stream = client.stream(HI)
                    writes = list(stream)
                    response, thoughts = stream.response, []
                else:
                    out = Writes()
                    response = client.chat_stream(HI, out)
                    writes, thoughts = out.writes, out.thoughts
                outcomes.append(dict(outcome(response, writes), thoughts=thoughts))
        return outcomes

    def assert_same(self, events, rnd, how="chat_stream"):
        for name, steps in framings(events, rnd):
            with self.subTest(framing=name):
                fast, general = self.both(steps, how)
                self.assertEqual(fast, general)


class EnvelopeTest(DifferentialCase):
    def test_the_probes_give_the_same_reply_with_and_without_the_fast_path(self):
        rnd = random.Random(7)
        for name, events in PROBES.items():
            with self.subTest(stream=name):
                self.assert_same(events, rnd)

    def test_real_servers_streams_give_the_same_reply_with_and_without_it(self):
        rnd = random.Random(11)
        for name, events in recordings().items():
            with self.subTest(recording=name):
                self.assert_same(events, rnd, how="stream" if "usage" in name else "chat_stream")

    def test_the_fast_path_is_taken_where_it_may_be(self):
        # not a test of speed: of the path, counted
        taken = []
        real = llm._Envelope.text

        def counted(envelope, data):
            text = real(envelope, data)
            taken.append(text is not None)
            return text
        events = PROBES["the usual"]
        with mock.patch.object(llm._Envelope, "text", counted):
            response = self.client(self.serve([head()] + [chunk(e) for e in events] + [END])).chat_stream(
                HI, Writes())
        self.assertEqual(response.content, "".join(WORDS))
        self.assertEqual(taken.count(True), len(WORDS) - 1)  # all but the one the envelope came from

    def test_an_envelope_is_learnt_only_from_what_held_nothing_but_text(self):
        data = envelope("a")
        chunk_ = json.loads(data[6:].decode())
        self.assertIsNotNone(llm._Envelope.of(data, "a", ("message", chunk_)))
        for changed in ({"usage": {"prompt_tokens": 1}}, {"timings": {"prompt_n": 1}}, {"x_groq": {}},
                        {"error": {"message": "x"}}):
            other = dict(chunk_, **changed)
            self.assertIsNone(llm._Envelope.of(event_bytes(other), "a", ("message", other)), changed)
        self.assertIsNone(llm._Envelope.of(data, "a", ("error", chunk_)))
        self.assertIsNone(llm._Envelope.of(data.replace(b"\n\n", b"\r\n\r\n"), "a", ("message", chunk_)))
        # a key twice: JSON keeps the last, and so does the envelope, as a probe shows
        twice = b'data: {"choices": [{"index": 0, "delta": {"content": "a", "content": "a"}}]}\n\n'
        learnt = llm._Envelope.of(twice, "a", ("message", json.loads(twice[6:].decode())))
        self.assertEqual(learnt.text(twice.replace(b'"a"}}', b'"b"}}')), "b")
        self.assertIsNone(learnt.text(twice.replace(b'"a", ', b'"b", ')))


if given is not None:
    texts = st.text(min_size=0, max_size=12)
    extras = st.sampled_from([None, "reasoning", "usage", "logprobs", "tool", "finish", "comment",
                              "refusal", "other envelope", "escaped"])

    class DrawnEnvelopeTest(DifferentialCase):
        @settings(max_examples=FUZZ, deadline=None, derandomize=False)
        @given(st.lists(st.tuples(texts, extras), min_size=1, max_size=12), st.booleans(),
               st.randoms(use_true_random=False))
        def test_any_stream_gives_the_same_reply_with_and_without_the_fast_path(self, drawn, done, rnd):
            events = []
            for text, extra in drawn:
                events.append(envelope(text))
                if extra == "reasoning":
                    events.append(event_bytes(delta(reasoning=text or "r")))
                elif extra == "usage":
                    events.append(event_bytes({"choices": [], "usage": {"prompt_tokens": len(text)}}))
                elif extra == "logprobs":
                    events.append(event_bytes({"choices": [{"index": 0, "delta": {"content": text},
                                                            "logprobs": {"content": [{"token": text, "logprob": -1}]}}]}))
                elif extra == "tool":
                    events.append(event_bytes(delta(tool_calls=[{"index": 0, "id": "c", "function": {
                        "name": "f", "arguments": text}}])))
                elif extra == "finish":
                    events.append(event_bytes(delta(None, "stop")))
                elif extra == "comment":
                    events.append(b": " + text.encode("utf-8", "replace") + b"\n\n")
                elif extra == "refusal":
                    events.append(event_bytes(delta(refusal=text or "no")))
                elif extra == "other envelope":
                    events.append(envelope(text, created=rnd.randint(0, 9)))
                elif extra == "escaped":
                    events.append(envelope(text).replace(b'"content": "', b'"content": "\\u0041'))
            if done:
                events.append(b"data: [DONE]\n\n")
            for name, steps in framings(events, rnd):
                fast, general = self.both(steps)
                self.assertEqual(fast, general, name)


if __name__ == "__main__":
    unittest.main()
