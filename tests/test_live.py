"""Live conformance tests: llm.py against a real OpenAI-compatible server.

    LLM_TEST_BASE_URL=http://127.0.0.1:8080 LLM_TEST_MODEL=tiny python -m unittest -v tests.test_live

Environment:

    LLM_TEST_BASE_URL       the server to test (unset: every test is skipped)
    LLM_TEST_MODEL          the model to ask for (default: the first one /v1/models lists)
    LLM_TEST_API_KEY        the server's API key, if it wants one
    LLM_TEST_AUTH_BASE_URL  optional second server that enforces LLM_TEST_AUTH_KEY
    LLM_TEST_AUTH_KEY         (the wrong-key cases run only when it is named)
    LLM_TEST_EXACT          1: also check the tiny deterministic model's exact answers
                            (on by default when /v1/models lists "tiny"; 0 turns it off)
    LLM_TEST_LONG_TOKENS    max_tokens for the long generations of the cancel and
                            timeout cases (default 4000)
    LLM_TEST_REQUIRE        1: an unset, unreachable or incomplete configuration fails
                            the suite instead of skipping it (for CI)
    LLM_TEST_EXCLUSIVE      1: the server serves this suite alone, so that a case may
                            fill its KV cache on purpose (llama-server's in-band error)
    LLM_TEST_CONTEXT        the server's context size in tokens, when it does not say
                            (it is read from /props, meta.n_ctx or max_model_len)
    LLM_TEST_SERVER         llama.cpp, vllm, ...: the run fails unless the server is
                            detected as this one (for CI)

The server-agnostic tests hold for any conforming server and are strict
everywhere. The checks of one server's own words (``LlamaServerWords``,
``VLLMWords``) run only when the server says it is that one: its ``Server``
header, ``/props``, ``/version``, ``/openapi.json`` or the shape of
``/v1/models``; never its model ids. The tiny model's answers
(``ExactAnswers``) hold for the model of ``shared/realserver`` that answers
"Hello from a tiny llama!" to everything, on any server. A test that does not
apply says why in its skip reason. Standard library only; Python 3.6 and later.
"""

import http.client
import io
import json
import os
import re
import sys
import threading
import time
import unittest
import uuid
from urllib.parse import urlsplit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as a file: this checkout's llm.py and tests
    sys.path.insert(0, ROOT)

import llm
from tests.loopback import call_socket, idle_socket, readable, wait_until

ENV = os.environ
BASE_URL = ENV.get("LLM_TEST_BASE_URL", "").strip()
API_KEY = ENV.get("LLM_TEST_API_KEY", "")
AUTH_BASE_URL = ENV.get("LLM_TEST_AUTH_BASE_URL", "").strip()
AUTH_KEY = ENV.get("LLM_TEST_AUTH_KEY", "")
REQUIRE = ENV.get("LLM_TEST_REQUIRE", "") not in ("", "0")
try:
    LONG_TOKENS = max(1, int(ENV.get("LLM_TEST_LONG_TOKENS", "") or 4000))
except ValueError:
    LONG_TOKENS = 4000
EXCLUSIVE = ENV.get("LLM_TEST_EXCLUSIVE", "") not in ("", "0")
try:
    CONTEXT = max(0, int(ENV.get("LLM_TEST_CONTEXT", "") or 0)) or None
except ValueError:
    CONTEXT = None
FALLBACK_WORDS = 20000  # an overflow prompt when the context size is unknown: seconds to tokenize

HELLO = "Hello from a tiny llama!"
ASK = [{"role": "user", "content": "Say hello in one short sentence."}]
LONG_ASK = [{"role": "user", "content": "Count from 1 to 100000, separated by spaces."}]
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "The city's name"}},
            "required": ["city"],
        },
    },
}
GREETING_SCHEMA = {
    "type": "json_schema",
    "json_schema": {
        "name": "greeting",
        "strict": True,
        "schema": {
            "type": "object",
            "properties": {"greeting": {"type": "string"}, "count": {"type": "integer"}},
            "required": ["greeting", "count"],
            "additionalProperties": False,
        },
    },
}
STOP_REASONS = ("stop", "length", "tool_calls", "content_filter")
CANCEL_GRACE = 2.0  # seconds a cancel, a deadline or a timeout may take to end a call

_SKIP_REASON = "LLM_TEST_BASE_URL is not set (it names the server to test)"


# ---------------------------------------------------------------- the server under test


def _split(url):
    """(scheme, host, port, API prefix such as "/v1") of a base URL, as llm.py reads it."""
    parts = urlsplit(url if "://" in url else "http://" + url)
    scheme = parts.scheme.lower()
    port = parts.port or (443 if scheme == "https" else 80)
    path = parts.path.rstrip("/")
    if path.endswith("/chat/completions"):
        path = path[: -len("/chat/completions")]
    return scheme, parts.hostname or "", port, path or "/v1"


def raw_request(method, path, body=None, base_url=None, api_key=None, timeout=60.0, root=False):
    """One request to the named server with http.client: (status, headers, body bytes).

    ``path`` is below the API prefix (``"/models"``, ``"/chat/completions"``),
    or below the host root with ``root=True``. Used to see what the server
    itself says, next to what llm.py makes of it.
    """
    scheme, host, port, prefix = _split(base_url or BASE_URL)
    prefix = "" if root else prefix
    connection_class = http.client.HTTPSConnection if scheme == "https" else http.client.HTTPConnection
    connection = connection_class(host, port, timeout=timeout)
    headers = {"Accept": "application/json"}
    key = API_KEY if api_key is None else api_key
    if key:
        headers["Authorization"] = "Bearer " + key
    data = None
    if body is not None:
        data = json.dumps(body).encode("utf-8")
        headers["Content-Type"] = "application/json"
        if body.get("stream"):
            headers["Accept"] = "text/event-stream"
    try:
        connection.request(method, prefix + path, data, headers)
        reply = connection.getresponse()
        return reply.status, dict((k.lower(), v) for k, v in reply.getheaders()), reply.read()
    finally:
        connection.close()


def sse_payloads(data):
    """The JSON payloads of a server-sent event body (``[DONE]`` and non-JSON left out)."""
    payloads = []
    for line in data.replace(b"\r\n", b"\n").split(b"\n"):
        if line.startswith(b"data:"):
            value = line[5:].strip()
            if value and value != b"[DONE]":
                try:
                    payloads.append(json.loads(value.decode("utf-8", "replace")))
                except ValueError:
                    pass
    return payloads


class _Server:
    """What the probe found: reachable or why not, the model ids, the model to use."""

    probed = False
    problem = ""
    model_ids = []
    models_status = 0
    models_body = b""
    model = ""
    exact = False
    keep_alive = None  # the server's Keep-Alive timeout in seconds, when it says
    keep_alive_max = None  # the most requests it serves on one connection, when it says
    streams_usage = None  # whether it reports usage in a stream, once asked
    n_ctx = None  # the context size, when /props, meta.n_ctx or max_model_len says
    kind = ""  # "llama.cpp", "vllm", "llama-cpp-python", "litellm", "ollama" or "" (unknown)
    evidence = "nothing it says names it"  # how the kind was told


def root_json(path, timeout=5.0):
    """GET ``path`` below the host root: the JSON answer of a 200, else None."""
    try:
        status, _, body = raw_request("GET", path, root=True, timeout=timeout)
        return json.loads(body.decode("utf-8", "replace")) if status == 200 else None
    except (OSError, ValueError, http.client.HTTPException):
        return None


def detect(headers, entries):
    """(kind, evidence): which server this is, from what it says about itself.

    Its ``Server`` header, ``/props`` (llama-server), ``/version`` (vLLM),
    ``/api/version`` (Ollama), the title of ``/openapi.json`` (FastAPI servers)
    and the shape of its ``/v1/models`` entries; never the model ids.
    """
    header = headers.get("server", "")
    if "llama.cpp" in header.lower():
        return "llama.cpp", "Server: %s" % header
    if any(k.startswith("x-litellm") for k in headers):
        return "litellm", "x-litellm-* headers"
    props = root_json("/props")
    if isinstance(props, dict) and "default_generation_settings" in props:
        return "llama.cpp", "GET /props"
    owners = set(e.get("owned_by") for e in entries)
    version = root_json("/version")
    if owners == {"vllm"} or (isinstance(version, dict) and "version" in version
                              and all("max_model_len" in e for e in entries)):
        return "vllm", "/v1/models owned_by vllm, GET /version %s" % (version or {}).get("version")
    if isinstance(root_json("/api/version"), dict):
        return "ollama", "GET /api/version"
    spec = root_json("/openapi.json", timeout=30.0)  # LiteLLM makes its 2 MB in 7 s
    title = ((spec or {}).get("info") or {}).get("title", "") if isinstance(spec, dict) else ""
    if "llama.cpp python" in str(title).lower():
        return "llama-cpp-python", "/openapi.json title %r" % title
    if "litellm" in str(title).lower():
        return "litellm", "/openapi.json title %r" % title
    return "", "nothing it says names it (Server: %r)" % header


def context_size(entries):
    """The context size in tokens that the server reports, or None."""
    if CONTEXT:
        return CONTEXT
    for entry in entries:
        meta = entry.get("meta")
        if isinstance(meta, dict) and isinstance(meta.get("n_ctx"), int):
            return meta["n_ctx"]  # llama-server's /v1/models
        if isinstance(entry.get("max_model_len"), int):
            return entry["max_model_len"]  # vLLM's
    if _Server.kind == "llama.cpp":
        props = root_json("/props") or {}
        settings = props.get("default_generation_settings") or {}
        n_ctx = settings.get("n_ctx") or props.get("n_ctx")
        if isinstance(n_ctx, int):
            return n_ctx
    return None


def server():
    if _Server.probed:
        return _Server
    _Server.probed = True
    try:
        status, headers, body = raw_request("GET", "/models", timeout=10.0)
    except (OSError, http.client.HTTPException) as exc:
        _Server.problem = "cannot reach %s: %s" % (BASE_URL, exc)
        return _Server
    _Server.models_status, _Server.models_body = status, body
    entries = []
    try:
        listing = json.loads(body.decode("utf-8", "replace"))
        entries = [entry for entry in listing.get("data") or []
                   if isinstance(entry, dict) and isinstance(entry.get("id"), str)]
    except (ValueError, AttributeError):
        pass
    ids = [entry["id"] for entry in entries]
    _Server.kind, _Server.evidence = detect(headers, entries)
    _Server.model_ids, _Server.n_ctx = ids, context_size(entries)
    _Server.model = ENV.get("LLM_TEST_MODEL", "") or (ids[0] if ids else "")
    exact = ENV.get("LLM_TEST_EXACT", "")
    _Server.exact = exact == "1" or (exact != "0" and "tiny" in ids)
    match = re.search(r"timeout=(\d+)", headers.get("keep-alive", ""))
    _Server.keep_alive = int(match.group(1)) if match else None
    match = re.search(r"max=(\d+)", headers.get("keep-alive", ""))
    _Server.keep_alive_max = int(match.group(1)) if match else None
    return _Server


def busy_slots():
    """llama-server's GET /slots: {task id: tokens generated} of the busy slots; None elsewhere."""
    if server().kind != "llama.cpp":
        return None
    try:
        status, _, body = raw_request("GET", "/slots", root=True, timeout=5.0)
        slots = json.loads(body.decode("utf-8")) if status == 200 else None
    except (OSError, ValueError, http.client.HTTPException):
        return None
    if not isinstance(slots, list):
        return None
    busy = {}
    for slot in slots:
        if isinstance(slot, dict) and slot.get("is_processing"):
            tokens = [t.get("n_decoded", 0) for t in slot.get("next_token") or []
                      if isinstance(t, dict)]
            busy[slot.get("id_task")] = max(tokens or [0])
    return busy


def wait_for_tasks(tasks, limit=30.0):
    """Wait until none of ``tasks`` (ids from busy_slots) is still generating.

    llama-server goes on with a non-streamed generation after its client went
    away; its slots share one KV cache, so such leftovers can make the next
    request fail with "Context size has been exceeded". Only the tasks that a
    test itself left behind are waited for: the server may have other users.
    """
    end = time.monotonic() + limit
    while tasks and time.monotonic() < end:
        busy = busy_slots()
        if not busy or not set(busy) & set(tasks):
            return
        time.sleep(0.05)


class LeftBehind:
    """``with LeftBehind(): ...``: afterwards, wait for the generations begun inside."""

    def __enter__(self):
        self.before = set(busy_slots() or ())
        return self

    def __exit__(self, *exc_info):
        busy = busy_slots()
        if busy:
            wait_for_tasks(set(busy) - self.before)


def long_params(tokens=None):
    """Parameters for a generation that runs until max_tokens.

    On the tiny model, ``logit_bias`` bans its end token (260), so that it
    never stops by itself; other servers get a prompt that asks for a long
    answer (and the same harmless bias).
    """
    return {"max_tokens": tokens or LONG_TOKENS, "logit_bias": {"260": -1000}}


def abandoned_params():
    """A long generation that a non-streamed test walks away from.

    llama-server finishes such a generation anyway, in the KV cache that its
    slots share, so it is kept to half the usual length.
    """
    return long_params(max(1, LONG_TOKENS // 2))


def client(**options):
    settings = {"model": server().model, "api_key": API_KEY, "timeout": (10.0, 120.0)}
    settings.update(options)
    return llm.Client(BASE_URL, **settings)


class Recorder:
    """A writer for chat_stream that keeps every write and counts flushes."""

    def __init__(self, on_write=None):
        self.writes = []
        self.flushes = 0
        self.on_write = on_write

    def write(self, text):
        self.writes.append(text)
        if self.on_write is not None:
            self.on_write(self)

    def flush(self):
        self.flushes += 1

    @property
    def text(self):
        return "".join(self.writes)


# ---------------------------------------------------------------- base class


@unittest.skipUnless(BASE_URL or REQUIRE, _SKIP_REASON)
class LiveTestCase(unittest.TestCase):
    """Skips (or, with LLM_TEST_REQUIRE=1, fails) when there is no server to test."""

    @classmethod
    def setUpClass(cls):
        if not BASE_URL:
            raise AssertionError("LLM_TEST_REQUIRE=1 but LLM_TEST_BASE_URL is not set")
        found = server()
        if found.problem:
            if REQUIRE:
                raise AssertionError("LLM_TEST_REQUIRE=1 but " + found.problem)
            raise unittest.SkipTest(found.problem)
        cls.client = client()

    @classmethod
    def tearDownClass(cls):
        cls.client.close()

    def skip_or_fail(self, reason):
        """Skip, unless LLM_TEST_REQUIRE=1 asks for every case to run."""
        if REQUIRE:
            self.fail("LLM_TEST_REQUIRE=1, so this may not be skipped: " + reason)
        self.skipTest(reason)

    def assertAnswered(self, reply, reasons=("stop", "length")):
        self.assertEqual(reply.error, "", reply)
        self.assertTrue(reply.ok, reply)
        self.assertIn(reply.stop_reason, reasons, reply)
        self.assertEqual(reply.status, 200, reply)
        self.assertEqual(reply.role, "assistant")
        self.assertEqual(reply.error_kind, "")
        # none of the replies this suite asks for is wrong in a way the client can tell
        self.assertEqual(reply.warnings, [], reply)

    def assertUsage(self, usage):
        self.assertIsInstance(usage, dict)
        for name in ("prompt_tokens", "completion_tokens", "total_tokens"):
            self.assertIsInstance(usage.get(name), int, "%s in %r" % (name, usage))
        self.assertGreater(usage["prompt_tokens"], 0, usage)
        self.assertGreater(usage["completion_tokens"], 0, usage)
        self.assertGreaterEqual(usage["total_tokens"],
                                usage["prompt_tokens"] + usage["completion_tokens"], usage)

    def overflow_messages(self):
        """A prompt beyond the server's context window, sized from what the server says."""
        n_ctx = server().n_ctx
        words = n_ctx * 2 if n_ctx else FALLBACK_WORDS  # each word is at least one token
        return [{"role": "user", "content": "word " * words}]

    def overflow_status(self, body):
        """POST body as it is: the status, the raw answer; skips if the prompt was accepted."""
        status, _, raw = raw_request("POST", "/chat/completions", body)
        if status == 200 and body.get("stream") and not raw.strip():
            self.skipTest("the server answers a streamed prompt beyond its context with HTTP 200"
                          " and an empty stream")
        if status == 200:
            self.skipTest(
                "the server accepted a prompt of %d words (context %s): it has a larger"
                " context or cuts long prompts (Ollama does); LLM_TEST_CONTEXT=tokens sizes it"
                % (len(body["messages"][0]["content"].split()), server().n_ctx or "not reported"))
        return status, raw

    @staticmethod
    def server_message(body):
        """The message of the server's own error body, as llm.py would shorten it."""
        try:
            answer = json.loads(body.decode("utf-8", "replace"))
        except ValueError:
            return ""
        message = None
        if isinstance(answer, dict):
            for key in ("error", "detail", "message"):
                if answer.get(key):
                    message = answer[key]
                    break
        if isinstance(message, dict):
            message = message.get("message")
        return " ".join(message.split())[:200] if isinstance(message, str) else ""

    def require_tool_calls(self, streamed, params):
        """Skip unless the server itself answers tool_choice "required" with a tool call."""
        body = dict(params, model=server().model, stream=streamed,
                    messages=[{"role": "user", "content": "What is the weather in Paris?"}])
        status, _, raw = raw_request("POST", "/chat/completions", body)
        if status != 200:
            self.skipTest("the server refuses tool_choice \"required\": HTTP %d: %s"
                          % (status, self.server_message(raw) or raw[:100]))
        if streamed:
            found = any((choice.get("delta") or {}).get("tool_calls")
                        for payload in sse_payloads(raw) for choice in payload.get("choices") or []
                        if isinstance(choice, dict))
        else:
            choices = json.loads(raw.decode("utf-8")).get("choices") or [{}]
            found = (choices[0].get("message") or {}).get("tool_calls")
        if not found:
            self.skipTest("the server answers tool_choice \"required\" with no tool call%s"
                          % (" when streaming" if streamed else ""))

    def require_json_schema(self, streamed):
        """Skip unless the server itself answers a json_schema response_format."""
        status, _, raw = raw_request("POST", "/chat/completions", {
            "model": server().model, "messages": ASK, "response_format": GREETING_SCHEMA,
            "max_tokens": 256, "stream": streamed})
        if status != 200:
            self.skipTest("the server refuses a json_schema response_format: HTTP %d: %s"
                          % (status, self.server_message(raw) or raw[:100]))

    def streams_usage(self):
        """Whether the server reports usage in a stream when asked (asked once)."""
        if _Server.streams_usage is None:
            status, _, body = raw_request("POST", "/chat/completions", {
                "model": server().model, "messages": ASK, "max_tokens": 8, "stream": True,
                "stream_options": {"include_usage": True}})
            _Server.streams_usage = status == 200 and any(
                isinstance(p.get("usage"), dict) for p in sse_payloads(body))
        return _Server.streams_usage

    def assertHelloTokens(self, usage):
        """The tiny model's greeting is 6 tokens and the end token: llama-server and
        vLLM count 7, llama-cpp-python 6."""
        self.assertIn(usage["completion_tokens"], (6, 7), usage)

    def require_server(self, kind):
        """Skip unless the server said it is ``kind`` (never fails under LLM_TEST_REQUIRE)."""
        if server().kind != kind:
            self.skipTest("checks %s's own words; this server is %s (%s)"
                          % (kind, server().kind or "not one this suite knows", server().evidence))


# ---------------------------------------------------------------- chat and stream


class Chat(LiveTestCase):

    def test_chat_answers_with_valid_stop_reason_and_content(self):
        reply = self.client.chat(ASK, max_tokens=64)
        self.assertAnswered(reply)
        self.assertTrue(reply.content.strip(), reply)
        self.assertEqual(reply.tool_calls, [])

    def test_chat_accepts_llm_message_objects(self):
        reply = self.client.chat([llm.Message("user", ASK[0]["content"])], max_tokens=64)
        self.assertAnswered(reply)
        self.assertTrue(reply.content.strip(), reply)

    def test_content_as_a_list_of_text_parts(self):
        parts = [{"type": "text", "text": "Say hello"}, {"type": "text", "text": " in one sentence."}]
        reply = self.client.chat([llm.Message("user", parts)], max_tokens=64)
        self.assertAnswered(reply)
        self.assertTrue(reply.content.strip(), reply)

    def test_stream_writes_concatenate_to_content(self):
        out = Recorder()
        reply = self.client.chat_stream(ASK, out, max_tokens=64)
        self.assertAnswered(reply)
        self.assertGreater(len(out.writes), 1, "one write only: %r" % out.writes)
        self.assertTrue(all(isinstance(piece, str) and piece for piece in out.writes), out.writes)
        self.assertEqual(out.text, reply.content)
        self.assertTrue(reply.content.strip(), reply)

    def test_stream_flushes_after_each_write(self):
        out = Recorder()
        reply = self.client.chat_stream(ASK, out, max_tokens=64)
        self.assertAnswered(reply)
        self.assertEqual(out.flushes, len(out.writes))

    def test_stream_iterator_pieces_concatenate_to_content(self):
        stream = self.client.stream(ASK, max_tokens=64)
        pieces = list(stream)
        reply = stream.response
        self.assertAnswered(reply)
        self.assertGreater(len(pieces), 1, pieces)
        self.assertEqual("".join(pieces), reply.content)

    def test_sse_writer_relays_each_delta_then_done(self):
        sink = io.BytesIO()
        reply = self.client.chat_stream(ASK, llm.SSEWriter(sink), max_tokens=64)
        self.assertAnswered(reply)
        events = sink.getvalue().decode("utf-8").split("\n\n")
        self.assertEqual(events[-2:], ["data: [DONE]", ""])
        contents = [json.loads(event[len("data: "):])["content"] for event in events[:-2]]
        self.assertGreater(len(contents), 1)
        self.assertEqual("".join(contents), reply.content)

    def test_max_tokens_3_gives_length(self):
        reply = self.client.chat(ASK, max_tokens=3)
        self.assertAnswered(reply, reasons=("length",))

    def test_streamed_max_tokens_3_gives_length(self):
        out = Recorder()
        reply = self.client.chat_stream(ASK, out, max_tokens=3)
        self.assertAnswered(reply, reasons=("length",))
        self.assertEqual(out.text, reply.content)

    def test_usage_present_when_server_reports_it(self):
        status, _, body = raw_request("POST", "/chat/completions", {
            "model": server().model, "messages": ASK, "max_tokens": 64})
        self.assertEqual(status, 200, body[:300])
        if not isinstance(json.loads(body.decode("utf-8")).get("usage"), dict):
            self.skip_or_fail("the server reports no usage without streaming")
        reply = self.client.chat(ASK, max_tokens=64)
        self.assertAnswered(reply)
        self.assertUsage(reply.usage)

    def test_streamed_usage_present_when_server_reports_it(self):
        status, _, body = raw_request("POST", "/chat/completions", {
            "model": server().model, "messages": ASK, "max_tokens": 64, "stream": True,
            "stream_options": {"include_usage": True}})
        self.assertEqual(status, 200, body[:300])
        if not any(isinstance(p.get("usage"), dict) for p in sse_payloads(body)):
            self.skip_or_fail("the server reports no usage in a stream")
        reply = self.client.chat_stream(ASK, Recorder(), max_tokens=64)
        self.assertAnswered(reply)
        self.assertUsage(reply.usage)

    def test_response_carries_model_and_id(self):
        reply = self.client.chat(ASK, max_tokens=8)
        self.assertAnswered(reply)
        self.assertTrue(reply.id, reply)
        self.assertTrue(reply.model, reply)

    def test_module_level_chat_reads_the_environment(self):
        names = ("LLM_BASE_URL", "LLM_MODEL", "LLM_API_KEY", "OPENAI_BASE_URL",
                 "OPENAI_API_KEY", "OLLAMA_HOST")
        saved = dict((name, os.environ.get(name)) for name in names)
        try:
            for name in names:
                os.environ.pop(name, None)
            os.environ.update(LLM_BASE_URL=BASE_URL, LLM_MODEL=server().model,
                              LLM_API_KEY=API_KEY)
            reply = llm.chat(ASK, max_tokens=32)
            out = Recorder()
            streamed = llm.chat_stream(ASK, out, max_tokens=32)
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
        self.assertAnswered(reply)
        self.assertAnswered(streamed)
        self.assertEqual(out.text, streamed.content)


# ---------------------------------------------------------------- tools and formats


class Tools(LiveTestCase):

    def call_tool(self, streamed):
        out = Recorder()
        params = {"tools": [WEATHER_TOOL], "tool_choice": "required", "max_tokens": 256}
        self.require_tool_calls(streamed, params)
        if streamed:
            reply = self.client.chat_stream(
                [{"role": "user", "content": "What is the weather in Paris?"}], out, **params)
        else:
            reply = self.client.chat(
                [{"role": "user", "content": "What is the weather in Paris?"}], **params)
        self.assertAnswered(reply, reasons=("tool_calls", "stop"))
        self.assertEqual(reply.stop_reason, "tool_calls", reply)
        self.assertGreaterEqual(len(reply.tool_calls), 1, reply)
        for call in reply.tool_calls:
            self.assertEqual(call.name, "get_weather")
            self.assertTrue(call.id, call)
            self.assertIsInstance(json.loads(call.arguments), dict, call)
            self.assertEqual(call.args, json.loads(call.arguments))
        self.assertEqual(out.text, reply.content)
        return reply

    def round_trip(self, streamed):
        history = [{"role": "user", "content": "What is the weather in Paris?"}]
        reply = self.call_tool(streamed)
        message = reply.to_message()
        self.assertEqual(message["role"], "assistant")
        self.assertEqual([c["function"]["name"] for c in message["tool_calls"]],
                         [c.name for c in reply.tool_calls])
        history.append(message)
        for call in reply.tool_calls:
            history.append({"role": "tool", "tool_call_id": call.id,
                            "content": json.dumps({"city": "Paris", "temperature_c": 21})})
        out = Recorder()
        if streamed:
            answer = self.client.chat_stream(history, out, tools=[WEATHER_TOOL], max_tokens=128)
        else:
            answer = self.client.chat(history, tools=[WEATHER_TOOL], max_tokens=128)
        self.assertAnswered(answer)
        self.assertTrue(answer.content.strip(), answer)
        self.assertEqual(answer.tool_calls, [])
        if streamed:
            self.assertEqual(out.text, answer.content)
        return answer

    def test_tool_choice_required_gives_tool_call_with_json_arguments(self):
        self.call_tool(streamed=False)

    def test_streamed_tool_choice_required_gives_tool_call_with_json_arguments(self):
        self.call_tool(streamed=True)

    def test_tool_result_round_trip_gets_text_answer(self):
        self.round_trip(streamed=False)

    def test_streamed_tool_result_round_trip_gets_text_answer(self):
        self.round_trip(streamed=True)

    def test_response_format_json_schema_content_parses(self):
        self.require_json_schema(False)
        reply = self.client.chat(ASK, response_format=GREETING_SCHEMA, max_tokens=256)
        self.assertAnswered(reply, reasons=("stop",))
        value = json.loads(reply.content)
        self.assertIsInstance(value.get("greeting"), str, value)
        self.assertIsInstance(value.get("count"), int, value)

    def test_streamed_response_format_json_schema_content_parses(self):
        self.require_json_schema(True)
        out = Recorder()
        reply = self.client.chat_stream(ASK, out, response_format=GREETING_SCHEMA, max_tokens=256)
        self.assertAnswered(reply, reasons=("stop",))
        self.assertEqual(out.text, reply.content)
        value = json.loads(reply.content)
        self.assertIsInstance(value.get("greeting"), str, value)
        self.assertIsInstance(value.get("count"), int, value)


# ---------------------------------------------------------------- errors and the server's other answers


class Errors(LiveTestCase):

    def check_overflow(self, streamed):
        messages = self.overflow_messages()
        body = {"model": server().model, "messages": messages, "max_tokens": 1}
        if streamed:
            body.update(stream=True, stream_options={"include_usage": True})
        status, _, raw = raw_request("POST", "/chat/completions", body)
        out = Recorder()
        if status == 200 and streamed and not raw.strip():
            # llama-cpp-python: HTTP 200, then a stream with no event at all
            reply = self.client.chat_stream(messages, out, max_tokens=1)
            self.assertEqual((reply.stop_reason, reply.content, out.writes), ("error", "", []))
            self.skipTest("the server answers a streamed prompt beyond its context with HTTP 200"
                          " and an empty stream: no message to carry (llm.py: %r)" % reply.error)
        status, raw = self.overflow_status(body)
        self.assertGreaterEqual(status, 400, raw[:300])
        if streamed:
            reply = self.client.chat_stream(messages, out, max_tokens=1)
        else:
            reply = self.client.chat(messages, max_tokens=1)
        self.assertEqual(reply.stop_reason, "error", reply)
        self.assertFalse(reply.ok)
        self.assertEqual(reply.status, status, reply)
        self.assertEqual(reply.content, "")
        self.assertEqual(out.writes, [])
        self.assertTrue(reply.error.startswith("HTTP %d: " % status), reply.error)
        message = self.server_message(raw)
        self.assertTrue(message, "the server sent no message: %r" % raw[:300])
        self.assertIn(message[:100], reply.error)
        self.assertNotIn("\n", reply.error)
        self.assertLessEqual(len(reply.error), 400)
        self.assertEqual(reply.error_kind, "context_overflow", reply)
        numbers = reply.overflow or {}
        if "context_length" in numbers and server().n_ctx:
            self.assertEqual(numbers["context_length"], server().n_ctx, reply)
        if "prompt_tokens" in numbers:  # each word one token at least
            self.assertGreaterEqual(numbers["prompt_tokens"], len(messages[0]["content"].split()))
        return reply

    def test_prompt_beyond_context_gives_error_with_server_message(self):
        self.check_overflow(streamed=False)

    def test_streamed_prompt_beyond_context_gives_error_with_server_message(self):
        self.check_overflow(streamed=True)

    def test_client_works_after_an_error_response(self):
        reply = self.client.chat(self.overflow_messages(), max_tokens=1)
        if reply.ok:
            self.skipTest("the server accepted a prompt beyond the context it reports (%s)"
                          % (server().n_ctx or "none"))
        self.assertEqual(reply.stop_reason, "error", reply)
        self.assertGreaterEqual(reply.status, 400, reply)
        self.assertAnswered(self.client.chat(ASK, max_tokens=16))

    def test_models_endpoint_lists_the_model(self):
        status, headers, body = raw_request("GET", "/models")
        self.assertEqual(status, 200, body[:300])
        self.assertIn("json", headers.get("content-type", ""))
        listing = json.loads(body.decode("utf-8"))
        self.assertEqual(listing.get("object"), "list", listing)
        self.assertIsInstance(listing.get("data"), list)
        self.assertGreater(len(listing["data"]), 0, listing)
        ids = [entry.get("id") for entry in listing["data"]]
        self.assertTrue(all(isinstance(i, str) and i for i in ids), ids)
        model = ENV.get("LLM_TEST_MODEL", "")
        if model:  # Ollama lists "llama3.2:latest" for "llama3.2"
            self.assertTrue(model in ids or model + ":latest" in ids, (model, ids))
        if hasattr(self.client, "models"):  # llm.py's own call reads the same list
            found = self.client.models()
            self.assertEqual(list(found), ids)
            self.assertEqual((getattr(found, "error", ""), getattr(found, "status", 200)),
                             ("", 200))


@unittest.skipUnless(BASE_URL or REQUIRE, _SKIP_REASON)
class Auth(unittest.TestCase):
    """Against LLM_TEST_AUTH_BASE_URL, a server that wants LLM_TEST_AUTH_KEY."""

    @classmethod
    def setUpClass(cls):
        if not AUTH_BASE_URL:
            if REQUIRE:
                raise AssertionError("LLM_TEST_REQUIRE=1 but LLM_TEST_AUTH_BASE_URL is not set")
            raise unittest.SkipTest("LLM_TEST_AUTH_BASE_URL is not set (a server that wants a key)")
        try:
            raw_request("GET", "/models", base_url=AUTH_BASE_URL, api_key=AUTH_KEY, timeout=10.0)
        except (OSError, http.client.HTTPException) as exc:
            if REQUIRE:
                raise AssertionError("LLM_TEST_REQUIRE=1 but cannot reach %s: %s"
                                     % (AUTH_BASE_URL, exc))
            raise unittest.SkipTest("cannot reach %s: %s" % (AUTH_BASE_URL, exc))
        cls.model = ENV.get("LLM_TEST_MODEL", "") or server().model

    def wrong_key_client(self, key):
        return llm.Client(AUTH_BASE_URL, model=self.model, api_key=key, timeout=(10.0, 60.0))

    def refused_with(self, key):
        """The server's own answer to ``key``: (status, message)."""
        status, _, body = raw_request("POST", "/chat/completions", {
            "model": self.model, "messages": ASK, "max_tokens": 8},
            base_url=AUTH_BASE_URL, api_key=key)
        return status, LiveTestCase.server_message(body) or body[:100]

    def expect_401(self, reply, key):
        """401 as the server said, or a skip naming the server's other answer."""
        status, message = self.refused_with(key)
        self.assertGreaterEqual(status, 400, message)
        self.assertEqual(reply.status, status, reply)
        self.assertTrue(reply.error.startswith("HTTP %d" % status), reply.error)
        if status in (401, 403):
            self.assertEqual(reply.error_kind, "auth")
        if status != 401:
            self.skipTest("the server answers a %s key with HTTP %d, not 401: %s"
                          % ("wrong" if key else "missing", status, message))

    def check_wrong_key(self, streamed):
        key = "sk-live-%s" % uuid.uuid4().hex
        wrong = self.wrong_key_client(key)
        out = Recorder()
        reply = wrong.chat_stream(ASK, out) if streamed else wrong.chat(ASK)
        self.assertEqual(reply.stop_reason, "error", reply)
        self.assertEqual(reply.content, "")
        self.assertEqual(out.writes, [])
        texts = [reply.error, repr(reply), repr(wrong), str(reply.to_message())]
        if hasattr(wrong, "models"):  # the models call answers with an error too
            found = wrong.models()
            self.assertEqual(list(found), [])
            self.assertGreaterEqual(getattr(found, "status", 401), 400)
            texts.append(getattr(found, "error", ""))
        for text in texts:
            self.assertNotIn(key, text)
            self.assertNotIn(key[8:], text)
        wrong.close()
        self.expect_401(reply, key)

    def test_wrong_api_key_gives_401_without_the_key(self):
        self.check_wrong_key(streamed=False)

    def test_streamed_wrong_api_key_gives_401_without_the_key(self):
        self.check_wrong_key(streamed=True)

    def test_missing_api_key_gives_401(self):
        missing = self.wrong_key_client("")
        reply = missing.chat(ASK)
        missing.close()
        self.assertEqual(reply.stop_reason, "error", reply)
        self.expect_401(reply, "")

    def test_right_api_key_is_accepted(self):
        right = self.wrong_key_client(AUTH_KEY)
        reply = right.chat(ASK, max_tokens=16)
        self.assertTrue(reply.ok, reply)
        self.assertEqual(reply.status, 200)
        streamed = right.chat_stream(ASK, Recorder(), max_tokens=16)
        self.assertTrue(streamed.ok, streamed)
        self.assertNotIn(AUTH_KEY, repr(right))
        right.close()


# ---------------------------------------------------------------- threads, cancel, timeouts


class Concurrency(LiveTestCase):

    def test_eight_threads_share_one_client(self):
        shared = client()
        results, failures = [], []
        lock = threading.Lock()

        def work(number):
            try:
                for turn in range(4):
                    kind = (number + turn) % 3
                    if kind == 0:
                        reply, written = shared.chat(ASK, max_tokens=32), None
                    elif kind == 1:
                        out = Recorder()
                        reply, written = shared.chat_stream(ASK, out, max_tokens=32), out.text
                    else:
                        stream = shared.stream(ASK, max_tokens=32)
                        written = "".join(stream)
                        reply = stream.response
                    with lock:
                        results.append((number, kind, reply, written))
            except BaseException as exc:  # a raise is itself a failure of the library
                with lock:
                    failures.append((number, repr(exc)))

        threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        self.assertFalse(any(thread.is_alive() for thread in threads), "a thread hung")
        self.assertEqual(failures, [])
        self.assertEqual(len(results), 32)
        for number, kind, reply, written in results:
            self.assertAnswered(reply)
            self.assertTrue(reply.content.strip(), reply)
            if written is not None:
                self.assertEqual(written, reply.content)
            if server().exact:
                self.assertEqual(reply.content, HELLO)
        shared.close()

    def test_cancel_from_another_thread_ends_long_stream_quickly(self):
        shared = client()
        started = threading.Event()
        moments = {}

        def on_write(out):
            if len(out.writes) >= 20:
                started.set()

        def canceller():
            if started.wait(60):  # well inside the stream
                moments["cancel"] = time.monotonic()
                shared.cancel()

        thread = threading.Thread(target=canceller)
        thread.start()
        out = Recorder(on_write)
        reply = shared.chat_stream(LONG_ASK, out, **long_params())
        ended = time.monotonic()
        started.set()  # let the canceller end if the stream ended on its own
        thread.join(70)
        self.assertIn("cancel", moments, "the stream ended before the cancel: %r" % reply)
        self.assertEqual(reply.stop_reason, "cancelled", reply)
        self.assertFalse(reply.ok)
        self.assertLess(ended - moments["cancel"], CANCEL_GRACE)
        self.assertTrue(reply.content, reply)
        self.assertEqual(out.text, reply.content)
        if server().exact:
            self.assertTrue(reply.content.startswith(HELLO), reply.content[:80])
        after = shared.chat(ASK, max_tokens=16)
        self.assertAnswered(after)
        after_stream = shared.chat_stream(ASK, Recorder(), max_tokens=16)
        self.assertAnswered(after_stream)
        shared.close()

    def test_cancel_from_another_thread_ends_non_streamed_call_quickly(self):
        shared = client()
        moments, over = {}, threading.Event()

        def connected():
            sock = call_socket(shared)
            try:
                return sock is not None and sock.getpeername() is not None
            except OSError:  # not yet connected, or closed
                return False

        def canceller():
            # once the call is connected: it sends its request and waits for the answer, which
            # takes seconds
            if wait_until(lambda: over.is_set() or connected(), 60) and not over.is_set():
                moments["cancel"] = time.monotonic()
                shared.cancel()

        with LeftBehind():  # its probe of the server comes before the clocks start
            thread = threading.Thread(target=canceller)
            thread.start()
            start = time.monotonic()
            reply = shared.chat(LONG_ASK, **abandoned_params())
            ended = time.monotonic()
            over.set()  # let the canceller end if the call ended first
        thread.join(10)
        if reply.ok and ended < moments.get("cancel", ended + 1):
            self.skip_or_fail("the generation ended in %.2fs, before the cancel" % (ended - start))
        self.assertEqual(reply.stop_reason, "cancelled", reply)
        self.assertLess(ended - moments["cancel"], CANCEL_GRACE)
        self.assertAnswered(shared.chat(ASK, max_tokens=16))
        shared.close()

    def test_stream_close_ends_iteration_as_cancelled(self):
        stream = self.client.stream(LONG_ASK, **long_params())
        pieces = []
        for piece in stream:
            pieces.append(piece)
            if len(pieces) == 10:
                break
        start = time.monotonic()
        stream.close()
        reply = stream.response
        self.assertLess(time.monotonic() - start, CANCEL_GRACE)
        self.assertEqual(reply.stop_reason, "cancelled", reply)
        self.assertEqual(reply.content, "".join(pieces))
        self.assertAnswered(self.client.chat(ASK, max_tokens=16))

    def test_deadline_shorter_than_long_stream_keeps_partial_text(self):
        bounded = client(deadline=1.0)
        out = Recorder()
        start = time.monotonic()
        reply = bounded.chat_stream(LONG_ASK, out, **long_params())
        elapsed = time.monotonic() - start
        self.assertEqual(reply.stop_reason, "error", reply)
        self.assertIn("deadline", reply.error)
        self.assertTrue(reply.content, "no partial text kept: %r" % reply)
        self.assertEqual(out.text, reply.content)
        self.assertLess(elapsed, 1.0 + CANCEL_GRACE)
        self.assertGreaterEqual(elapsed, 0.9)
        if server().exact:  # as far as a loaded server got in a second
            self.assertTrue(reply.content.startswith(HELLO) or HELLO.startswith(reply.content),
                            reply.content[:80])
        bounded.close()

    def test_deadline_shorter_than_non_streamed_generation_gives_error(self):
        bounded = client(deadline=0.3)
        with LeftBehind():
            start = time.monotonic()
            reply = bounded.chat(LONG_ASK, **abandoned_params())
            elapsed = time.monotonic() - start
        self.assertEqual(reply.stop_reason, "error", reply)
        self.assertIn("deadline", reply.error)
        self.assertGreaterEqual(elapsed, 0.25)
        self.assertLess(elapsed, 0.3 + CANCEL_GRACE)
        bounded.close()

    def test_read_timeout_shorter_than_non_streamed_generation_gives_error(self):
        bounded = client(timeout=(10.0, 0.2))
        with LeftBehind():
            start = time.monotonic()
            reply = bounded.chat(LONG_ASK, **abandoned_params())
            elapsed = time.monotonic() - start
        self.assertEqual(reply.stop_reason, "error", reply)
        self.assertIn("timed out", reply.error)
        self.assertEqual(reply.status, 0, reply)  # no answer arrived
        self.assertGreaterEqual(elapsed, 0.15)
        self.assertLess(elapsed, 0.2 + CANCEL_GRACE)
        bounded.close()
        # the same server, asked with a normal timeout, answers the next call
        self.assertAnswered(self.client.chat(ASK, max_tokens=16))

    def test_read_timeout_longer_than_token_gaps_lets_long_stream_finish(self):
        bounded = client(timeout=(10.0, 5.0))
        out = Recorder()
        reply = bounded.chat_stream(LONG_ASK, out, max_tokens=200, logit_bias={"260": -1000})
        self.assertAnswered(reply)
        self.assertEqual(out.text, reply.content)
        if server().exact:
            self.assertEqual(reply.stop_reason, "length")
        bounded.close()


class KeepAlive(LiveTestCase):

    def test_more_calls_than_the_keep_alive_max_on_one_client(self):
        most = server().keep_alive_max
        if most is None or most > 500:
            self.skipTest("the server announces no small Keep-Alive max (%r)" % most)
        reused = client()
        for number in range(most + 10):
            if number % 2:
                reply = reused.chat(ASK, max_tokens=2)
            else:
                out = Recorder()
                reply = reused.chat_stream(ASK, out, max_tokens=2)
                self.assertEqual(out.text, reply.content)
            self.assertAnswered(reply)
        reused.close()

    def test_connection_closed_by_server_while_idle_is_reopened(self):
        idle = server().keep_alive
        if idle is None or idle > 15:
            self.skipTest("the server announces no short Keep-Alive timeout (%r)" % idle)
        reused = client()
        self.assertAnswered(reused.chat(ASK, max_tokens=8))
        # the server closes the idle connection meanwhile
        self.assertTrue(readable(idle_socket(reused), idle + 10), "the idle connection stayed open")
        out = Recorder()
        reply = reused.chat_stream(ASK, out, max_tokens=8)
        self.assertAnswered(reply)
        self.assertEqual(out.text, reply.content)
        reused.close()


# ---------------------------------------------------------------- exact answers of the tiny model


class ExactAnswers(LiveTestCase):
    """The tiny deterministic model of shared/realserver (see its README), on any server."""

    @classmethod
    def setUpClass(cls):
        if BASE_URL and not server().problem and not server().exact:
            raise unittest.SkipTest("not the tiny model (/v1/models does not list \"tiny\";"
                                    " LLM_TEST_EXACT=1 forces these)")
        super(ExactAnswers, cls).setUpClass()

    def test_chat_says_hello_from_a_tiny_llama(self):
        reply = self.client.chat(ASK)
        self.assertEqual((reply.content, reply.stop_reason), (HELLO, "stop"))
        self.assertHelloTokens(reply.usage)
        self.assertEqual(reply.usage["total_tokens"],
                         reply.usage["prompt_tokens"] + reply.usage["completion_tokens"])
        self.assertEqual(reply.model, "tiny")
        self.assertTrue(reply.id.startswith("chatcmpl-"), reply.id)

    def test_stream_says_hello(self):
        out = Recorder()
        reply = self.client.chat_stream(ASK, out)
        self.assertEqual((reply.content, reply.stop_reason), (HELLO, "stop"))
        self.assertEqual(out.text, HELLO)
        self.assertGreater(len(out.writes), 1, out.writes)
        if self.streams_usage():
            self.assertHelloTokens(reply.usage)
        else:  # llama-cpp-python ignores include_usage
            self.assertIsNone(reply.usage)

    def test_stream_without_usage_request_has_no_usage(self):
        quiet = client(stream_usage=False)
        reply = quiet.chat_stream(ASK, Recorder())
        self.assertEqual(reply.content, HELLO)
        self.assertIsNone(reply.usage)
        quiet.close()

    def test_max_tokens_3_says_hello_from_a(self):
        reply = self.client.chat(ASK, max_tokens=3)
        self.assertEqual((reply.content, reply.stop_reason), ("Hello from a", "length"))
        self.assertEqual(reply.usage["completion_tokens"], 3)
        streamed = self.client.chat_stream(ASK, Recorder(), max_tokens=3)
        self.assertEqual((streamed.content, streamed.stop_reason), ("Hello from a", "length"))

    def test_stop_sequence_cuts_before_tiny(self):
        reply = self.client.chat(ASK, stop=[" tiny"])
        self.assertEqual((reply.content, reply.stop_reason), ("Hello from a", "stop"))
        streamed = self.client.chat_stream(ASK, Recorder(), stop=[" tiny"])
        self.assertEqual((streamed.content, streamed.stop_reason), ("Hello from a", "stop"))

    def check_tool_call(self, reply):
        self.assertEqual(reply.stop_reason, "tool_calls", reply)
        self.assertEqual(len(reply.tool_calls), 1, reply.tool_calls)
        call = reply.tool_calls[0]
        self.assertEqual(call.name, "get_weather")
        self.assertEqual(call.args, {"city": HELLO})
        self.assertEqual(json.loads(call.arguments), {"city": HELLO})
        self.assertEqual(reply.content, "")
        self.assertIsNone(reply.to_message()["content"])

    def test_tool_call_arguments(self):
        messages = [{"role": "user", "content": "Weather in Paris?"}]
        self.require_tool_calls(False, {"tools": [WEATHER_TOOL], "tool_choice": "required"})
        self.check_tool_call(self.client.chat(messages, tools=[WEATHER_TOOL], tool_choice="required"))
        self.check_tool_call(self.client.chat(messages, tools=[WEATHER_TOOL], tool_choice="auto"))

    def test_streamed_tool_call_arguments(self):
        self.require_tool_calls(True, {"tools": [WEATHER_TOOL], "tool_choice": "required"})
        out = Recorder()
        reply = self.client.chat_stream([{"role": "user", "content": "Weather in Paris?"}], out,
                                        tools=[WEATHER_TOOL], tool_choice="required")
        self.check_tool_call(reply)
        self.assertEqual(out.writes, [])

    def test_tool_result_answer(self):
        messages = [{"role": "user", "content": "Weather in Paris?"}]
        self.require_tool_calls(False, {"tools": [WEATHER_TOOL], "tool_choice": "required"})
        reply = self.client.chat(messages, tools=[WEATHER_TOOL], tool_choice="required")
        messages += [reply.to_message(), {"role": "tool", "tool_call_id": reply.tool_calls[0].id,
                                          "content": "21 degrees"}]
        answer = self.client.chat(messages, tools=[WEATHER_TOOL])
        self.assertEqual((answer.content, answer.stop_reason), (HELLO, "stop"))
        streamed = self.client.chat_stream(messages, Recorder(), tools=[WEATHER_TOOL])
        self.assertEqual((streamed.content, streamed.stop_reason), (HELLO, "stop"))

    def test_json_schema_answer(self):
        self.require_json_schema(False)
        self.require_json_schema(True)
        expected = '{"greeting":"Hello from a tiny llama!","count":1}'
        reply = self.client.chat(ASK, response_format=GREETING_SCHEMA)
        self.assertEqual((reply.content, reply.stop_reason), (expected, "stop"))
        streamed = self.client.chat_stream(ASK, Recorder(), response_format=GREETING_SCHEMA)
        self.assertEqual((streamed.content, streamed.stop_reason), (expected, "stop"))

    def test_streamed_two_choices_give_the_first_choice(self):
        # servers stream the choices of n=2 in chunks of their own, in either order
        # (llama-server) or interleaved (vLLM); a reply keeps to the choice of index 0,
        # as a non-streamed one does
        status, _, body = raw_request("POST", "/chat/completions", {
            "model": server().model, "messages": ASK, "n": 2})
        choices = json.loads(body.decode("utf-8")).get("choices") if status == 200 else None
        if not choices or len(choices) != 2:
            self.skipTest("the server does not answer n=2 with two choices (HTTP %d: %r)"
                          % (status, body[:200]))
        self.assertEqual(self.client.chat(ASK, n=2).content, HELLO)
        out = Recorder()
        reply = self.client.chat_stream(ASK, out, n=2)
        self.assertEqual((reply.content, out.text), (HELLO, HELLO))

    def test_models_lists_tiny(self):
        self.assertIn("tiny", server().model_ids)


class ServerWordsCase(LiveTestCase):
    """Checks of one server's own wording; they run only on that server."""

    SERVER = ""

    def setUp(self):
        self.require_server(self.SERVER)

    def require_tiny(self):
        if not server().exact:
            self.skipTest("needs the tiny model of shared/realserver (LLM_TEST_EXACT=1)")

    def wrong_key_error(self):
        if not AUTH_BASE_URL:
            self.skip_or_fail("LLM_TEST_AUTH_BASE_URL is not set")
        wrong = llm.Client(AUTH_BASE_URL, model=server().model,
                           api_key="sk-wrong-" + uuid.uuid4().hex)
        reply = wrong.chat(ASK)
        wrong.close()
        return reply.error

    def image_reply(self):
        # a 1x1 PNG, to a text model
        import base64
        import tempfile
        png = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8DwHwAFBQ"
                               "IAX8jx0gAAAABJRU5ErkJggg==")
        handle, path = tempfile.mkstemp(suffix=".png")
        try:
            os.write(handle, png)
            os.close(handle)
            part = llm.image(path)
        finally:
            os.remove(path)
        self.assertTrue(part["image_url"]["url"].startswith("data:image/png;base64,"))
        message = llm.Message("user", [{"type": "text", "text": "What is this?"}, part])
        return self.client.chat([message])


class LlamaServerWords(ServerWordsCase):
    """llama.cpp's llama-server, as it says it is (Server: llama.cpp, GET /props)."""

    SERVER = "llama.cpp"

    def test_stream_says_hello_one_token_per_write(self):
        self.require_tiny()
        out = Recorder()
        reply = self.client.chat_stream(ASK, out)
        self.assertEqual(out.writes, ["Hello", " from", " a", " tiny", " llama", "!"])
        self.assertEqual(reply.content, HELLO)

    def test_tool_call_arguments_as_the_model_wrote_them(self):
        self.require_tiny()
        messages = [{"role": "user", "content": "Weather in Paris?"}]
        compact = json.dumps({"city": HELLO}, separators=(",", ":"))
        reply = self.client.chat(messages, tools=[WEATHER_TOOL], tool_choice="required")
        streamed = self.client.chat_stream(messages, Recorder(), tools=[WEATHER_TOOL],
                                           tool_choice="required")
        self.assertEqual([c.arguments for c in reply.tool_calls + streamed.tool_calls],
                         [compact, compact])

    def test_context_overflow_is_400_exceed_context_size(self):
        reply = self.client.chat(self.overflow_messages())
        self.assertEqual(reply.status, 400)
        self.assertRegex(reply.error, r"^HTTP 400: request \(\d+ tokens\) exceeds the available"
                                      r" context size \(\d+ tokens\)")
        # its structured error: n_prompt_tokens and n_ctx (tools/server/server-task.cpp)
        self.assertEqual((reply.error_kind, sorted(reply.overflow)),
                         ("context_overflow", ["context_length", "prompt_tokens"]))
        self.assertEqual(reply.overflow["context_length"], server().n_ctx)
        self.assertIn("request (%d tokens)" % reply.overflow["prompt_tokens"], reply.error)

    def test_timings_of_a_reply_whole_and_streamed(self):
        for reply in (self.client.chat(ASK, max_tokens=8),
                      self.client.chat_stream(ASK, Recorder(), max_tokens=8),
                      self.client.chat_stream(ASK, Recorder(), max_tokens=8,
                                              stream_options={"include_usage": False})):
            self.assertAnswered(reply)
            timings = reply.timings
            self.assertIsInstance(timings, dict, reply)
            for name in ("prompt_n", "predicted_n"):
                self.assertIsInstance(timings.get(name), int, timings)
            for name in ("prompt_ms", "prompt_per_second", "predicted_ms", "predicted_per_second"):
                self.assertIsInstance(timings.get(name), (int, float), timings)
            self.assertEqual(timings["predicted_n"], reply.usage["completion_tokens"]
                             if reply.usage else timings["predicted_n"])

    def test_stream_cut_by_server_error_keeps_partial_text_and_message(self):
        # A request with a long prompt fills most of the KV cache that the
        # server's slots share; a stream started meanwhile runs out of cache
        # after a few tokens, and the server ends it with an in-band error:
        #   data: {"error":{"code":500,"message":"Context size has been exceeded.",...}}
        self.require_tiny()
        if not EXCLUSIVE:
            self.skipTest("fills the server's KV cache; runs with LLM_TEST_EXCLUSIVE=1 only")
        if busy_slots() is None:
            self.skip_or_fail("the server has no GET /slots (llama-server has)")
        words = int((server().n_ctx or 4096) * 0.8 / 7)  # about 7 tokens per "word "
        filler = client()
        with LeftBehind():
            thread = threading.Thread(target=filler.chat, kwargs=dict(
                long_params(), messages=[{"role": "user", "content": "word " * words}]))
            thread.start()
            start = time.monotonic()
            while thread.is_alive() and time.monotonic() - start < 30:
                if any(tokens >= 50 for tokens in (busy_slots() or {}).values()):
                    break  # its prompt is in the cache and it generates
                time.sleep(0.005)
            out = Recorder()
            reply = self.client.chat_stream(ASK, out, **long_params())
            thread.join(60)
        filler.close()
        self.assertEqual(reply.stop_reason, "error", reply)
        self.assertEqual(reply.status, 200)
        self.assertEqual(reply.error, "Context size has been exceeded.")
        self.assertTrue(reply.content.startswith("Hello"), reply)
        self.assertEqual(out.text, reply.content)
        self.assertAnswered(self.client.chat(ASK, max_tokens=8))

    def test_image_part_on_a_text_model_gives_server_message(self):
        reply = self.image_reply()
        self.assertEqual((reply.stop_reason, reply.status), ("error", 500), reply)
        self.assertIn("image input is not supported", reply.error)

    def test_callers_rejected_stream_options_are_reported_not_dropped(self):
        # llama-server: HTTP 400 "Field 'include_usage': ... type must be boolean"
        asking = client()
        reply = asking.chat_stream(ASK, Recorder(), stream_options={"include_usage": "yes"})
        self.assertEqual((reply.stop_reason, reply.status), ("error", 400), reply)
        self.assertIn("include_usage", reply.error)
        later = asking.chat_stream(ASK, Recorder(), max_tokens=8)  # the client still asks for usage
        self.assertIsNotNone(later.usage, later)
        asking.close()

    def test_wrong_key_error_text(self):
        self.assertEqual(self.wrong_key_error(), "HTTP 401: Invalid API Key")


class VLLMWords(ServerWordsCase):
    """vLLM's OpenAI server, as it says it is (/v1/models owned_by vllm, GET /version)."""

    SERVER = "vllm"

    def test_tool_call_arguments_are_re_serialized(self):
        # vLLM's tool parser parses the model's JSON and writes it again, with spaces
        self.require_tiny()
        messages = [{"role": "user", "content": "Weather in Paris?"}]
        spaced = json.dumps({"city": HELLO})
        reply = self.client.chat(messages, tools=[WEATHER_TOOL], tool_choice="required")
        streamed = self.client.chat_stream(messages, Recorder(), tools=[WEATHER_TOOL],
                                           tool_choice="required")
        self.assertEqual([c.arguments for c in reply.tool_calls + streamed.tool_calls],
                         [spaced, spaced])
        self.assertTrue(all(c.id.startswith("chatcmpl-tool-") for c in streamed.tool_calls))

    def check_overflow(self, streamed):
        out = Recorder()
        if streamed:  # a 400 JSON answer, not an event stream
            reply = self.client.chat_stream(self.overflow_messages(), out, max_tokens=1)
        else:
            reply = self.client.chat(self.overflow_messages(), max_tokens=1)
        self.assertEqual((reply.stop_reason, reply.status), ("error", 400), reply)
        self.assertRegex(reply.error, r"^HTTP 400: This model's maximum context length is"
                                      r" \d+ tokens\. However, ")
        self.assertEqual(out.writes, [])
        # the numbers in its words; vLLM 0.32 tokenizes no more than the context and one token,
        # and says "at least N input tokens": a bound, not the prompt's size
        self.assertEqual((reply.error_kind, reply.overflow["context_length"]),
                         ("context_overflow", server().n_ctx))
        if "at least %d input tokens" % (server().n_ctx + 1) in reply.error:
            self.assertNotIn("prompt_tokens", reply.overflow)
        else:
            self.assertIn("%d input tokens" % reply.overflow["prompt_tokens"], reply.error)

    def test_context_overflow_is_400_maximum_context_length(self):
        self.check_overflow(streamed=False)

    def test_streamed_context_overflow_is_400_maximum_context_length(self):
        self.check_overflow(streamed=True)

    def test_image_part_on_a_text_model_gives_server_message(self):
        reply = self.image_reply()
        self.assertEqual((reply.stop_reason, reply.status), ("error", 400), reply)
        self.assertIn("is not a multimodal model", reply.error)

    def test_include_usage_yes_is_taken_as_true(self):
        reply = self.client.chat_stream(ASK, Recorder(), max_tokens=8,
                                        stream_options={"include_usage": "yes"})
        self.assertAnswered(reply)
        self.assertUsage(reply.usage)

    def test_unknown_model_is_404_naming_the_valid_ones(self):
        reply = self.client.chat(ASK, model="no-such-model", max_tokens=8)
        self.assertEqual((reply.stop_reason, reply.status), ("error", 404), reply)
        self.assertRegex(reply.error, r"^HTTP 404: The model `no-such-model` does not exist\.")
        self.assertIn(server().model, reply.error)

    def test_unknown_path_gives_fastapis_detail(self):
        scheme, host, port, _ = _split(BASE_URL)
        lost = llm.Client("%s://%s:%d/no/such/v1" % (scheme, host, port), model=server().model,
                          api_key=API_KEY)
        reply = lost.chat(ASK, max_tokens=8)
        found = lost.models()
        lost.close()
        base = "%s://%s/no/such/v1" % (scheme, llm._where(host, port))
        self.assertEqual((reply.status, reply.error),
                         (404, "HTTP 404: Not Found (POST %s/chat/completions)" % base))
        self.assertEqual((list(found), found.error),
                         ([], "HTTP 404: Not Found (GET %s/models)" % base))

    def test_wrong_key_error_text(self):
        self.assertEqual(self.wrong_key_error(), "HTTP 401: Unauthorized")


class Detected(LiveTestCase):

    def test_server_is_the_one_named(self):
        expected = ENV.get("LLM_TEST_SERVER", "")
        if not expected:
            self.skipTest("LLM_TEST_SERVER names no server to expect (detected: %s, from %s)"
                          % (server().kind or "unknown", server().evidence))
        self.assertEqual(server().kind, expected, server().evidence)


if __name__ == "__main__":
    unittest.main()
