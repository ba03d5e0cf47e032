"""llm.py: one file, standard library only, for every OpenAI-compatible chat server.

It speaks ``POST /v1/chat/completions`` to Ollama, vLLM, llama.cpp, LM Studio,
OpenAI, OpenRouter, Groq, DeepSeek and the rest, on Python 3.6 and later::

    import sys, llm

    client = llm.Client("http://localhost:11434", model="llama3.2")
    reply = client.chat_stream([{"role": "user", "content": "Hi!"}], sys.stdout)
    if not reply.ok:
        print(reply.error)

Nothing raises: a failure comes back as ``reply.stop_reason == "error"`` with a
readable ``reply.error``, and whatever arrived before it is kept.

License: MIT
"""

__version__ = "0.1.0"
__all__ = ["Client", "Message", "Response", "SSEWriter", "Stream", "ToolCall", "chat",
           "chat_stream", "image"]

import base64
import http.client
import json
import os
import socket
import sys
import threading
import time
import weakref
from urllib.parse import quote as _quote, urlsplit as _urlsplit  # loaded by http.client anyway

_TYPE_CHECKING = False  # typing costs import time; only the type checker reads these
if _TYPE_CHECKING:
    from typing import (Any, Dict, FrozenSet, Generator, Iterable, Iterator, List, Optional,
                        Protocol, Set, Tuple, Union)

    class _Writer(Protocol):
        """Anything with ``write(str)``: a file, ``sys.stdout``, an SSEWriter..."""

        def write(self, text: str) -> object: ...

    _Timeout = Union[float, Tuple[float, float]]

_DEFAULT_BASE_URL = "http://localhost:11434"
_DEFAULT_TIMEOUT = (30.0, 600.0)  # (connect, each read); a local model may think for minutes
_MAX_BYTES = 64 * 1024 * 1024  # a response body larger than this is refused
_READ_SIZE = 65536
_ERROR_BODY_LIMIT = 65536  # bytes of an error body that are read
_ERROR_TEXT_LIMIT = 300  # characters of a server's message that are kept
_MAX_TRAILERS = 65536  # bytes of trailer lines read after a chunked body's last chunk
_RETRY_STATUSES = frozenset((408, 409, 429, 500, 502, 503, 504))
_CROSSING = 0.05  # seconds: a close this soon after a request crossed it (see _unread)
_BACKOFF_FIRST, _BACKOFF_CAP, _RETRY_AFTER_CAP = 0.5, 30.0, 120.0
_STOP_REASONS = {
    "stop": "stop", "end_turn": "stop", "eos": "stop", "eos_token": "stop",
    "stop_sequence": "stop", "end": "stop",
    "length": "length", "max_tokens": "length", "max_output_tokens": "length",
    "model_length": "length",
    "tool_calls": "tool_calls", "tool_call": "tool_calls", "tool_use": "tool_calls",
    "function_call": "tool_calls",
    "content_filter": "content_filter", "safety": "content_filter",
    "recitation": "content_filter", "prohibited_content": "content_filter",
    # a server's own failure (OpenRouter's when a provider fails mid-reply)
    "error": "error", "cancelled": "error", "canceled": "error", "abort": "error", "aborted": "error",
}
_CREDENTIAL_WORDS = ("key", "token", "secret", "auth", "cookie", "password", "passwd", "sig",
                     "credential", "session")  # in a header or query field's name
_AUTH_SCHEMES = ("bearer", "basic", "token", "digest", "bot", "key", "apikey")
# what a client reads from the environment, besides the proxies (each ``*_proxy`` variable)
_ENVIRONMENT = ("LLM_BASE_URL", "LLM_MODEL", "LLM_API_KEY", "OPENAI_BASE_URL",
                "OPENAI_API_KEY", "OLLAMA_HOST", "LLM_TRACE", "REQUEST_METHOD", "SSL_CERT_FILE",
                "SSL_CERT_DIR")
_MAX_INT_DIGITS = 4000  # a longer integer in JSON is read as a float (int() is quadratic)
_MAX_TOOL_CALLS = 256  # a reply that asks for more tool calls than this is refused
_VALUE_COST = 100  # bytes a parsed JSON value may cost as a Python object, at most (a dict: 64+)
_CHECKED_SIZE = 65536  # JSON text longer than this is checked for its cost before parsing
_MAX_DEPTH = 256  # JSON nested deeper than this is refused (its parsing nears the recursion limit)
_SHALLOW_SIZE = 2 * _MAX_DEPTH  # JSON text no longer than this cannot nest deeper
_MAX_USAGE_KEYS = 64  # the fields of a usage object that are looked at
_NUMBERS = frozenset((int, float))  # what JSON numbers parse to (and no bool)
_USUAL_USAGE = frozenset(("prompt_tokens", "completion_tokens", "total_tokens"))
_UNMARKED = bytes(range(256)).translate(None, b'"[]{},:')  # what marks no JSON structure
_LOGPROB_COST = 512  # bytes a kept log-probability entry may cost: max_bytes // this are kept
# what a delta may carry beside its text
_ASIDES = frozenset(("reasoning_content", "reasoning", "tool_calls", "function_call", "refusal"))
_SSE_STARTS = (b":", b"data", b"event", b"id", b"retry", b"error")  # how an event stream begins
_DONE = object()  # the payload of ``data: [DONE]``
# C0 controls, DEL and C1, as they are shown where they must not act (a terminal, a trace)
_VISIBLE_CONTROLS = {c: "\\u%04x" % c for c in list(range(32)) + list(range(127, 160))}
_ANY = object()  # no choice index followed yet
_ASK_USAGE = {"include_usage": True}  # stream_options as the library adds it; never changed
_USAGE_FIELDS = frozenset(("stream_options", "stream_options.include_usage", "include_usage"))


# ---------------------------------------------------------------- public types


class Message(dict):  # type: ignore[type-arg]
    """A chat message: a plain dict in the OpenAI wire shape.

    ``Message("user", "Hi")`` equals ``{"role": "user", "content": "Hi"}``. Other
    fields (``name``, ``tool_calls``, ``tool_call_id``, ...) are keyword
    arguments. ``content`` may be a string or a list of parts, such as
    ``[{"type": "text", "text": "What is this?"}, llm.image("cat.png")]``.
    """

    def __init__(self, role: "Any" = "user", content: "Any" = None, **fields: "Any") -> None:
        dict.__init__(self, role=role, content=content, **fields)


class _BadPart(dict):  # type: ignore[type-arg]
    """A content part that could not be made; the call reports ``problem``."""

    def __init__(self, problem: str) -> None:
        dict.__init__(self, type="text", text="")
        self.problem = problem


def image(source: "Any", detail: "Optional[str]" = None) -> "Dict[str, Any]":
    """Return an ``image_url`` content part for ``source``.

    ``source`` is a local file (sent inline as a ``data:`` URL; PNG, JPEG, GIF
    or WebP) or an ``http(s)://`` or ``data:`` URL, passed as it is. ``detail``
    (``"low"``, ``"high"``, ``"auto"``) is added when given. A file that cannot
    be read does not raise: the call that sends it answers with the error.
    """
    try:
        if not isinstance(source, (str, bytes)) and not hasattr(source, "__fspath__"):
            raise TypeError("an image is a file path or a URL, not %s" % type(source).__name__)
        url = source if isinstance(source, str) and source.startswith(
            ("http://", "https://", "data:")) else _data_url(source)
    except Exception as exc:  # a public function: report, never raise
        return _BadPart("image %s: %s" % (_short_repr(source), _describe(exc)))
    part = {"url": url}  # type: Dict[str, Any]
    if detail is not None:
        part["detail"] = detail
    return {"type": "image_url", "image_url": part}


def _data_url(path: "Any") -> str:
    with open(path, "rb") as f:
        data = f.read()
    for magic, kind in ((b"\x89PNG", "png"), (b"\xff\xd8\xff", "jpeg"), (b"GIF8", "gif")):
        if data.startswith(magic):
            break
    else:
        if not (data[:4] == b"RIFF" and data[8:12] == b"WEBP"):
            raise ValueError("not a PNG, JPEG, GIF or WebP image")
        kind = "webp"
    return "data:image/%s;base64,%s" % (kind, base64.b64encode(data).decode("ascii"))


class ToolCall:
    """One tool call the model asked for.

    ``id`` and ``name`` as the server sent them (``id`` is made up as
    ``call_N`` when the server sent none); ``arguments`` is the JSON text as
    sent; ``args`` is that text parsed (``{}`` for empty text, ``None`` when it
    is not valid JSON, or is JSON of so many tiny values that parsing it would
    take far more memory than its size).
    """

    __slots__ = ("id", "name", "arguments", "args", "type")

    def __init__(self, id: str, name: str, arguments: "Any", type: str = "function") -> None:
        if arguments is None:
            arguments = ""
        self.id, self.name, self.arguments, self.type = id, name, arguments, type
        self.args = None  # type: Any  # arguments that are not text are not parsed
        if isinstance(arguments, str):
            try:
                self.args = _json(arguments) if arguments.strip() else {}
            except (ValueError, RecursionError):  # not JSON, or too costly to parse
                pass

    def to_dict(self) -> "Dict[str, Any]":
        """The call in the wire shape, for the assistant message in history."""
        return {"id": self.id, "type": self.type,
                "function": {"name": self.name, "arguments": self.arguments}}

    def __repr__(self) -> str:
        return "ToolCall(id=%r, name=%r, arguments=%r)" % (self.id, self.name, self.arguments)


class Response:
    """The result of one call. Nothing raises; look at ``stop_reason``.

    ``content``: the assistant text (what came before an error or cancel); ``role``:
    ``"assistant"``; ``stop_reason``: ``"stop"``, ``"length"``, ``"tool_calls"``,
    ``"content_filter"``, ``"refusal"``, ``"error"``, ``"cancelled"`` or an unknown server
    value as it is; ``error``: ``""`` or one readable line; ``status``: the HTTP status, ``0``
    when no response arrived; ``usage``: a dict with ``prompt_tokens``, ``completion_tokens``,
    ``total_tokens`` when the server reported them, else ``None``; ``tool_calls``: a list of
    :class:`ToolCall`; ``reasoning``: reasoning text, ``""`` if none; ``refusal``: the model's
    refusal (OpenAI's ``refusal`` field), ``""`` if none; a reply that is only a refusal has
    ``stop_reason "refusal"``; ``model`` and ``id`` as the server reported them. ``headers``:
    the headers of the last HTTP response (an ``http.client.HTTPMessage``:
    ``headers.get("x-request-id")`` ignores case, ``headers.get_all(name)`` gives repeated
    ones; empty when none arrived); ``logprobs``: the token log-probabilities when the server
    sent them (the ``choices[0].logprobs.content`` entries, joined across a stream's chunks),
    else ``None``; ``first_token_seconds``: seconds from the start of the call until the first
    token (text, reasoning or a tool call) came, ``None`` if none came; ``total_seconds``:
    seconds the whole call took, retries included; ``timings``: the server's own timing numbers
    when it sent them (llama.cpp's ``timings``), else ``None``. ``warnings``: short sentences
    about what the server did to an answer (a prompt it probably cut, a limit it ignored, ...)
    and what the client adjusted; empty when nothing is wrong. ``error_kind``: for a failed
    call (``stop_reason "error"``) one of ``"context_overflow"``, ``"auth"``, ``"rate_limit"``,
    ``"not_found"``, ``"bad_request"``, ``"server"``, ``"network"``, ``"timeout"``,
    ``"too_large"``, ``"invalid_reply"``, ``"output"``, ``"unexpected"``; else ``""``.
    ``overflow``: for a context overflow, ``{"prompt_tokens": ..., "context_length": ...}`` as
    far as the server said them, else ``None``.
    """

    # each field's default (the mutable ones are made by __init__)
    role = "assistant"
    status = 0
    usage = timings = None  # type: Optional[Dict[str, Any]]
    reasoning = refusal = model = id = error_kind = ""
    logprobs = None  # type: Optional[List[Any]]
    first_token_seconds = None  # type: Optional[float]
    total_seconds = 0.0
    overflow = None  # type: Optional[Dict[str, int]]
    _headers = None  # type: Optional[http.client.HTTPMessage]
    _reasoning_field = "reasoning_content"
    _legacy_call = False  # the server used the older function_call shape

    def __init__(self, content: str = "", stop_reason: str = "stop", error: str = "") -> None:
        self.content, self.stop_reason, self.error = content, stop_reason, error
        self.tool_calls = []  # type: List[ToolCall]
        self.warnings = []  # type: List[str]

    @property
    def headers(self) -> "http.client.HTTPMessage":
        """The headers of the last HTTP response (empty when none arrived)."""
        if self._headers is None:  # made only when asked for: most Responses have theirs
            self._headers = http.client.HTTPMessage()
        return self._headers

    @headers.setter
    def headers(self, headers: "http.client.HTTPMessage") -> None:
        self._headers = headers

    @property
    def ok(self) -> bool:
        """True unless the call failed or was cancelled."""
        return self.stop_reason not in ("error", "cancelled")

    def to_message(self) -> "Dict[str, Any]":
        """The assistant message to append to history, in the wire shape.

        Tool calls are included (as ``function_call`` when the server used that
        older shape), and so are a refusal and the reasoning, under the field
        name the server used (some servers want it back in tool loops).
        """
        message = {"role": "assistant", "content": self.content if self.content or not (
            self.tool_calls or self.refusal) else None}  # type: Dict[str, Any]
        if self.tool_calls and self._legacy_call:
            message["function_call"] = self.tool_calls[0].to_dict()["function"]
        elif self.tool_calls:
            message["tool_calls"] = [call.to_dict() for call in self.tool_calls]
        if self.refusal:
            message["refusal"] = self.refusal
        if self.reasoning and self._reasoning_field == "thinking":  # content parts (Mistral's)
            message["content"] = [{"type": "thinking", "thinking": [
                {"type": "text", "text": self.reasoning}]}] + (
                [{"type": "text", "text": self.content}] if self.content else [])
        elif self.reasoning:
            message[self._reasoning_field] = self.reasoning
        return message

    def __repr__(self) -> str:
        try:  # the fields are the caller's to set: any of them may be any object
            text = self.content
            if isinstance(text, str) and len(text) > 60:
                text = text[:57] + "..."
            extra = ", error=%r" % (self.error,) if self.error else ""
            return "Response(stop_reason=%r, content=%r, status=%r%s)" % (
                self.stop_reason, text, self.status, extra)
        except Exception:
            return "<llm.Response that cannot be shown>"


class Stream:
    """The text pieces of one streamed reply, as an iterator.

    ``for piece in client.stream(messages): ...``, then ``.response`` holds
    the whole :class:`Response`. Reading ``.response`` before the end reads the
    rest of the stream first; ``close()`` ends it early (``"cancelled"``).
    """

    def __init__(self, call: "_Call", pieces: "Generator[str, None, None]") -> None:
        self._call, self._pieces = call, pieces
        self._reading = threading.RLock()  # a generator read by two threads at once raises

    def __iter__(self) -> "Stream":
        return self

    def __next__(self) -> str:
        with self._reading:
            return next(self._pieces)

    @property
    def response(self) -> Response:
        """The whole reply, once the stream has ended (another thread's reading included)."""
        try:
            with self._reading:
                for _ in self._pieces:
                    pass
        except ValueError:  # read again from inside its own reading: what came so far
            pass
        return self._call.response()

    def close(self) -> None:
        """End the stream now, from any thread; the response keeps what came, as cancelled
        (a stream that has already ended, whole or failed, keeps its outcome)."""
        with self._call.client._lock:
            self._call.guard.cancel()
        try:
            self._pieces.close()
        except ValueError:  # being read in another thread: the cancel ends it there
            pass
        if not self._call.started:  # closed before it began: it never will
            self._call.cancelled = True

    def __enter__(self) -> "Stream":
        return self

    def __exit__(self, *exc_info: "Any") -> None:
        self.close()


class SSEWriter:
    """Wrap ``out`` so that ``chat_stream`` relays a reply as server-sent events.

    Each text delta becomes ``data: {"content": "<delta>"}`` and a blank line;
    the end is ``data: [DONE]``, after ``data: {"error": "..."}`` when the call
    failed. ``out`` may take ``str`` or ``bytes`` (such as ``wfile`` in an
    ``http.server`` handler).
    """

    def __init__(self, out: "Any") -> None:
        self.out, self._binary = out, False

    def write(self, text: str) -> None:
        """Send one delta as one event."""
        self._send("data: %s\n\n" % json.dumps({"content": text}))

    def flush(self) -> None:
        """Flush ``out`` when it can be flushed."""
        flush = getattr(self.out, "flush", None)
        if flush is not None:
            flush()

    def _finish(self, response: Response) -> None:
        if response.stop_reason == "error":
            self._send("data: %s\n\n" % json.dumps({"error": response.error}))
        self._send("data: [DONE]\n\n")
        self.flush()

    def _send(self, event: str) -> None:
        if not self._binary:
            try:
                self.out.write(event)
                return
            except TypeError:  # a binary stream: send UTF-8 from now on
                self._binary = True
        self.out.write(event.encode("utf-8"))


# ---------------------------------------------------------------- the client


class Client:
    """A connection to one OpenAI-compatible server; safe to share across threads.

    ``base_url``: the host root (``http://localhost:11434``), a ``.../v1`` style prefix
    (``https://api.groq.com/openai/v1``) or a full ``.../chat/completions`` URL; ``None`` reads
    the environment. ``model``: sent as the request's model (``None``: ``LLM_MODEL``).
    ``api_key``: sent as a Bearer token (``None``: ``LLM_API_KEY`` or ``OPENAI_API_KEY``, each
    only to the server the environment pairs it with; ``""``: none). ``system``: a system
    prompt put first unless the messages already start with one. ``timeout``: seconds for
    connecting and for each read, or a ``(connect, read)`` pair; it bounds silence, not the
    whole call. ``deadline``: seconds for the whole call, retries included, or ``None``.
    ``headers``: extra request headers. ``retries``: how many times to retry a failed
    connection or a 408, 409, 429, 5xx answer before any output. ``verify``: ``True`` (or
    ``None``) checks the server's TLS certificate, ``False`` does not, a path is taken as
    ``ca_file``. ``ca_file``: a PEM file of trusted certificates. ``params``: default request
    parameters (``{"temperature": 0}``), under those of each call. ``stream_usage``: ask for
    token usage when streaming. ``max_bytes``: the largest response body accepted.
    ``think_tags``: a ``<think>...</think>`` block at the start of the content is reasoning
    (``False``: the content exactly as sent). ``trace``: a writer (anything with
    ``write(str)``) that gets every request and reply as they go over the wire, secrets hidden;
    ``None`` reads ``LLM_TRACE`` (``1``: stderr; a file path: that file, appended to),
    ``False`` traces nothing.

    Building a client never raises: a bad argument is reported by every call.
    """

    def __init__(self, base_url: "Optional[str]" = None, model: "Optional[str]" = None,
                 api_key: "Optional[str]" = None, system: "Optional[str]" = None,
                 timeout: "_Timeout" = _DEFAULT_TIMEOUT, deadline: "Optional[float]" = None,
                 headers: "Optional[Dict[str, str]]" = None, retries: int = 0,
                 verify: "Union[bool, str, os.PathLike[str], None]" = True,
                 ca_file: "Optional[str]" = None,
                 params: "Optional[Dict[str, Any]]" = None, stream_usage: bool = True,
                 max_bytes: int = _MAX_BYTES, think_tags: bool = True,
                 trace: "Any" = None) -> None:
        self._lock, self._local = threading.Lock(), threading.local()
        self._active = set()  # type: Set[_Guard]  # the calls in flight, as cancel() wakes them
        self._connections = weakref.WeakSet()  # type: weakref.WeakSet[http.client.HTTPConnection]
        self._tls = None  # type: Any  # the SSL context, made by the first https call
        self._refused = frozenset()  # type: FrozenSet[str]  # this server's refusals (replaced whole)
        settings = self._settings = _Settings()
        try:
            settings.read(base_url, model, api_key, system, timeout, deadline, headers, retries,
                          verify, ca_file, params, stream_usage, max_bytes, think_tags, trace)
        except Exception as exc:  # reported by every call instead
            settings.problem = str(exc) if isinstance(exc, (TypeError, ValueError)) \
                else "bad client argument: " + _describe(exc)
            settings.base_url = _url_to_show(settings.base_url)  # a refused user:pass@ is not kept
        self.base_url, self.model, self.system = settings.base_url, settings.model, settings.system

    def chat(self, messages: "List[Any]", **params: "Any") -> Response:
        """Send ``messages`` and return the whole reply as a :class:`Response`.

        ``params`` go into the request body as they are (``temperature``,
        ``max_tokens``, ``tools``, ``response_format``, ...); a ``None`` value
        leaves that key out.
        """
        return _Call(self, stream=False).answer(messages, params)

    def chat_stream(self, messages: "List[Any]", out: "_Writer", **params: "Any") -> Response:
        """Stream the reply: each text delta goes to ``out.write`` as it arrives.

        ``out.flush()`` is called after each write when ``out`` has it, and
        reasoning deltas go to ``out.write_reasoning(text)`` when it has that.
        Returns the :class:`Response` with the whole content. When ``out.write``
        raises (a reader went away), the call ends with an error response.
        """
        try:
            write = getattr(out, "write", None)
            flush = getattr(out, "flush", None)
            on_reasoning = getattr(out, "write_reasoning", None)
        except Exception as exc:  # a property that raises
            write, problem = None, _describe(exc)
        else:
            problem = "got %s" % type(out).__name__
        if not callable(write):
            refused = Response("", "error", _one_line(_redact(
                "out must have a write(str) method, " + problem, self._settings.secrets)))
            refused.error_kind = "bad_request"
            return refused
        call = _Call(self, stream=True)
        call.on_reasoning = on_reasoning
        pieces = call.pieces(messages, params)
        try:
            for piece in pieces:
                write(piece)
                if flush is not None:
                    flush()
        except Exception as exc:  # the writer failed; the generator itself never raises
            call.error, call.kind = "writing the reply failed: " + _describe(exc), "output"
            pieces.close()
        response = call.response()
        if isinstance(out, SSEWriter):
            try:
                out._finish(response)
            except Exception as exc:
                if response.ok:
                    response.stop_reason, response.error_kind = "error", "output"
                    response.error = _one_line(_redact(
                        "writing the reply failed: " + _describe(exc), self._settings.secrets))
        return response

    def stream(self, messages: "List[Any]", **params: "Any") -> Stream:
        """Return the reply as a :class:`Stream`: an iterator of text pieces."""
        call = _Call(self, stream=True)
        return Stream(call, call.pieces(messages, params))

    def models(self) -> "_Models":
        """The ids of the models the server offers (``GET .../models``).

        A list; when the call fails it is empty and its ``error`` says why
        (``status`` is the HTTP status, as on a :class:`Response`).
        """
        call = _Call(self, stream=False)
        found = _Models(call.listing())
        found.error = "cancelled" if call.cancelled else call.response().error
        found.status = call.exchange.status
        return found

    def cancel(self) -> None:
        """End every call in flight on this client, from any thread.

        They return at once with ``stop_reason "cancelled"`` and what came so
        far. Calls started afterwards are not affected.
        """
        with self._lock:
            for guard in list(self._active):  # a copy: calls start without the lock
                guard.cancel()

    def close(self) -> None:
        """Cancel the calls in flight and close the connections (they reopen when needed)."""
        self.cancel()
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            connection.close()
        if self._settings.tracer is not None:
            self._settings.tracer.flush()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc_info: "Any") -> None:
        self.close()

    def __repr__(self) -> str:
        return "Client(base_url=%r, model=%r, api_key=%r)" % (
            _url_to_show(self.base_url), self.model, "***" if self._settings.api_key else "")

    def _body(self, messages: "Any", params: "Dict[str, Any]", stream: bool) -> "Dict[str, Any]":
        """The request's JSON body: the client's defaults, the call's parameters, the messages."""
        settings = self._settings
        body = {"model": self.model} if self.model else {}  # type: Dict[str, Any]
        body.update(settings.params)
        body.update(params)
        body["messages"] = _checked_messages(messages, self.system)
        body["stream"] = stream
        if (stream and settings.stream_usage and "stream_options" not in body
                and "stream_options" not in self._refused):
            body["stream_options"] = _ASK_USAGE
        if None in body.values():  # a None leaves its key out
            body = {key: value for key, value in body.items() if value is not None}
        return body


class _Settings:
    """A client's settings, decided once when it is made: its arguments, checked, and what
    follows from them. Calls read them, and never change them."""

    problem = ""  # why every call fails; "" when the arguments were good
    base_url = model = system = api_key = scheme = host = ""
    chat_path = models_path = ""  # the server's paths, as a user checks them
    chat_target = models_target = ""  # what the request line carries: through a proxy, the URL
    port = retries = 0
    connect_timeout, read_timeout = _DEFAULT_TIMEOUT
    deadline, max_bytes = 0.0, _MAX_BYTES
    verify, ca_file = True, None  # type: bool, Optional[str]
    params = tunnel_headers = skips = {}  # type: Dict[str, Any]  # skips: http.client's own
    stream_headers = plain_headers = {}  # type: Dict[str, str]  # each kind of request's, and
    stream_lines = plain_lines = []  # type: List[bytes]  # as lines, checked once (not per call)
    proxy = None  # type: Optional[Tuple[str, int]]
    secrets = []  # type: List[str]  # every form in which a secret may come back
    stream_usage = think_tags = True
    tracer = None  # type: Optional[_Tracer]

    def read(self, base_url: "Any", model: "Any", api_key: "Any", system: "Any", timeout: "Any",
             deadline: "Any", headers: "Any", retries: "Any", verify: "Any", ca_file: "Any",
             params: "Any", stream_usage: "Any", max_bytes: "Any", think_tags: "Any",
             trace: "Any") -> None:
        """Check the client's arguments (the environment where they are None) and keep them."""
        environ = os.environ
        if base_url is None:
            base_url = _base_url_from(environ)
        if model is None:
            model = environ.get("LLM_MODEL", "")
        self.base_url = _checked_text("base_url", base_url)
        self.model = _checked_text("model", model)
        self.scheme, self.host, self.port, self.chat_path, self.models_path = _endpoint(self.base_url)
        if api_key is None:  # the environment's key goes only where the environment sends it
            api_key = _environment_key(environ, (self.scheme, self.host, self.port))
        self.api_key = _checked_text("api_key", api_key, secret=True)
        self.system = _checked_text("system", system or "", single_line=False)
        self.connect_timeout, self.read_timeout = _timeouts(timeout)
        self.deadline = _seconds("deadline", deadline) if deadline is not None else 0.0
        self.retries = _count("retries", retries)
        self.max_bytes = _count("max_bytes", max_bytes)
        self.verify, self.ca_file = _verification(verify, ca_file)
        if not isinstance(params or {}, dict):
            raise TypeError("params must be a dict, got %s" % type(params).__name__)
        self.params = dict(params or {})
        self.stream_usage, self.think_tags = bool(stream_usage), bool(think_tags)
        self._read_headers(headers or {})
        self.tracer = _tracer_for(trace, environ, self.secrets)

    def url(self, path: str) -> str:
        """The absolute URL of one of the server's paths."""
        return "%s://%s%s" % (self.scheme, _where(self.host, self.port), path)

    def _read_headers(self, headers: "Any") -> None:
        """The headers each request sends, its proxy, and the secrets never to show."""
        sent = _headers(self.api_key, headers)
        proxy = _proxy_for(self.scheme, self.host)
        self.chat_target, self.models_target = self.chat_path, self.models_path
        if proxy is not None:
            self.proxy, self.tunnel_headers = proxy[:2], proxy[2]
            if self.scheme == "http":  # a proxy wants the absolute URL, and its credentials
                self.chat_target, self.models_target = map(self.url, (self.chat_path,
                                                                      self.models_path))
                sent.update(self.tunnel_headers)
        self.stream_headers = _accepting(sent, "text/event-stream")
        self.plain_headers = _accepting(sent, "application/json")
        self.stream_lines, self.plain_lines = (
            [("%s: %s" % item).encode("latin-1") for item in headers.items()]
            for headers in (self.stream_headers, self.plain_headers))
        given = {name.lower() for name in sent}
        self.skips = {"skip_host": "host" in given, "skip_accept_encoding": "accept-encoding" in given}
        self.secrets = _secret_forms([self.api_key] + [
            value for name, value in list(sent.items()) + list(self.tunnel_headers.items())
            + _query_fields(self.chat_path) if _is_credential(name)])


class _Models(list):  # type: ignore[type-arg]
    """Model ids, with ``error`` and ``status`` as on a Response."""

    error, status = "", 0


# ---------------------------------------------------------------- module-level functions

_shared = {}  # type: Dict[Tuple[Tuple[str, str], ...], Client]
_shared_lock = threading.Lock()


def _environment_client() -> Client:
    """The client made from the environment, made again when a variable it reads changed."""
    key = tuple(sorted((name, value) for name, value in os.environ.items()
                       if name in _ENVIRONMENT or name.lower().endswith("_proxy")))
    with _shared_lock:
        client = _shared.get(key)
        if client is None:
            _shared.clear()  # the environment changed: the old client is not needed
            client = _shared[key] = Client()
    return client


def chat(messages: "List[Any]", **params: "Any") -> Response:
    """``Client().chat(messages, **params)`` on a client configured from the environment.

    ``LLM_BASE_URL`` (or ``OPENAI_BASE_URL``, or ``OLLAMA_HOST``; default
    ``http://localhost:11434``), ``LLM_MODEL``, ``LLM_API_KEY`` (or
    ``OPENAI_API_KEY``; each key only for the server it is paired with).
    The client and its connections are reused.
    """
    return _environment_client().chat(messages, **params)


def chat_stream(messages: "List[Any]", out: "_Writer", **params: "Any") -> Response:
    """``Client().chat_stream(messages, out, **params)`` on the environment's client."""
    return _environment_client().chat_stream(messages, out, **params)


# ---------------------------------------------------------------- configuration and request building


def _base_url_from(environ: "Any") -> str:
    url = environ.get("LLM_BASE_URL") or environ.get("OPENAI_BASE_URL")
    if url:
        return str(url)
    host = environ.get("OLLAMA_HOST", "").strip()
    return _ollama_host_url(host) if host else _DEFAULT_BASE_URL


def _environment_key(environ: "Any", origin: "Tuple[str, str, int]") -> str:
    """The environment's API key for a server at ``origin`` (scheme, host, port): each key
    only for its pair, ``LLM_API_KEY`` the environment's base URL, ``OPENAI_API_KEY``
    ``OPENAI_BASE_URL`` (or OpenAI itself when that is unset)."""
    pairs = (("LLM_API_KEY", _base_url_from(environ)),
             ("OPENAI_API_KEY", environ.get("OPENAI_BASE_URL") or "https://api.openai.com"))
    for name, url in pairs:
        key = environ.get(name)
        try:
            if key and _endpoint(url)[:3] == origin:
                return str(key)
        except ValueError:  # a URL that is none: no server to pair the key with
            pass
    return ""


def _ollama_host_url(value: str) -> str:
    """Read OLLAMA_HOST as Ollama does: ``host``, ``:port``, ``host:port``, or a URL."""
    scheme, _, rest = value.rpartition("://")
    scheme = scheme or "http"
    rest, slash, path = rest.partition("/")
    if rest.startswith("["):  # [::1]:11434
        host, _, port = rest[1:].partition("]")
        port = port.lstrip(":")
        host = "[%s]" % host
    else:
        host, _, port = rest.rpartition(":") if ":" in rest else (rest, "", "")
    default_port = "443" if scheme == "https" else "11434"
    return "%s://%s:%s%s%s" % (scheme, host or "127.0.0.1", port or default_port, slash, path)


def _endpoint(url: str) -> "Tuple[str, str, int, str, str]":
    """Split a base URL into scheme, host, port, and the chat and models paths."""
    url = url.strip()
    shown = _url_to_show(url)
    if any(ord(c) < 33 or ord(c) == 127 for c in url):  # urlsplit would drop tabs and line ends
        raise ValueError("base_url contains a space or a control character: %r" % shown)
    if "://" not in url:
        if url.lower().startswith(("http:", "https:")):
            raise ValueError("base_url is missing a slash: %r" % shown)
        url = "http://" + url
    parts = _urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise ValueError("base_url must be an http:// or https:// URL, got %r" % shown)
    if "@" in parts.netloc:  # never sent, and "http://localhost@evil.example" is evil.example
        raise ValueError("base_url must not contain a user name or password (user:pass@host):"
                         " give the key as api_key or in headers")
    host = parts.hostname or ""
    if not host or any(c in host for c in " \t\r\n\0/\\"):
        raise ValueError("base_url has no valid host: %r" % shown)
    try:
        port = parts.port
    except ValueError:
        raise ValueError("base_url has an invalid port: %r" % shown)
    if port == 0:
        raise ValueError("base_url has port 0: %r" % shown)
    port = port or (443 if scheme == "https" else 80)
    path = parts.path.rstrip("/")
    if path.endswith("/chat/completions"):
        path = path[: -len("/chat/completions")]
    elif not path:
        path = "/v1"
    query = "?" + parts.query if parts.query else ""
    return scheme, host, port, path + "/chat/completions" + query, path + "/models" + query


def _url_to_show(url: str) -> str:
    """A URL as it may be shown: no user part, and key-like query values as ``***``."""
    if not isinstance(url, str):
        return url
    head, mark, query = url.partition("?")
    scheme, slashes, rest = head.rpartition("://")
    if "@" in rest:
        rest = "***@" + rest.rpartition("@")[2]
    if not mark:
        return scheme + slashes + rest
    query, hash_mark, fragment = query.partition("#")
    fields = query.split("&")
    for number, field in enumerate(fields):
        name, equals, value = field.partition("=")
        if equals and value and _is_credential(name):
            fields[number] = name + "=***"
    return scheme + slashes + rest + "?" + "&".join(fields) + hash_mark + fragment


def _query_fields(url: str) -> "List[Tuple[str, str]]":
    """The ``name=value`` fields of a URL's query, each value also percent-decoded."""
    from urllib.parse import unquote
    fields = []
    for field in url.partition("?")[2].partition("#")[0].split("&"):
        name, _, value = field.partition("=")
        fields += [(name, value), (name, unquote(value))]
    return fields


def _is_credential(name: str) -> bool:
    """Whether a header or query field of this name carries a secret (api-key, token, sig...)."""
    name = name.lower()
    return any(word in name for word in _CREDENTIAL_WORDS)


def _secret_forms(values: "List[str]") -> "List[str]":
    """Every form in which these secrets may come back in a server's words, longest first.

    Each value whole, its words, or the credential after an auth scheme (``Bearer <token>``); the
    values of ``name=value`` pairs; the user and password of ``Basic`` credentials; each also
    JSON-escaped and percent-encoded; none shorter than 4 characters, which would match ordinary
    words.
    """
    found = set()
    for value in values:
        words = value.replace(",", " ").replace(";", " ").split()
        scheme = len(words) == 2 and words[0].lower() in _AUTH_SCHEMES  # shown as "Bearer ***"
        pieces = words[1:] if scheme else [value, value.strip()] + words
        pieces += [word.partition("=")[2] for word in words]
        if value.strip()[:6].lower() == "basic " and len(words) > 1:
            try:
                user_password = base64.b64decode(words[1], validate=True).decode("utf-8")
            except ValueError:  # binascii.Error and UnicodeDecodeError are ValueErrors
                user_password = ""
            pieces += [user_password] + user_password.split(":", 1)
        for piece in pieces:
            for form in (piece, json.dumps(piece)[1:-1], _quote(piece, safe="")):
                if len(form) >= 4:
                    found.add(form)
    return sorted(found, key=len, reverse=True)


def _redact(text: str, secrets: "List[str]") -> str:
    for secret in secrets:
        text = text.replace(secret, "***")
    return text


def _checked_text(name: str, value: "Any", secret: bool = False, single_line: bool = True) -> str:
    if not isinstance(value, str):
        raise TypeError("%s must be a string, got %s" % (name, type(value).__name__))
    if single_line and any(c in value for c in "\r\n\0"):
        shown = "" if secret else " (%r)" % value[:80]
        raise ValueError("%s contains a line break or NUL%s" % (name, shown))
    return value


def _verification(verify: "Any", ca_file: "Any") -> "Tuple[bool, Any]":
    """``verify`` and ``ca_file`` as the client keeps them: ``None`` is on, a path a CA file."""
    if verify is None:
        return True, ca_file
    if isinstance(verify, (str, os.PathLike)) and os.fspath(verify):
        return True, os.fspath(verify)  # a CA file, as requests takes it
    if not isinstance(verify, bool):  # 0, "", a config value: never a silent "off"
        raise TypeError("verify must be True, False or a CA file path, got %s" % _short_repr(verify))
    return verify, ca_file


def _seconds(name: str, value: "Any") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError("%s must be a positive number of seconds, got %r" % (name, value))
    return float(min(value, 1e9))  # socket timeouts overflow past ~3e11


def _timeouts(timeout: "Any") -> "Tuple[float, float]":
    if isinstance(timeout, (tuple, list)) and len(timeout) == 2:
        return _seconds("timeout", timeout[0]), _seconds("timeout", timeout[1])
    seconds = _seconds("timeout", timeout)
    return seconds, seconds


def _count(name: str, value: "Any") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError("%s must be a whole number >= 0, got %r" % (name, value))
    return value


def _headers(api_key: str, extra: "Any") -> "Dict[str, str]":
    headers = {"Content-Type": "application/json", "User-Agent": "llm.py/" + __version__}
    if api_key:
        headers["Authorization"] = "Bearer " + _latin1("api_key", api_key)
    if not isinstance(extra, dict):
        raise TypeError("headers must be a dict, got %s" % type(extra).__name__)
    for name, value in extra.items():
        _checked_text("header name", name)
        if not name or any(not 32 < ord(c) < 127 or c in '()<>@,;:\\"/[]?={}' for c in name):
            raise ValueError("invalid header name %r" % name)
        _checked_text("header %s" % name, value, secret=True)
        for same in [key for key in headers if key.lower() == name.lower()]:
            del headers[same]  # ours, or an earlier spelling: header names ignore case
        headers[name] = _latin1("header %s" % name, value)
    return headers


def _accepting(headers: "Dict[str, str]", kind: str) -> "Dict[str, str]":
    """The headers with ``Accept: kind``, unless the caller chose an Accept."""
    if any(name.lower() == "accept" for name in headers):
        return headers
    return dict(headers, Accept=kind)


def _latin1(name: str, value: str) -> str:
    try:
        value.encode("latin-1")
    except UnicodeEncodeError:
        raise ValueError("%s has characters that HTTP headers cannot carry" % name)
    return value


def _proxy_for(scheme: str, host: str) -> "Optional[Tuple[str, int, Dict[str, str]]]":
    """The proxy (host, port, CONNECT headers) that the environment names for host."""
    environ = os.environ
    names = (scheme + "_proxy", scheme.upper() + "_PROXY", "all_proxy", "ALL_PROXY")
    if not any(environ.get(name) for name in names) or _is_loopback(host):
        return None  # a corporate proxy must never stand between us and a local server
    import urllib.request
    from urllib.parse import unquote
    proxies = urllib.request.getproxies_environment()
    url = proxies.get(scheme) or proxies.get("all")
    bypass = urllib.request.proxy_bypass_environment  # type: ignore[attr-defined]
    if not url or bypass(host, proxies):
        return None
    parts = _urlsplit(url if "://" in url else "http://" + url)
    if parts.scheme.lower() != "http":  # an https:// proxy spoken to in plain HTTP: refuse it
        raise ValueError("the proxy %s is not supported: llm.py speaks to proxies in plain"
                         " HTTP (https still goes through CONNECT, encrypted end to end);"
                         " give an http:// proxy URL" % _url_to_show(url))
    headers = {}
    if parts.username is not None:
        credentials = "%s:%s" % (unquote(parts.username), unquote(parts.password or ""))
        headers["Proxy-Authorization"] = "Basic " + base64.b64encode(
            credentials.encode("utf-8")).decode("ascii")
    return parts.hostname or "", parts.port or 80, headers


def _is_loopback(host: str) -> bool:
    """Whether host is this machine: localhost names, or a loopback address in any form the
    resolver reads (``[::ffff:127.0.0.1]``, ``0:0:0:0:0:0:0:1``, ``127.1``, ``2130706433``,
    ``0x7f000001``); a name such as ``127.0.0.1.nip.io`` is no address."""
    import ipaddress
    host = host.lower().rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        address = ipaddress.ip_address(host.partition("%")[0])  # type: Any  # a zone: fe80::1%eth0
    except ValueError:
        if not host or host.strip("0123456789abcdefx.") or host.count(".") > 3:
            return False  # a name: inet_aton would read "127.1 x" as 127.0.0.1
        try:
            address = ipaddress.ip_address(socket.inet_aton(host))
        except (OSError, ValueError):
            return False
    if address.version == 6 and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return bool(address.is_loopback or address.is_unspecified)


def _checked_messages(messages: "Any", system: str) -> "List[Any]":
    if not isinstance(messages, (list, tuple)):
        raise _Failure('messages must be a list such as [{"role": "user", "content": "Hi"}],'
                       " got %s" % type(messages).__name__, "bad_request")
    for number, message in enumerate(messages):  # the usual one: a dict with a role, and text
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                and message["role"] and isinstance(message.get("content"), str)):
            _check_message(number, message)
    if system and not (messages and messages[0].get("role") == "system"):
        return [{"role": "system", "content": system}] + list(messages)
    return list(messages)


def _check_message(number: int, message: "Any") -> None:
    """Refuse a message that is not one: no dict, no role, an image that could not be read."""
    if not isinstance(message, dict):
        raise _Failure("messages[%d] must be a dict with a role, got %s"
                       % (number, type(message).__name__), "bad_request")
    role = message.get("role")
    if not isinstance(role, str) or not role:
        raise _Failure("messages[%d] has no role" % number, "bad_request")
    content = message.get("content")
    for part in content if isinstance(content, list) else [content]:
        if isinstance(part, _BadPart):
            raise _Failure("messages[%d]: %s" % (number, part.problem), "bad_request")


_encoder = json.JSONEncoder(ensure_ascii=False, allow_nan=False)  # json.dumps makes one a call
_raw_decode = json.JSONDecoder().raw_decode
_scanstring = json.decoder.scanstring  # type: ignore[attr-defined]  # a JSON string, in C


def _encode(body: "Dict[str, Any]") -> bytes:
    try:
        text = _encoder.encode(body)
    except (TypeError, ValueError, RecursionError) as exc:
        raise _Failure("the request cannot be sent as JSON: %s" % exc, "bad_request")
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates are no UTF-8: send U+FFFD instead
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace").encode("utf-8")


# ---------------------------------------------------------------- the exchange


class _Failure(Exception):
    """What went wrong, as the one line ``Response.error`` will carry; ``kind``: its
    ``error_kind``; ``overflow``: the numbers a server gave with a context overflow."""

    def __init__(self, message: str, kind: str, retryable: bool = False,
                 overflow: "Optional[Dict[str, int]]" = None) -> None:
        Exception.__init__(self, message)
        self.kind, self.retryable, self.overflow = kind, retryable, overflow


class _Cancelled(_Failure):
    """The call was cancelled, or its deadline passed: raised by the guard's check only."""

    def __init__(self) -> None:
        _Failure.__init__(self, "cancelled", "")


class _Call:
    """One call: its exchange with the server, fed to an assembler, and its result.

    Nothing escapes it: ``answer()``, ``pieces()`` (a stream's text as it comes) and ``listing()``
    share one boundary, where whatever went wrong is decided once, next to what had arrived. The
    HTTP is the :class:`_Exchange`'s, the deadline and cancel the :class:`_Guard`'s, and what the
    reply means the :class:`_Assembler`'s.
    """

    # where each call starts (set on the instance as the call goes)
    body = None  # type: Optional[Dict[str, Any]]  # the request, as sent
    on_reasoning = None  # type: Any  # out.write_reasoning, when out has it
    given = 0  # reasoning pieces given to on_reasoning
    error = kind = ""  # how the call failed: Response.error and error_kind
    overflow = None  # type: Optional[Dict[str, int]]
    cancelled = False  # a cancel ended it (a passed deadline is an error)
    envelopes = True  # take events in a known envelope at once (the tests compare without)
    started = seconds = 0.0
    first_token = None  # type: Optional[float]

    def __init__(self, client: Client, stream: bool) -> None:
        self.client = client
        self.settings = settings = client._settings
        self.guard = guard = _Guard(client)
        self.exchange = _Exchange(client, stream, guard)
        self.assembler = _Assembler(settings.max_bytes, settings.think_tags)

    def answer(self, messages: "Any", params: "Dict[str, Any]") -> Response:
        """A whole reply (``chat()``)."""
        with self:
            answer, first, events = self._send(messages, params)
            if events:  # a server that streams what was asked whole
                for _ in self._read_events(answer, first):
                    pass
            else:
                self._take_whole(answer, first)
        self._rest()
        return self.response()

    def pieces(self, messages: "Any", params: "Dict[str, Any]") -> "Generator[str, None, None]":
        """A streamed reply: its text as it comes (``chat_stream()`` and ``stream()``)."""
        with self:
            answer, first, events = self._send(messages, params)
            if events:
                for piece in self._read_events(answer, first):
                    yield piece
            else:  # a server that answers a stream with a whole reply
                text = self._take_whole(answer, first)
                if text:
                    yield text
        rest = self._rest()
        if rest:
            yield rest

    def listing(self) -> "List[str]":
        """``GET .../models``: the model ids (none when the call failed)."""
        with self:
            self._check_settings()
            return _model_ids(self._read_json(self.exchange.request(None), b""))
        return []

    def _rest(self) -> str:
        """Text held back at a <think> block's edge, now that the reply has ended (whole, or
        cut): but not after a cancel or the deadline, after which no text is given."""
        return self.assembler.flush() if self.assembler.held and not self.guard.halted else ""

    def __enter__(self) -> None:
        self.started = time.monotonic()
        self.guard.start()

    def __exit__(self, kind: "Any", exc: "Any", traceback: "Any") -> bool:
        """The call's one boundary: decide, once, how it ended, and let nothing but an
        interrupt (or a stream's consumer closing it) escape."""
        self.seconds = time.monotonic() - self.started
        guard = self.guard
        guard.stop()
        if exc is None:
            pass
        elif guard.expired:  # whatever failed after the deadline or a cancel is theirs
            self.error, self.kind = "deadline of %gs exceeded" % self.settings.deadline, "timeout"
        elif guard.cancelled:
            self.cancelled = True
        elif isinstance(exc, _Failure):
            self.error, self.kind, self.overflow = str(exc), exc.kind, exc.overflow
        elif isinstance(exc, Exception):  # a surprise becomes an error response
            self.error, self.kind = "unexpected failure: " + _describe(exc), "unexpected"
        self.exchange.release()  # for reuse only if its answer was read whole
        return isinstance(exc, Exception)

    def _check_settings(self) -> None:
        if self.settings.problem:
            raise _Failure(self.settings.problem, "bad_request")

    def _send(self, messages: "Any", params: "Dict[str, Any]") -> "Tuple[Any, bytes, bool]":
        """Send the messages: the answer, its first bytes read, and whether it is a stream."""
        self._check_settings()
        exchange, client = self.exchange, self.client
        body = self.body = client._body(messages, params, exchange.stream)
        for refused in client._refused:  # this server's known refusals, adjusted in advance
            exchange.adjust(body, refused)
        answer = exchange.request(body)
        kind, first = exchange.kind(answer)
        return answer, first, kind == "events"

    def _take_whole(self, answer: "http.client.HTTPResponse", first: bytes) -> "Optional[str]":
        """Read a whole reply and give it to the assembler: its text."""
        text = self.assembler.whole(self._read_json(answer, first))
        self._progress()
        return text

    def _progress(self) -> None:
        """After each event, or a whole reply: note the first token, give on the reasoning."""
        assembler = self.assembler
        if self.first_token is None and assembler.began:
            self.first_token = time.monotonic() - self.started
        if self.on_reasoning is not None and len(assembler.reasoning) > self.given:
            for thought in assembler.reasoning[self.given:]:
                self.given += 1
                try:
                    self.on_reasoning(thought)
                except Exception as exc:
                    raise _Failure("writing the reasoning failed: " + _describe(exc), "output")

    def _read_events(self, answer: "http.client.HTTPResponse", data: bytes) -> "Iterator[str]":
        """A stream's events, read by read; the text of each, as it comes. Once the general
        path has taken an event that held one content delta alone, the next ones in the
        same envelope (``_Envelope``) are taken at once."""
        exchange, assembler, guard = self.exchange, self.assembler, self.guard
        decoder = _SSEDecoder(self.settings.max_bytes)
        event, read, content = assembler.event, exchange.read, assembler.content
        envelope = None  # type: Optional[_Envelope]
        data, at = data or read(answer), 0  # where the read's events not yet taken begin
        while True:
            if envelope is not None and data:  # the usual events: their text at once
                if not at:
                    text = envelope.text(data)
                    if text is not None:  # a read of one event, as chunked streams have them
                        if guard.halted:  # a cancel while the last text was written ends the call
                            guard.check()
                        content.append(text)
                        yield text
                        data = read(answer)
                        continue
                texts, taken = envelope.take(data, at)  # a read of many, or the rest of one
                for text in texts:
                    if guard.halted:  # a cancel between two events of one read ends the call
                        guard.check()
                    content.append(text)
                    yield text
                if taken > at:  # the general path takes the next event, if any
                    data, at = (read(answer), 0) if taken == len(data) else (data, taken)
                    continue
            # the general path, an event at a time (the envelope may take the next ones)
            piece, at = _first_event(data, at)
            events = decoder.feed(piece) if piece else decoder.close()
            for kind, payload in events:
                if guard.halted:  # one read may hold many events: a cancel ends the call here
                    guard.check()
                text = event(kind, payload)
                self._progress()
                if text:
                    yield text
            if assembler.done:
                assembler.check()
                exchange.drain(answer)
                break
            if not piece:
                guard.check()  # the end may be a cancel's: its shut-down socket
                assembler.ended(exchange.received > 0)
                break
            if envelope is None and len(events) == 1 and text and self.envelopes:
                envelope = _Envelope.of(piece, text, events[0])
            if at == len(data):
                data, at = read(answer), 0

    def _read_json(self, answer: "http.client.HTTPResponse", first: bytes) -> "Any":
        data = self.exchange.read_all(answer, first)
        try:
            if len(data) > _SHALLOW_SIZE:  # checked before it is decoded
                _check_json(data, self.settings.max_bytes)
            text = data.decode("utf-8", "replace")
            del data  # the text alone is kept
            reply = _loads(text)
        except _Costly as exc:
            raise _Failure(str(exc), "too_large")
        except (ValueError, RecursionError):
            raise _Failure("the server sent invalid JSON: %s" % _clip(text), "invalid_reply")
        if not isinstance(reply, dict):
            raise _Failure("the server sent JSON that is not an object: %s" % _clip(text),
                           "invalid_reply")
        self.guard.check()  # parsing took long: honour a cancel or the deadline before going on
        return reply

    def response(self) -> Response:
        """The call's :class:`Response`, from what has arrived so far."""
        exchange, assembler = self.exchange, self.assembler
        response = assembler.response(self.error, self.cancelled, self.settings.secrets, self.kind)
        response.overflow = self.overflow if response.error_kind == "context_overflow" else None
        response.status = exchange.status
        response._headers = exchange.headers
        response.first_token_seconds, response.total_seconds = self.first_token, self.seconds
        if self.body is not None and response.ok:
            response.warnings = _warnings(exchange.notes, self.body, exchange.sent, response,
                                          assembler.fingerprint)
        elif exchange.notes:
            response.warnings = list(exchange.notes)
        return response


def _content_only(chunk: "Any", text: str) -> bool:
    """Whether the assembler took nothing from a chunk but one delta's text (``_apply``)."""
    if (not isinstance(chunk, dict) or chunk.get("error") is not None or chunk.get("usage")
            or chunk.get("object") == "error" or "x_groq" in chunk or "timings" in chunk):
        return False
    choices = chunk.get("choices")
    if not isinstance(choices, list) or len(choices) != 1 or not isinstance(choices[0], dict):
        return False
    choice = choices[0]
    delta = choice.get("delta")
    return (isinstance(delta, dict) and delta.get("content") == text and _ASIDES.isdisjoint(delta)
            and not (choice.get("finish_reason") or choice.get("usage") or choice.get("logprobs")))


def _first_event(data: bytes, at: int) -> "Tuple[bytes, int]":
    """The first event in ``data`` from ``at`` (to a blank line, as LF streams end them); its end."""
    end = data.find(b"\n\n", at) + 2
    return (data[at:end], end) if 1 < end < len(data) else (data[at:] if at else data, len(data))


class _Envelope:
    """The bytes around the text of one content-only event, to take the next ones at once.

    An event that is ``prefix``, a JSON string, then ``suffix`` says what the one it was learned
    from said (a probe in the string's place, parsed, was the delta's text): that event only added
    its text to the content (no id or model to learn, no usage, finish, reasoning, tool call or
    log-probabilities), and so does the next. Only events of at most ``_SHALLOW_SIZE`` bytes,
    which the JSON checks pass by.
    """

    __slots__ = ("prefix", "suffix", "at", "end")

    def __init__(self, prefix: str, suffix: str) -> None:
        self.prefix, self.suffix = prefix, suffix
        self.at, self.end = len(prefix), -len(suffix)

    def take(self, data: bytes, at: int) -> "Tuple[List[str], int]":
        """The texts of the events in this envelope that ``data`` holds from ``at`` on; their end."""
        texts, size = [], len(data)
        while at < size:
            end = data.find(b"\n\n", at) + 2
            text = self.text(data[at:end]) if end > 1 else None
            if text is None:
                break
            texts.append(text)
            at = end
        return texts, at

    def text(self, data: bytes) -> "Optional[str]":
        """The text of an event in this envelope; None for any other read."""
        if len(data) > _SHALLOW_SIZE:
            return None
        try:
            raw = data.decode("utf-8")
            if raw.startswith(self.prefix) and raw.endswith(self.suffix):
                text, end = _scanstring(raw, self.at)
                if end - 1 == len(raw) + self.end and text:
                    return text  # type: ignore[no-any-return]
        except ValueError:  # not UTF-8, or no JSON string there
            pass
        return None

    @staticmethod
    def of(data: bytes, text: str, taken: "Tuple[str, Any]") -> "Optional[_Envelope]":
        """The envelope of ``data``, a read that was one event with a delta of ``text`` alone."""
        kind, chunk = taken
        if (kind != "message" or len(data) > _SHALLOW_SIZE or data[:6] != b"data: "
                or data.count(b"\n") != 2 or data[-2:] != b"\n\n" or b"\r" in data
                or not _content_only(chunk, text)):
            return None
        raw = data.decode("utf-8", "replace")
        probe = "y" if text == "x" else "x"
        quote = raw.find('"')
        while quote >= 0:  # each JSON string in turn: the one that is the delta's text?
            try:
                said, end = _scanstring(raw, quote + 1)
                if said == text:  # a probe in its place must be the delta's text, all else equal
                    echoed = _json(raw[6:quote + 1] + probe + raw[end - 1:-2])
                    delta = echoed["choices"][0]["delta"]
                    if delta["content"] == probe:
                        delta["content"] = text
                        if echoed == chunk:
                            return _Envelope(raw[:quote + 1], raw[end - 1:])
            except (ValueError, RecursionError, LookupError, TypeError):
                return None
            quote = raw.find('"', end)
        return None


class _Guard:
    """A call's deadline and cancel: ``cancel()`` (from any thread, under the client's lock)
    and the deadline's timer wake the call wherever it waits, shutting down its socket
    (a connect, a TLS handshake, a read) or setting the event a pause before a retry
    waits on. Only the process that opened a socket shuts it down (not a fork's child)."""

    # where each guard starts
    cancelled = expired = False  # cancel() came; the deadline passed
    halted = False  # either of them: the call ends at its next check
    stopped = False  # the call is over: its outcome stands, whatever cancel() comes
    sock = None  # type: Any
    wake = None  # type: Optional[threading.Event]
    deadline_at = 0.0
    timer = None  # type: Optional[threading.Timer]

    def __init__(self, client: Client) -> None:
        self.client, self.pid = client, os.getpid()

    def start(self) -> None:
        """Be one of the client's calls in flight, and start the deadline's timer."""
        client = self.client
        client._active.add(self)  # cancel() goes through a copy, under the client's lock
        if client._settings.deadline:  # a timer bounds every wait, http.client's own loops too
            self.deadline_at = time.monotonic() + client._settings.deadline
            self.timer = threading.Timer(client._settings.deadline, self._expire)
            self.timer.daemon = True
            self.timer.start()

    def stop(self) -> None:
        """The call is over: stop the timer, and no cancel() touches its socket again."""
        timer, self.timer = self.timer, None  # it holds this guard: no cycle is left behind
        if timer is not None:
            timer.cancel()
        with self.client._lock:
            self.client._active.discard(self)
            self.sock = None
            self.stopped = True

    def cancel(self) -> None:
        """Mark the call cancelled and wake it (under the client's lock); a call that is
        over keeps its outcome (closing a stream that has ended changes nothing)."""
        if not self.stopped:
            self.cancelled = self.halted = True
            self._wake_up()

    def _expire(self) -> None:
        """The deadline passed: end the call as cancel() would (from the timer's thread)."""
        with self.client._lock:
            if self in self.client._active:
                self.expired = self.halted = True
                self._wake_up()

    def _wake_up(self) -> None:
        if self.wake is not None:
            self.wake.set()
        if self.sock is not None and self.pid == os.getpid():  # never a parent's socket
            try:  # shutdown wakes a recv blocked in another thread; close() would not
                socket.socket.shutdown(self.sock, socket.SHUT_RDWR)
            except OSError:
                pass

    def check(self) -> None:
        """End the call here when it was cancelled or its deadline passed (the call's
        boundary tells which)."""
        if self.halted:
            raise _Cancelled()

    def attach(self, sock: "Any") -> None:
        """Show ``sock`` to cancel() and the deadline, to shut down (a cancel that came
        before it saw no socket: this check ends the call)."""
        self.sock = sock
        self.check()

    def remaining(self) -> float:
        remaining = self.deadline_at - time.monotonic()
        if remaining <= 0:
            raise _Failure("deadline of %gs exceeded" % self.client._settings.deadline, "timeout")
        return remaining

    def sleep(self, delay: float, why: str, kind: str) -> None:
        """Wait ``delay`` seconds, unless cancel() or the deadline comes first."""
        if self.deadline_at and delay >= self.remaining():
            raise _Failure(why or "deadline of %gs exceeded" % self.client._settings.deadline,
                           kind or "timeout")
        if self.wake is None:
            self.wake = threading.Event()
        self.wake.wait(delay)
        self.check()

    def connect(self, connection: "http.client.HTTPConnection") -> None:
        """``connection.connect()``, its socket and TLS handshake shown to cancel() meanwhile."""
        context = getattr(connection, "_context", None)  # an HTTPSConnection's
        connection._create_connection = self.open  # type: ignore[attr-defined]
        if context is not None:
            connection._context = _Handshake(context, self)  # type: ignore[attr-defined]
        try:
            connection.connect()
        finally:  # hold no call: a client dropped is freed, and its sockets closed, at once
            connection._create_connection = socket.create_connection  # type: ignore[attr-defined]
            if context is not None:
                connection._context = context  # type: ignore[attr-defined]

    def open(self, address: "Tuple[str, int]", timeout: "Any" = None,
             source_address: "Any" = None) -> socket.socket:
        """``socket.create_connection``, with each socket shown to ``cancel()`` before it
        connects: shutting it down wakes a connect that waits (closing it would not)."""
        problem = OSError("no address found for %s" % address[0])  # type: OSError
        for family, kind, protocol, _, where in socket.getaddrinfo(
                address[0], address[1], 0, socket.SOCK_STREAM):
            sock = socket.socket(family, kind, protocol)
            try:
                self.attach(sock)
                sock.settimeout(timeout)
                sock.connect(where)  # from any source address: none is ever set
                return sock
            except OSError as exc:
                sock.close()
                self.check()
                problem = exc
            except BaseException:
                sock.close()
                raise
        raise problem


class _Exchange:
    """The HTTP of one call: a connection (back to the pool only after a whole final answer),
    the request and its retries, the answer's bytes (read up to a cancel, the deadline
    or ``max_bytes``)."""

    # where each exchange starts (set on the instance as it goes)
    connection = None  # type: Optional[http.client.HTTPConnection]
    answer = None  # type: Optional[_FinalResponse]
    status = sent = received = 0  # the answer's status; the bytes of the request, and received
    retried = 0  # retries so far
    headers = None  # type: Optional[http.client.HTTPMessage]
    resent = frozenset()  # type: FrozenSet[str]  # the refusals this call answered with a resend
    notes = ()  # type: Tuple[str, ...]  # what the client changed in the request: warnings

    def __init__(self, client: Client, stream: bool, guard: _Guard) -> None:
        self.client, self.stream, self.guard = client, stream, guard

    def _note(self, text: str) -> None:
        """Say in the trace why a request goes again (a rare path: no cost to a call)."""
        if self.client._settings.tracer is not None:
            self.client._settings.tracer.line("* " + text)

    def adjust(self, body: "Dict[str, Any]", refused: str) -> None:
        """Change the request as a server that refused ``refused`` wants it; note what changed."""
        note = _adjusted(body, refused)
        if note:
            self.notes += (note,)

    def request(self, body: "Optional[Dict[str, Any]]") -> "http.client.HTTPResponse":
        """POST body (GET the models when None) until a 2xx answer, as ``_policy`` says."""
        client, retries = self.client, self.client._settings.retries
        data = None if body is None else _encode(body)
        while True:
            self.sent = len(data or b"")
            try:
                answer = self._send(data)
            except _Failure as failure:
                if not failure.retryable or self.guard.halted:
                    raise
                step, detail = _policy(None, 0, "", None, self.retried, retries, self.resent)
                if step != "retry":
                    raise
                self._retry(detail, str(failure), failure.kind)
                continue
            self.status, self.headers = answer.status, answer.msg
            if 200 <= answer.status < 300:
                return answer
            message, raw = self._error_of(answer, data is not None)
            step, detail = _policy(body, answer.status, raw, answer.getheader("Retry-After"),
                                   self.retried, retries, self.resent)
            if step == "resend":  # a known refusal: the request goes again, changed, once
                self._note("the server refused %s: the request goes again, changed" % detail)
                self.resent |= {detail}
                client._refused |= {detail}  # remembered: later calls adjust before sending
                self.adjust(body, detail)  # type: ignore[arg-type]
                data = _encode(body)  # type: ignore[arg-type]
                continue
            kind, overflow = _error_kind(answer.status, raw)
            if step == "retry":
                self._retry(detail, message, kind)
                continue
            raise _Failure(message + detail, kind, overflow=overflow)

    def _retry(self, delay: "Optional[float]", why: str, kind: str) -> None:
        """Wait before a retry: ``delay``, or the backoff (exponential, with jitter) when None."""
        if delay is None:
            import random
            step = min(_BACKOFF_CAP, _BACKOFF_FIRST * 2 ** self.retried)
            delay = step / 2 + random.uniform(0, step / 2)
        self.retried += 1
        self._note("retry %d of %d after: %s" % (self.retried, self.client._settings.retries, why))
        self.guard.sleep(delay, why, kind)

    def _send(self, data: "Optional[bytes]") -> "http.client.HTTPResponse":
        """Send the request; a kept-alive connection that the server closed is retried once."""
        client = self.client
        connection = self.connection = self.connection or _checkout(client, self.guard.pid)
        settings = client._settings
        lines = settings.stream_lines if self.stream else settings.plain_lines
        if data is not None:  # http.client's order; once, however often the request goes
            lines = [b"Content-Length: %d" % len(data)] + lines
        reused, self.answer = connection.sock is not None, None  # None: a request is on its way
        while True:
            if connection.sock is None:
                self._connect(connection)
            self.guard.attach(connection.sock)
            sent_at = time.monotonic()
            try:
                if data is None:
                    connection.putrequest("GET", settings.models_target, **settings.skips)
                else:
                    connection.putrequest("POST", settings.chat_target, **settings.skips)
                # what connection.request() sends, but each header checked once per client
                connection._buffer.extend(lines)  # type: ignore[attr-defined]
                connection.endheaders(data)
                answer = self.answer = connection.getresponse()  # type: ignore[assignment]
                return answer
            except (ConnectionError, http.client.BadStatusLine) as exc:
                connection.close()
                self.guard.check()  # a cancel shut the socket down
                if reused and _unread(exc, time.monotonic() - sent_at, connection):
                    reused = False  # the server closed it as it went idle: one fresh try
                    self._note("the server closed the kept-alive connection without reading the"
                               " request: it goes again on a new one")
                    continue
                raise _Failure(_network_error(exc, client), "network", retryable=True)
            except (OSError, http.client.HTTPException, ValueError) as exc:
                connection.close()
                raise _Failure(_network_error(exc, client), _network_kind(exc))

    def _connect(self, connection: "http.client.HTTPConnection") -> None:
        client, guard = self.client, self.guard
        timeout = client._settings.connect_timeout
        if guard.deadline_at:
            timeout = min(timeout, guard.remaining())
        connection.timeout = timeout
        where = _peer(client)
        started = time.monotonic()
        try:
            guard.connect(connection)
        except socket.gaierror as exc:
            raise _Failure("cannot resolve host %s (%s)" % (
                (client._settings.proxy or (client._settings.host,))[0], exc.strerror or exc),
                "network")
        except ConnectionRefusedError:
            raise _Failure("connection refused: %s" % where, "network", retryable=True)
        except socket.timeout:
            handshake = connection.sock is not None  # TCP is up: TLS (or a proxy) timed out
            connection.close()  # never keep a socket whose TLS handshake did not finish
            if handshake and client._settings.scheme == "https" and not client._settings.proxy:
                raise _Failure("timed out after %gs in the TLS handshake with %s (is it a plain"
                               " HTTP server? then use an http:// URL)" % (timeout, where), "timeout")
            raise _Failure("timed out after %gs connecting to %s" % (timeout, where), "timeout",
                           retryable=True)
        except (OSError, http.client.HTTPException, ValueError) as exc:
            connection.close()
            raise _Failure("cannot connect to %s: %s" % (where, _describe(exc)), "network",
                           retryable=isinstance(exc, ConnectionError))
        connection.round_trip = time.monotonic() - started  # type: ignore[attr-defined]
        sock = connection.sock
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(client._settings.read_timeout)
        guard.check()

    def _error_of(self, answer: "http.client.HTTPResponse", posted: bool) -> "Tuple[str, str]":
        """Read an error answer: its one-line message and its raw text (lowercased)."""
        message, raw = _error_answer(answer)
        # after a 101 the connection speaks another protocol; the rest of a long body is not
        # worth reading
        if (answer.status < 200 or not answer.isclosed()) and self.connection is not None:
            self.connection.close()
        if answer.status in (404, 405):  # most often a base_url with a wrong path: show it
            settings = self.client._settings
            tried = "%s %s" % ("POST" if posted else "GET", _url_to_show(
                settings.url(settings.chat_path if posted else settings.models_path)))
            message = "%s (%s)" % (message if len(message) <= 160 else message[:157] + "...", tried)
        return message, raw

    def kind(self, answer: "http.client.HTTPResponse") -> "Tuple[str, bytes]":
        """``("json", ...)`` or ``("events", ...)``, with the bytes read to tell them apart."""
        kind = (answer.getheader("Content-Type") or "").lower()
        if "json" in kind:
            return "json", b""
        if "event-stream" in kind:
            return "events", b""
        first = self.read(answer)  # no telling type: look at the first bytes
        start = first.lstrip(b"\xef\xbb\xbf \t\r\n")[:6]
        if start[:1] in (b"{", b"["):
            return "json", first
        if start and not any(field.startswith(start) or start.startswith(field)
                             for field in _SSE_STARTS):  # HTML, plain text: no reply at all
            raise _Failure("the server answered with %s, not %s: %s" % (
                kind or "no content type", "an event stream" if self.stream else "JSON",
                _clip(first)), "invalid_reply")
        return "events", first

    def read(self, answer: "http.client.HTTPResponse", whole: bool = False) -> bytes:
        """Read what is there (at most one buffer), as soon as anything is; count it (the one
        place that counts, whatever the framing, against ``max_bytes``). A cancel or the
        deadline ends the call here too: data that keeps coming cannot keep it busy."""
        if self.guard.halted:
            self.guard.check()
        try:
            data = answer.read() if whole else answer.read1(_READ_SIZE)
        except http.client.IncompleteRead:
            raise _Failure("connection closed in the middle of a chunk: the response was cut short",
                           "network")
        except (OSError, http.client.HTTPException, ValueError) as exc:
            raise _Failure(_network_error(exc, self.client), _network_kind(exc))
        self.received += len(data)
        if self.received > self.client._settings.max_bytes:
            raise _Failure("response larger than max_bytes (%d bytes)"
                           % self.client._settings.max_bytes, "too_large")
        return data

    def read_all(self, answer: "http.client.HTTPResponse", first: bytes) -> bytes:
        """The whole body, ``first`` (bytes already read) included."""
        if answer.length is not None:  # known: refuse it unread when too long
            if self.received + answer.length > self.client._settings.max_bytes:
                raise _Failure("response larger than max_bytes (%d bytes)"
                               % self.client._settings.max_bytes, "too_large")
            rest = self.read(answer, whole=True)  # read() closes the answer: reusable
            return first + rest if first else rest
        parts = [first]
        data = self.read(answer)
        while data:
            parts.append(data)
            data = self.read(answer)
        return b"".join(parts)

    def drain(self, answer: "http.client.HTTPResponse") -> None:
        """After [DONE], read the end of the body (for a second at most) for the connection's reuse."""
        read_timeout, give_up = self.client._settings.read_timeout, time.monotonic() + 1.0
        sock = self.guard.sock
        try:
            for _ in range(64):
                left = give_up - time.monotonic()
                if left <= 0:
                    break
                sock.settimeout(min(left, read_timeout))
                if not answer.read1(_READ_SIZE):
                    sock.settimeout(read_timeout)
                    return
        except (OSError, http.client.HTTPException, ValueError):
            pass

    def release(self) -> None:
        """Give the connection back for reuse when its answer was read whole (to its end,
        trailers and all, with no cancel or deadline since), else close it."""
        connection, self.connection = self.connection, None
        if connection is not None:
            answer, guard = self.answer, self.guard
            if answer is not None and answer.length == 0 and answer.fp is not None:  # read to
                answer.close()  # the end of its Content-Length, which some Pythons leave open
            if answer is None:  # no answer yet: reusable with no request in flight
                finished = connection.sock is None
            else:
                finished = answer.isclosed() and not answer.unfinished
            _checkin(self.client, connection, finished and not guard.halted, guard.pid)


class _Handshake:
    """An SSL context whose sockets are shown to ``cancel()`` before their handshake."""

    def __init__(self, context: "Any", guard: _Guard) -> None:
        self._context, self._guard = context, guard

    def wrap_socket(self, sock: "Any", server_hostname: "Optional[str]" = None,
                    **options: "Any") -> "Any":
        tls = self._context.wrap_socket(sock, server_hostname=server_hostname,
                                        do_handshake_on_connect=False, **options)
        try:
            self._guard.attach(tls)
            tls.do_handshake()
        except BaseException:
            tls.close()  # it holds the socket now: http.client would close only the old one
            raise
        return tls

    def __getattr__(self, name: str) -> "Any":  # check_hostname and the like
        return getattr(self._context, name)


class _FinalResponse(http.client.HTTPResponse):
    """http.client's response, read as a call needs it: trailers bounded, and every interim
    (1xx) response skipped, not only ``100 Continue`` (RFC 9110: any number may come
    before the final one, which would else be left in the socket for the next call)."""

    unfinished = False  # trailers were left unread: the connection cannot be reused

    def _read_status(self) -> "Tuple[str, int, str]":
        read = http.client.HTTPResponse._read_status  # type: ignore[attr-defined]
        version, status, reason = read(self)
        while 100 <= status < 200 and status != 101:  # 101: a protocol switch, never asked for
            http.client.parse_headers(self.fp)  # skipped: an interim's
            version, status, reason = read(self)
        return version, status, reason

    def _read_and_discard_trailer(self) -> None:
        """Skip the trailer lines after the last chunk, ``_MAX_TRAILERS`` bytes at most (not
        without end, as http.client does); more, or a failure, leaves the body whole and
        the connection not reused."""
        left = _MAX_TRAILERS
        try:
            while left > 0:
                line = self.fp.readline(left)
                if line in (b"\r\n", b"\n", b""):
                    return
                left -= len(line)
        except (OSError, ValueError):  # the deadline or a cancel shut the socket down
            pass
        self.unfinished = True


# ---- the client's connections: one idle connection per thread, reused while quiet


def _checkout(client: Client, pid: int) -> "http.client.HTTPConnection":
    """This thread's idle connection, reused only in the process that opened it and when the
    server has neither closed it nor sent anything since (stray bytes would be read as the
    next call's answer); else a new one (calls may overlap in a thread)."""
    slot = getattr(client._local, "slot", None)  # type: Optional[_Slot]
    if slot is not None and slot.connection is not None:
        connection, slot.connection = slot.connection, None
        if slot.pid == pid and _nothing_to_read(connection.sock):
            return connection
        connection.close()  # a parent's copy: closing ours leaves theirs open and intact
    connection = _new_connection(client)
    with client._lock:
        client._connections.add(connection)
    return connection


def _checkin(client: Client, connection: "http.client.HTTPConnection", reusable: bool,
             pid: int) -> None:
    slot = getattr(client._local, "slot", None)
    if slot is None:
        slot = client._local.slot = _Slot()
    if reusable and slot.connection is None:
        slot.connection, slot.pid = connection, pid
    else:
        connection.close()


class _Slot:
    """A thread's idle connection, closed when the thread ends; ``pid``: the process that
    opened it (a ``fork()``'s child never reads from nor shuts down its parent's socket)."""

    __slots__ = ("connection", "pid")

    def __init__(self) -> None:
        self.connection = None  # type: Optional[http.client.HTTPConnection]
        self.pid = 0

    def __del__(self) -> None:
        if self.connection is not None:
            self.connection.close()


def _nothing_to_read(sock: "Any") -> bool:
    """Whether an idle socket has nothing to read: no stray bytes, no close from the server."""
    if sock is None:
        return True
    pending = getattr(sock, "pending", None)  # TLS: bytes already decrypted wait in its buffer,
    if pending is not None and pending():  # where neither select() nor a peek sees them
        return False
    import select  # built in, and cheap; not loaded at import time
    try:
        return not select.select([sock], [], [], 0)[0]
    except (OSError, ValueError):  # a descriptor past FD_SETSIZE: peek instead
        pass
    timeout = sock.gettimeout()
    try:
        sock.settimeout(0.0)
        socket.socket.recv(sock, 1, socket.MSG_PEEK)  # the raw bytes, TLS or not
    except (BlockingIOError, InterruptedError):
        return True
    except OSError:
        return False
    finally:
        try:
            sock.settimeout(timeout)
        except OSError:
            pass
    return False


def _new_connection(client: Client) -> "http.client.HTTPConnection":
    settings = client._settings
    host, port = settings.proxy or (settings.host, settings.port)
    if settings.scheme == "http":
        connection = http.client.HTTPConnection(host, port, timeout=settings.connect_timeout)
    else:
        context = _tls_context(client)  # first: without ssl there is no HTTPSConnection
        connection = http.client.HTTPSConnection(
            host, port, timeout=settings.connect_timeout, context=context)
        if settings.proxy:
            connection.set_tunnel(settings.host, settings.port, headers=settings.tunnel_headers)
    connection.response_class = _FinalResponse
    if settings.tracer is not None:  # only then: a call without a trace pays nothing for it
        _Wire(settings.tracer, connection)
    return connection


def _tls_context(client: Client) -> "Any":
    """The client's SSL context, made once."""
    if client._tls is None:
        try:
            import ssl
        except ImportError:
            raise _Failure("https needs Python's ssl module, which this Python lacks;"
                           " use an http:// URL", "bad_request")
        try:
            context = ssl.create_default_context(cafile=client._settings.ca_file)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            raise _Failure("cannot load ca_file %r: %s" % (client._settings.ca_file, _describe(exc)),
                           "bad_request")
        if not client._settings.verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        client._tls = context
    return client._tls


# ---- the trace: what goes over the wire, secrets hidden

_TRACE_LINE = 2000  # characters of a traced line that are kept
_TRACE_STRING = 200  # characters of a long string of a request body that are kept
# how bytes received are shown: control characters escaped, so that each read is one line
_TRACE_ESCAPES = {**_VISIBLE_CONTROLS, 9: "\\t", 10: "\\n", 13: "\\r"}  # type: Dict[int, str]


def _tracer_for(trace: "Any", environ: "Any", secrets: "List[str]") -> "Optional[_Tracer]":
    """The client's tracer: to ``trace`` (a writer), or as ``LLM_TRACE`` says when None."""
    if trace is None:
        where = environ.get("LLM_TRACE", "").strip()
        if where in ("", "0"):
            return None
        trace = sys.stderr if where == "1" else _Appending(where)
    elif trace is False:
        return None
    elif not callable(getattr(trace, "write", None)):
        raise TypeError("trace must be a writer with write(str), got %s" % _short_repr(trace))
    return _Tracer(trace, secrets)


class _Appending:
    """A file that a trace appends to, opened by the first line (in the tracer's thread)."""

    def __init__(self, path: str) -> None:
        self.path, self.file, self.lock = path, None, threading.Lock()  # type: str, Any, Any

    def write(self, text: str) -> None:
        with self.lock:  # a close() from a client's flush() waits for the line being written
            if self.file is None:
                self.file = open(self.path, "a", encoding="utf-8", errors="replace")
            self.file.write(text)
            self.file.flush()

    def close(self) -> None:
        with self.lock:
            file, self.file = self.file, None
        if file is not None:
            file.close()


class _Tracer:
    """A client's trace: what goes over the wire, a line at a time, every secret hidden, to
    ``out`` from a thread of its own through a bounded queue: a writer that raises or
    blocks neither breaks nor hangs a call (the lines it drops are counted)."""

    def __init__(self, out: "Any", secrets: "List[str]") -> None:
        self.out, self.secrets, self.dropped = out, secrets, 0
        self.runs = list(dict.fromkeys(  # every run of 6 characters of a secret, once
            s[at:at + 6] for s in secrets for at in range(len(s) - 5)))
        self.lock = threading.Lock()
        self.lines = None  # type: Any  # a queue.Queue, made with the thread

    def line(self, text: str) -> None:
        """Trace one line: each secret hidden (whole, and any run of 6 of its characters), then cut."""
        text = _redact(text, self.secrets)
        for run in self.runs:
            if run in text:
                text = text.replace(run, "***")
        if len(text) > _TRACE_LINE:
            text = "%s ... (%d characters in all)" % (text[:_TRACE_LINE], len(text))
        with self.lock:
            if self.lines is None:
                import queue
                self.lines = queue.Queue(10000)
                threading.Thread(target=self._write, args=(self.lines,), daemon=True).start()
        try:
            self.lines.put_nowait(text)
        except Exception:  # queue.Full: the writer is slower than the wire
            with self.lock:
                self.dropped += 1

    def _write(self, lines: "Any") -> None:
        """The thread: write each line, until the writer fails."""
        out = self.out
        while True:
            text = lines.get()
            try:
                if out is not None:
                    if self.dropped:
                        with self.lock:
                            dropped, self.dropped = self.dropped, 0
                        text = "* %d lines dropped: the trace writer was too slow\n%s" % (dropped, text)
                    out.write(text + "\n")
                    flush = getattr(out, "flush", None)
                    if flush is not None:
                        flush()
            except Exception:  # a trace must never break a call: stop tracing instead
                out = None
            finally:
                lines.task_done()

    def flush(self, wait: float = 1.0) -> None:
        """Wait (a bounded time) until the lines traced so far are written."""
        lines, give_up = self.lines, time.monotonic() + wait
        while lines is not None and lines.unfinished_tasks and time.monotonic() < give_up:
            time.sleep(0.01)
        if isinstance(self.out, _Appending) and not (lines and lines.unfinished_tasks):
            self.out.close()  # the next line opens it again


class _Wire:
    """One traced connection: its connects, the bytes it sends, and its answers as they come."""

    def __init__(self, tracer: _Tracer, connection: "http.client.HTTPConnection") -> None:
        self.tracer, self.sent_at = tracer, time.monotonic()
        self.where = _where(connection.host, connection.port)
        self._send, self._connect = connection.send, connection.connect
        connection.send = self.send  # type: ignore[method-assign]
        connection.connect = self.connect  # type: ignore[method-assign]
        wire = self

        class Traced(connection.response_class):  # type: ignore[name-defined, misc]
            def __init__(self, *args: "Any", **options: "Any") -> None:
                super().__init__(*args, **options)
                self.fp = _TracedFile(self.fp, wire)  # type: ignore[has-type]
        connection.response_class = Traced

    def connect(self) -> None:
        self.tracer.line("* connecting to %s" % self.where)
        try:
            self._connect()
        except BaseException as exc:
            self.tracer.line("* cannot connect to %s: %s" % (self.where, _describe(exc)))
            raise

    def send(self, data: "Any") -> None:
        if isinstance(data, bytes) and data[:1].isalpha() and b"\r\n\r\n" in data[:65536]:
            head = data.decode("latin-1").split("\r\n")
            self.tracer.line("* request to %s" % self.where)
            for line in head[:-1]:
                self.tracer.line(("> " + line).rstrip())
            self.sent_at = time.monotonic()
        else:
            self.tracer.line("> " + _traced_body(data))
        self._send(data)

    def received(self, data: "Any", line: bool = False) -> None:
        text = bytes(data).decode("utf-8", "replace")
        text = (text.rstrip("\r\n") if line else text).translate(_TRACE_ESCAPES)
        self.tracer.line("< +%.3fs %s" % (time.monotonic() - self.sent_at, text))


class _TracedFile:
    """An answer's file, whose every read (status lines, headers, body) is traced."""

    def __init__(self, fp: "Any", wire: _Wire) -> None:
        self.fp, self.wire = fp, wire

    def readline(self, *limit: "Any") -> bytes:
        return self._traced(self.fp.readline(*limit), line=True)

    def read(self, *size: "Any") -> bytes:
        return self._traced(self.fp.read(*size))

    def read1(self, *size: "Any") -> bytes:
        return self._traced(self.fp.read1(*size))

    def _traced(self, data: bytes, line: bool = False) -> bytes:
        if data:
            self.wire.received(data, line)
        return data

    def readinto(self, buffer: "Any") -> int:
        count = self.fp.readinto(buffer)  # type: int
        if count:
            self.wire.received(memoryview(buffer)[:count])
        return count

    def __getattr__(self, name: str) -> "Any":  # close, peek, and the rest
        return getattr(self.fp, name)


def _traced_body(data: "Any") -> str:
    """A request body as the trace shows it: JSON with each long string cut, its size said."""
    text = bytes(data).decode("utf-8", "replace")
    try:
        body = json.loads(text)
    except (ValueError, RecursionError):  # not JSON: the text, cut as any line
        return text

    def cut(value: "Any") -> "Any":
        if isinstance(value, str) and len(value) > _TRACE_STRING:
            return "%s... (%d characters in all)" % (value[:_TRACE_STRING], len(value))
        if isinstance(value, list):
            return [cut(item) for item in value]
        if isinstance(value, dict):
            return {key: cut(item) for key, item in value.items()}
        return value
    return json.dumps(cut(body), ensure_ascii=False)


# ---------------------------------------------------------------- the SSE decoder


class _SSEDecoder:
    """Server-sent events, incrementally: bytes in, ``(event type, payload)`` out.

    As https://html.spec.whatwg.org/multipage/server-sent-events.html says: lines end in CRLF, LF
    or CR (a CRLF may be split across reads); a leading BOM is dropped; ``data:`` lines join with
    LF; comments, ``id:`` and ``retry:`` are ignored; a blank line ends an event. Lines are split
    as bytes and decoded whole (a character split across reads stays whole; U+2028 in JSON ends no
    line). The payload is the data parsed as JSON (``_DONE`` for ``[DONE]``; the text when it is
    not JSON); data that completes a JSON value is taken at once, so that servers which end events
    with one newline still stream, and no line is parsed more than twice. Beyond the spec, an
    ``error:`` line (older llama.cpp) is an ``error`` event of its own.
    """

    def __init__(self, budget: int = _MAX_BYTES) -> None:
        self._budget = budget  # for the cost of parsing one event (see _json)
        self._depth = 0  # brackets open in the event's data so far, while it may be JSON
        self._partial = []  # type: List[bytes]  # the pieces of a line not ended yet
        self._after_cr = self._started = False
        self._kind = ""
        self._data = []  # type: List[bytes]

    def feed(self, chunk: bytes) -> "List[Tuple[str, Any]]":
        if (chunk[:6] == b"data: " and chunk[-2:] == b"\n\n" and self._started
                and not (self._partial or self._data or self._after_cr)
                and chunk.find(b"\n") == len(chunk) - 2 and b"\r" not in chunk):
            kind, self._kind = self._kind or "message", ""  # the usual read: one whole event
            return [(kind, _payload([chunk[:-2]], False, self._budget))]
        if self._after_cr:
            self._after_cr = False
            if chunk[:1] == b"\n":  # the second half of a CRLF split across reads
                chunk = chunk[1:]
        if b"\r" in chunk:
            self._after_cr = chunk.endswith(b"\r")
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        if not self._started:
            chunk = b"".join(self._partial) + chunk
            self._partial = []
            if len(chunk) < 3 and b"\xef\xbb\xbf".startswith(chunk):
                self._partial.append(chunk)  # too short to tell whether it is a BOM
                return []
            self._started = True
            if chunk.startswith(b"\xef\xbb\xbf"):
                chunk = chunk[3:]
        if b"\n" not in chunk:
            if chunk:
                self._partial.append(chunk)  # a long line is joined once, when it ends
            return []
        if self._partial:
            self._partial.append(chunk)
            chunk = b"".join(self._partial)
            self._partial = []
        lines = chunk.split(b"\n")
        del chunk  # a long line is held once, not twice
        rest = lines.pop()
        if rest:
            self._partial.append(rest)
        return self._lines(lines)

    def close(self) -> "List[Tuple[str, Any]]":
        """The end of the stream: what is left, taken leniently (the spec drops it)."""
        rest = b"".join(self._partial)
        self._partial = []
        return self._lines([rest, b""] if rest else [b""])

    def _lines(self, lines: "List[bytes]") -> "List[Tuple[str, Any]]":
        events = []
        data = self._data
        for line in lines:
            if line.startswith(b"data:"):
                data.append(line)  # whole: the value is read from it without a copy
                payload = self._complete(data)  # complete JSON? take it now
                if payload is not None:
                    events.append((self._kind or "message", payload))
                    del data[:]
                    self._kind = ""
            elif not line:
                if data:
                    events.append((self._kind or "message", _payload(data, False, self._budget)))
                    del data[:]
                self._kind = ""
            elif line[:1] != b":":  # not a comment
                field, _, value = line.partition(b":")
                value = value[1:] if value[:1] == b" " else value
                if field == b"data":  # "data" alone: an empty line of data, as the spec says
                    data.append(b"data:")
                elif field == b"event":
                    self._kind = value.decode("utf-8", "replace")
                elif field == b"error":  # older llama.cpp: "error: {...}", then [DONE]
                    events.append(("error", _payload([b"data:" + value], False, self._budget)))
        return events

    def _complete(self, data: "List[bytes]") -> "Any":
        """The event's data as JSON if its last line completes a JSON value, else None: it
        is tried where its brackets first balance (each line's counted once, outside
        its strings, which hold no line break), and nowhere else."""
        line = data[-1]
        if len(data) == 1:
            if line.endswith((b"}", b"]")):  # the usual event: one line of JSON
                payload = _payload(data, True, self._budget)
                if payload is not None:
                    return payload
            opens = line[_value_start(line):].lstrip(b" ")[:1] in (b"{", b"[")
            self._depth = _depth(line) if opens else 0
            return None
        if self._depth <= 0:  # not JSON, or its one try has failed: wait for the blank line
            return None
        self._depth += _depth(line)
        if self._depth > 0:
            return None
        self._depth = 0
        return _payload(data, True, self._budget)


def _value_start(line: bytes) -> int:
    """Where the value of a ``data:`` line starts: after ``data:`` and one space."""
    return 6 if line[5:6] == b" " else 5


def _depth(line: bytes) -> int:
    """Brackets opened minus brackets closed in a line of JSON, outside its strings."""
    if b'"' in line:
        line = b"".join(marks for _, marks in _outside_strings(line))
    return line.count(b"{") + line.count(b"[") - line.count(b"}") - line.count(b"]")


def _payload(lines: "List[bytes]", eager: bool, budget: int) -> "Any":
    """An event's data parsed as JSON; when it is not JSON, None if eager, else the text;
    data too costly to parse (``_check_json``) is an ``{"error": ...}`` of its own."""
    if len(lines) == 1:
        data, start = lines[0], _value_start(lines[0])
    else:
        data, start = b"\n".join(line[_value_start(line):] for line in lines), 0
    if len(data) - start == 6 and data.endswith(b"[DONE]"):
        return _DONE
    try:
        if len(data) > _SHALLOW_SIZE:  # checked before it is decoded, and decoded with no copy
            _check_json(data, budget)
            text = str(memoryview(data)[start:], "utf-8", "replace")
        else:
            text = data[start:].decode("utf-8", "replace")
        del data
        return _loads(text)
    except _Costly as exc:
        return {"error": str(exc)}
    except (ValueError, RecursionError):
        return None if eager else text


class _Costly(ValueError):
    """JSON too costly to parse: too many objects for memory, or nested too deep."""


def _json(text: str, budget: int = _MAX_BYTES) -> "Any":
    """``json.loads(text)``, when the text is not too costly to parse (``_check_json``)."""
    if len(text) > _SHALLOW_SIZE:  # room for nesting too deep
        _check_json(text.encode("utf-8", "surrogatepass"), budget)
    return _loads(text)


def _loads(text: str) -> "Any":
    """``json.loads(text)``, quicker for plain objects and safe from huge integers."""
    if len(text) > _MAX_INT_DIGITS:  # room for an integer that int() parses in quadratic time
        return json.loads(text, parse_int=lambda digits: (
            int(digits) if len(digits) <= _MAX_INT_DIGITS else float(digits)))
    try:
        value, end = _raw_decode(text)  # no whitespace scans around it, as json.loads has
        if end == len(text):
            return value
    except ValueError:
        pass
    return json.loads(text)  # surrounding space, trailing text, not JSON: json.loads decides


def _check_json(data: bytes, budget: int) -> None:
    """Refuse JSON text too costly to parse (``_Costly``): too many values, or too deep.

    Values: the text and its strings cost about twice its length (four bytes a character where
    Python stores text wide: ordinary text up to the budget is always read), each other value (a
    ``{}``: 64 bytes and more) up to ``_VALUE_COST``: text longer than ``_CHECKED_SIZE`` holds as
    many as 3 * budget bytes allow. Depth: near the recursion limit CPython 3.6 to 3.8 aborts the
    whole process (when a gc callback or a finalizer runs) instead of raising RecursionError.
    Every value but the first follows a ``,``, ``:``, ``[`` or ``{``, or is a string: when the
    whole text may hold too many of them, or of brackets, they are counted outside its strings.
    """
    size = len(data)
    allowed = max(0, 3 * budget - 2 * size) // _VALUE_COST if size > _CHECKED_SIZE else size
    opened = data.count(b"[") + data.count(b"{")
    if (opened <= _MAX_DEPTH and opened + data.count(b",") + data.count(b":")
            + data.count(b'"') // 2 <= allowed):
        return
    from itertools import accumulate, chain
    quotes = values = depth = 0
    for found, marks in _outside_strings(data):
        quotes += found
        values += len(marks) - marks.count(b"]") - marks.count(b"}")
        if values + quotes // 2 > allowed:
            raise _Costly("the reply is JSON of more than %d values in %d bytes: too many to"
                          " parse within max_bytes (%d bytes)" % (allowed, size, budget))
        if opened > _MAX_DEPTH:  # the deepest level so far, the opening brackets less "["s
            brackets = marks.translate(bytes.maketrans(b"{}", b"[]"), b",:")
            if max(accumulate(chain((depth,), map((92).__sub__, brackets)))) > _MAX_DEPTH:
                raise _Costly("the reply is JSON nested more than %d deep: too deep to parse"
                              % _MAX_DEPTH)
            depth += 2 * brackets.count(b"[") - len(brackets)


def _outside_strings(data: bytes) -> "Iterator[Tuple[int, bytes]]":
    """JSON text a block at a time: its quotes, and its commas, colons and brackets outside
    strings, in C, in linear time and bounded memory (escaped backslashes and quotes
    mark nothing; a block starts inside a string when the quotes before it are odd)."""
    if b"\\" in data:
        data = data.replace(b"\\\\", b"").replace(b'\\"', b"")
    inside = 0
    for at in range(0, len(data), 65536):
        marks = data[at:at + 65536].translate(None, _UNMARKED)
        quotes = marks.count(b'"')
        yield quotes, b"".join(marks.replace(b'""', b"").split(b'"')[inside::2])
        inside = (inside + quotes) % 2


# ---------------------------------------------------------------- the reply assembler


class _Assembler:
    """What a server's reply means: its parsed chunks (or the whole reply) in, text out.

    ``event()`` takes a stream's events, ``whole()`` a whole reply, each returning the text it
    adds; ``check()`` and ``ended()`` say whether what came is a reply at all; ``response()``
    makes the :class:`Response`. No sockets, no clock, no locks: every rule about what servers
    mean lives here (stop reasons in any spelling, one choice followed, tool calls in pieces,
    whole or as ``function_call``, reasoning under either name, usage wherever it is put, failures
    sent in-band in any shape).
    """

    # where each reply starts (set on the instance as the reply comes)
    followed = _ANY  # type: Any  # the index of the choice this reply keeps to
    reasoning_field = "reasoning_content"
    legacy_call = False  # the reply used the older function_call shape
    unknown = None  # type: Any  # the first event that was no chunk: a failure, maybe
    finish = None  # type: Any
    usage = timings = None  # type: Any
    model = id = fingerprint = ""
    think = 0  # a leading <think> block: 0 maybe to come, 1 in it, 2 just past it, 3 none
    by_index = None  # type: Optional[Dict[Any, Dict[str, Any]]]
    held = ""  # the content's start, held back while it may be (or end) a <think> block
    logprobs = None  # type: Optional[List[Any]]
    kept_logprobs = 0  # log-probability entries kept, top_logprobs included
    began = False  # something came to keep: text, reasoning, a tool call, a refusal
    done = False  # [DONE] or the whole reply came

    def __init__(self, max_bytes: int = _MAX_BYTES, think_tags: bool = True) -> None:
        self.max_bytes = max_bytes
        if not think_tags:
            self.think = 3
        self.content = []  # type: List[str]
        self.reasoning = []  # type: List[str]
        self.builders = []  # type: List[Dict[str, Any]]
        self.refusal = []  # type: List[str]

    def event(self, kind: str, payload: "Any") -> "Optional[str]":
        """Take one event of a stream: a chunk, ``_DONE``, an error, or something else
        (nothing after ``[DONE]`` counts, whether it came in the same read or later)."""
        if payload is _DONE or self.done:
            self.done = True
            return None
        if kind == "error":
            raise _in_band(payload, "the server sent an error event")
        if isinstance(payload, dict) and "choices" in payload:
            return self._apply(payload, "delta")
        if self.unknown is None:  # no chunk: perhaps a failure in a shape of its own
            self.unknown = payload
        return self._apply(payload, "delta") if isinstance(payload, dict) else None

    def whole(self, reply: "Dict[str, Any]") -> "Optional[str]":
        """Take a whole (not streamed) reply."""
        if "choices" not in reply and "error" not in reply and reply.get("object") != "error":
            raise _Failure("the reply has no choices: %s" % _clip(json.dumps(reply)), "invalid_reply")
        text = self._apply(reply, "message")
        self.done = True
        return (text or "") + self.flush() if self.held else text

    def flush(self) -> str:
        """The reply is over: content held back while it might open a <think> block is content
        (returned, to be written), and an unclosed block (cut by a token limit) is reasoning."""
        held, self.held = self.held, ""
        think, self.think = self.think, 3
        if think == 1 and held:
            self.reasoning.append(held)
        elif think == 0 and held:
            self.content.append(held)
            return held
        return ""

    def check(self) -> None:
        """A stream that carried no reply at all but something else is that something's failure."""
        if (self.unknown is not None and self.finish is None
                and not (self.content or self.builders or self.refusal)):
            said = _message_of(self.unknown) or json.dumps(self.unknown)
            raise _Failure("the stream carried no reply, only: %s" % _clip(said), "invalid_reply")

    def ended(self, received: bool) -> None:
        """The stream ended without ``[DONE]``: it is whole only if a finish reason came."""
        self.check()
        if self.finish is None:
            raise _Failure("stream ended before [DONE]" if received
                           else "the server sent an empty reply", "network" if received else "invalid_reply")

    def _apply(self, chunk: "Dict[str, Any]", key: str) -> "Optional[str]":
        """Take what a chunk (``key="delta"``) or a whole reply (``"message"``) carries."""
        if chunk.get("error") is not None or chunk.get("object") == "error":
            raise _in_band(chunk, "the server sent an error")
        if not (self.id and self.model):  # each from the first chunk that names it
            self._names(chunk)
        usage = chunk.get("usage")
        if usage or "x_groq" in chunk:  # Groq puts it in x_groq
            self.usage = usage or _field(chunk.get("x_groq"), "usage") or self.usage
            if "timings" in chunk:  # llama.cpp's, beside its usage
                self.timings = chunk["timings"]
        choices = chunk.get("choices")
        if not choices or not isinstance(choices, list):
            return None
        choice = choices[0]
        if len(choices) == 1 and isinstance(choice, dict) and self.followed is _ANY:
            self.followed = choice.get("index") or 0  # the first index seen is followed
        elif len(choices) > 1 or not isinstance(choice, dict) \
                or (choice.get("index") or 0) != self.followed:
            choice = self._choice(choices)  # not the usual one choice we follow
            if choice is None:
                return None
        finish = choice.get("finish_reason")
        if finish and isinstance(finish, str):
            self.finish = finish
            if "timings" in chunk:  # llama.cpp's, on its last chunk
                self.timings = chunk["timings"]
        if choice.get("usage"):
            self.usage = choice["usage"]
        if choice.get("logprobs"):
            self._keep_logprobs(choice["logprobs"])
        delta = choice.get(key) or choice.get("message" if key == "delta" else "delta")
        return self._take(delta, whole=key == "message") if isinstance(delta, dict) else None

    def _names(self, chunk: "Dict[str, Any]") -> None:
        """Keep the reply's id, model and fingerprint, each from the first chunk that has it."""
        found, model, fingerprint = chunk.get("id"), chunk.get("model"), chunk.get("system_fingerprint")
        if type(found) is str and not self.id:
            self.id = found
        if type(model) is str and not self.model:
            self.model = model
        if type(fingerprint) is str and not self.fingerprint:
            self.fingerprint = fingerprint

    def _choice(self, choices: "List[Any]") -> "Optional[Dict[str, Any]]":
        """The choice with the index this reply keeps to: the first one seen."""
        for choice in choices:
            if isinstance(choice, dict):
                index = choice.get("index") or 0  # no index: the first choice
                if self.followed is _ANY:
                    self.followed = index
                if index == self.followed:
                    return choice
        return None

    def _take(self, delta: "Dict[str, Any]", whole: bool) -> "Optional[str]":
        """Keep what a choice's delta (or whole message) carries; return its text."""
        if not _ASIDES.isdisjoint(delta):  # most deltas carry text alone
            self._take_asides(delta, whole)
        text = delta.get("content")
        if text and not isinstance(text, str):
            text = self._parts(text)
        if text and self.think != 3 and not self.content:  # the content's start
            if self.think or self.held or text[0] == "<" or text[0].isspace():  # in it, or to come
                text = self._unthink(text)
            else:
                self.think = 3  # it begins with no <think>
        if text:
            self.content.append(text)
            self.began = True
            return text
        if not self.began:
            self.began = bool(self.reasoning or self.builders or self.refusal)
        return None

    def _unthink(self, text: str) -> str:
        """Move a ``<think>...</think>`` block at the content's start to the reasoning, as it
        comes, and the space after it; return the content's text that is no part of it."""
        text, self.held = self.held + text, ""
        if self.think == 2:  # past the block: the content begins at its first word
            text = text.lstrip()
            self.think = 2 if not text else 3
            return text
        if self.think == 0:
            start = text.lstrip()
            if len(start) < 7 and "<think>".startswith(start):  # too short to tell yet
                self.held = text
                return ""
            if not start.startswith("<think>"):  # only the leading block: a later one is text
                self.think = 3
                return text
            text, self.think = start[7:], 1
        end = text.find("</think>")
        if end < 0:  # hold back what may be the start of "</think>"
            at = text.rfind("<", len(text) - 7 if len(text) > 7 else 0)  # only one "<" in "</think"
            cut = at if at >= 0 and "</think>".startswith(text[at:]) else len(text)
            text, self.held = text[:cut], text[cut:]
            if text:
                self.reasoning.append(text)
            return ""
        if end:
            self.reasoning.append(text[:end])
        self.think = 2
        return self._unthink(text[end + 8:])

    def _parts(self, content: "Any") -> str:
        """The text of content given as a list of parts; thinking parts (Mistral's) are reasoning."""
        if not isinstance(content, list):
            return ""
        texts = []
        for part in content:
            if not isinstance(part, dict):
                continue
            if part.get("type") == "thinking":
                thought = _text_of_parts(part.get("thinking"))
                if thought:
                    self.reasoning.append(thought)
                    self.reasoning_field = "thinking"  # as a content part
            elif isinstance(part.get("text"), str):
                texts.append(part["text"])
        return "".join(texts)

    def _take_asides(self, delta: "Dict[str, Any]", whole: bool) -> None:
        """Keep a delta's reasoning (under either name), tool calls and refusal."""
        older, thought = delta.get("reasoning_content"), delta.get("reasoning")
        if older and isinstance(older, str) and older != thought:  # vLLM 0.11 to 0.15 send both
            self.reasoning.append(older)
            self.reasoning_field = "reasoning_content"
        if thought and isinstance(thought, str):
            self.reasoning.append(thought)
            self.reasoning_field = "reasoning"
        if delta.get("tool_calls"):
            self._add_tool_calls(delta["tool_calls"], whole)
        elif isinstance(delta.get("function_call"), dict):  # the older functions API
            call = delta["function_call"]
            if call.get("name") or call.get("arguments"):  # some gateways send an empty one
                self.legacy_call = True
                self._add_tool_calls([{"index": 0, "function": call}], whole=False)
        refusal = delta.get("refusal")
        if refusal and isinstance(refusal, str):
            self.refusal.append(refusal)

    def _add_tool_calls(self, fragments: "Any", whole: bool) -> None:
        """Assemble tool calls: streamed in pieces keyed by index, whole, or unindexed."""
        if isinstance(fragments, dict):
            fragments = [fragments]
        if not isinstance(fragments, list):
            return
        for position, fragment in enumerate(fragments):
            if not isinstance(fragment, dict):
                continue
            index = position if whole else fragment.get("index")
            call_id = _string(fragment.get("id"))
            builder = self._builder_for(index, call_id)
            builder["id"] = builder["id"] or call_id
            builder["type"] = builder["type"] or _string(fragment.get("type"))
            function = fragment.get("function")
            if not isinstance(function, dict):
                continue
            builder["name"] = builder["name"] or _string(function.get("name"))
            arguments = function.get("arguments")
            if isinstance(arguments, str):
                builder["arguments"].append(arguments)
            elif arguments is not None:  # some servers send the object itself
                builder["arguments"].append(json.dumps(arguments))

    def _builder_for(self, index: "Any", call_id: str) -> "Dict[str, Any]":
        builders = self.builders
        indexed = isinstance(index, int) and not isinstance(index, bool)
        if indexed:
            existing = self.by_index.get(index) if self.by_index else None
            if existing is not None and not (call_id and existing["id"] and call_id != existing["id"]):
                return existing  # else the index was reused for a new call
        elif builders and (not call_id or builders[-1]["id"] in ("", call_id)):
            return builders[-1]  # no index: a fragment continues the last call
        if len(builders) >= _MAX_TOOL_CALLS:
            raise _Failure("the reply asks for more than %d tool calls" % _MAX_TOOL_CALLS, "too_large")
        builder = {"index": index, "id": "", "type": "", "name": "", "arguments": []}
        builders.append(builder)
        if indexed:
            if not self.by_index:
                self.by_index = {}  # the last builder of each index
            self.by_index[index] = builder
        return builder

    def _keep_logprobs(self, logprobs: "Any") -> None:
        """Keep a choice's log-probabilities, as many as ``max_bytes`` allows."""
        entries = _field(logprobs, "content")
        if not isinstance(entries, list):
            return
        self.kept_logprobs += len(entries) + sum(  # each costs some hundred bytes kept
            len(entry["top_logprobs"]) for entry in entries if isinstance(entry, dict)
            and isinstance(entry.get("top_logprobs"), list))
        if self.kept_logprobs > self.max_bytes // _LOGPROB_COST:
            raise _Failure("the reply carries more log-probabilities than max_bytes"
                           " (%d bytes) allows to keep" % self.max_bytes, "too_large")
        if self.logprobs is None:
            self.logprobs = []
        self.logprobs.extend(entries)

    def response(self, error: str = "", cancelled: bool = False,
                 secrets: "Optional[List[str]]" = None, kind: str = "") -> Response:
        """The :class:`Response` to what came: ``error`` (of ``kind``) and ``cancelled`` say
        how the call ended; every text the server chose is shown with ``secrets`` redacted."""
        calls = []  # type: List[ToolCall]
        for builder in self.builders:
            arguments = "".join(builder["arguments"])
            if builder["name"] or arguments:  # with neither it is no call: some gateways send one
                calls.append(ToolCall(builder["id"] or "call_%d" % len(calls), builder["name"],
                                      arguments, builder["type"] or "function"))
                if not (builder["name"] or error):  # it could not be run
                    error = "the server sent a tool call without a name (arguments %s)" % arguments
                    kind = "invalid_reply"
        response = self._ending(error, cancelled, secrets or [], calls)
        if response.stop_reason == "error":
            response.error_kind = kind or "server"  # a failure the server said in its finish_reason
        response.usage, response.tool_calls = _usage(self.usage), calls
        response.reasoning, response.refusal = "".join(self.reasoning), "".join(self.refusal)
        response._reasoning_field, response._legacy_call = self.reasoning_field, self.legacy_call
        response.model, response.id, response.logprobs = self.model, self.id, self.logprobs
        if isinstance(self.timings, dict):
            response.timings = _counts(self.timings) or None
        return response

    def _ending(self, error: str, cancelled: bool, secrets: "List[str]",
                calls: "List[ToolCall]") -> Response:
        """A Response with the content and the stop reason (any server's synonym read)."""
        content = "".join(self.content)
        if cancelled:
            return Response(content, "cancelled")
        if error:
            return Response(content, "error", _one_line(_redact(error, secrets)))
        finish = self.finish or "stop"
        reason = _STOP_REASONS.get(finish.lower()) or _redact(finish, secrets)
        if reason == "stop" and calls:
            reason = "tool_calls"  # some servers say "stop" when they call tools
        elif reason == "tool_calls" and not calls:
            reason = "stop"  # and some say "tool_calls" when they call none
        elif reason == "stop" and self.refusal:
            reason = "refusal"  # the model declined: say so, not an empty success
        elif reason == "error":
            return Response(content, "error", _one_line(_redact(
                'the server ended the reply: finish_reason "%s"' % finish, secrets)))
        return Response(content, reason)


# ---------------------------------------------------------------- what the server did to the answer

# a tool call written as text, when the server's parser is off: where it starts, and the parser
# of vLLM's that reads it (vllm/entrypoints/openai/tool_parsers: hermes, mistral, llama3_json)
_CALLS_AS_TEXT = (("<tool_call>", "hermes"), ("[TOOL_CALLS]", "mistral"), ("<|python_tag|>", "llama3_json"))


def _warnings(notes: "Iterable[str]", body: "Dict[str, Any]", sent: int, reply: Response,
              fingerprint: str) -> "List[str]":
    """What the server did to an answer that came back, each said only on evidence in hand
    (``notes``: what the client changed; ``body``: the request as sent, ``sent`` bytes).
    Each rule runs only where a cheap test says it may apply."""
    said = list(notes) if notes else []
    if reply.stop_reason == "length" and reply.reasoning and not reply.content.strip():
        said.append("the reasoning used the whole token budget and no answer came: allow"
                    " more tokens (max_tokens)")
    usage = reply.usage
    if usage:
        made, prompt = usage.get("completion_tokens"), usage.get("prompt_tokens")
        if type(made) is int and ("max_tokens" in body or "max_completion_tokens" in body):
            said += _over_limit(body, made)
        messages = body["messages"]
        # the cheap test: a word takes two characters of the request at least, after the
        # 31 of {"messages": [], "stream": false} and the 29 each message takes at least
        if type(prompt) is int and 2 * prompt < sent - 31 - 29 * len(messages):
            said += _cut_prompt(messages, prompt, usage, fingerprint)
    if ("tools" in body or "functions" in body) and reply.content and not reply.tool_calls:
        said += _call_as_text(reply.content, body)
    return said


def _over_limit(body: "Dict[str, Any]", made: int) -> "List[str]":
    """A warning when the server made more tokens than the request allowed."""
    limits = [body.get(name) for name in ("max_tokens", "max_completion_tokens")]
    limit = max([value for value in limits if type(value) is int] or [made])
    if limit >= made or body.get("n") not in (None, 1):  # n: one count for every choice
        return []
    return ["the server made %d tokens where the request allowed %d: it ignored the limit%s"
            % (made, limit, " (servers older than max_completion_tokens do not know it: send"
               " max_tokens)" if limits[0] is None else "")]


def _cut_prompt(messages: "List[Any]", counted: int, usage: "Dict[str, Any]",
                fingerprint: str) -> "List[str]":
    """A warning when the server counted fewer prompt tokens than the words sent.

    Tokenizers split text at whitespace before they merge: each word is a token at least (measured
    on cl100k, o200k, Llama 3's, Qwen's, DeepSeek's and Mistral's vocabularies: English 1.3 a
    word, code 2 to 2.5, CJK and emoji more). A server that counts fewer dropped some of the
    prompt (Ollama cuts it to its context).
    """
    words = 0
    for message in messages:
        content = _field(message, "content")
        if isinstance(content, str):
            words += len(content.split())
        elif isinstance(content, list):
            words += len(_text_of_parts(content).split())
    if counted >= words:
        return []
    cached = [_field(usage.get("prompt_tokens_details"), "cached_tokens"),
              usage.get("cache_read_input_tokens"), usage.get("cache_creation_input_tokens")]
    if counted + sum(count for count in cached if type(count) is int) >= words:  # which some
        return []  # count apart from prompt_tokens
    fix = ("Ollama's context length: OLLAMA_CONTEXT_LENGTH, or num_ctx in a Modelfile"
           if fingerprint == "fp_ollama" else "the server's context length")
    return ["the server counted %d prompt tokens for the %d words sent: it probably cut the"
            " prompt to fit its context (raise %s)" % (counted, words, fix)]


def _call_as_text(text: str, body: "Dict[str, Any]") -> "List[str]":
    """A warning when the content is a call of an offered tool, written as text."""
    offered = {_field(_field(tool, "function"), "name") for tool in body.get("tools") or []}
    offered |= {_field(function, "name") for function in body.get("functions") or []}
    starts = [(text.find(marker) + len(marker), parser) for marker, parser in _CALLS_AS_TEXT
              if marker in text] + [(0, "llama3_json")]  # or bare JSON: {"name": ..., ...}
    for start, parser in starts:
        for call in _written_calls(text[start:].strip(), parser):
            name = _field(call, "name")
            if name in offered and ("arguments" in call or "parameters" in call):
                return ["the model wrote a call of %s as text, which the server did not read as"
                        " a tool call (vLLM: --enable-auto-tool-choice --tool-call-parser %s;"
                        " llama.cpp: --jinja)" % (name, parser)]
    return []


def _written_calls(text: str, parser: str) -> "List[Any]":
    """The calls written in text after a parser's mark: JSON, or Mistral's name[ARGS]{...}."""
    if parser == "hermes":
        text = text.partition("</tool_call>")[0]
    name = text.partition("[")[0]
    if parser == "mistral" and text[len(name):].startswith(("[ARGS]", "[CALL_ID]")):
        return [{"name": name, "arguments": None}]
    if text[:1] not in ("{", "["):
        return []
    try:
        calls = _json(text)
    except (ValueError, RecursionError):
        return []
    return calls if isinstance(calls, list) else [calls]


def _model_ids(listing: "Dict[str, Any]") -> "List[str]":
    """The model ids in a ``GET .../models`` answer: OpenAI's shape or Ollama's."""
    entries = listing.get("data") or listing.get("models") or []
    return [name for name in (_field(entry, "id") or _field(entry, "name")
                              for entry in (entries if isinstance(entries, list) else []))
            if isinstance(name, str)]


def _usage(usage: "Any") -> "Optional[Dict[str, Any]]":
    """Usage with prompt, completion and total tokens, from any server's spelling; only the
    counts (nested ones too) are kept: anything else would stay alive with the Response."""
    if not isinstance(usage, dict):
        return None
    if (usage.keys() >= _USUAL_USAGE and len(usage) <= _MAX_USAGE_KEYS  # the usual: plain counts
            and set(map(type, usage.values())) <= _NUMBERS and max(map(len, usage)) <= 64):
        return dict(usage)
    tokens = _counts(usage, nested=True)
    for ours, theirs in (("prompt_tokens", "input_tokens"), ("completion_tokens", "output_tokens")):
        if ours not in tokens and theirs in tokens:
            tokens[ours] = tokens[theirs]
    prompt, completion = tokens.get("prompt_tokens"), tokens.get("completion_tokens")
    if "total_tokens" not in tokens and isinstance(prompt, int) and isinstance(completion, int):
        tokens["total_tokens"] = prompt + completion
    return tokens


def _counts(value: "Dict[str, Any]", nested: bool = False) -> "Dict[str, Any]":
    """The numbers in a parsed JSON object (and in the objects in it, when ``nested``),
    under names of a sensible length, from its first ``_MAX_USAGE_KEYS`` fields."""
    counts = {}  # type: Dict[str, Any]
    items = value.items()  # type: Iterable[Tuple[str, Any]]
    if len(value) > _MAX_USAGE_KEYS:
        from itertools import islice  # loaded by collections already
        items = islice(items, _MAX_USAGE_KEYS)
    for key, number in items:
        if len(key) > 64:
            continue
        if type(number) in (int, float):  # not bool: JSON's true is no count
            counts[key] = number
        elif nested and isinstance(number, dict):
            inner = _counts(number)
            if inner:
                counts[key] = inner
    return counts


def _text_of_parts(content: "Any") -> str:
    """Text of a content given as a list of parts (``[{"type": "text", "text": ...}]``)."""
    if not isinstance(content, list):
        return ""
    return "".join(part.get("text") or "" for part in content
                   if isinstance(part, dict) and isinstance(part.get("text"), str))


# ---------------------------------------------------------------- reading error bodies


def _error_answer(answer: "http.client.HTTPResponse") -> "Tuple[str, str]":
    """An error answer's one-line message, and its raw text (lowercased)."""
    try:
        body = answer.read(_ERROR_BODY_LIMIT)
    except (OSError, http.client.HTTPException, ValueError):
        body = b""
    status = answer.status
    if 300 <= status < 400:
        message = "redirect to %s not followed" % _url_to_show(answer.getheader("Location") or "?")
    else:
        message = _server_message(body) or answer.reason or http.client.responses.get(status, "")
    return "HTTP %d: %s" % (status, message), body.decode("utf-8", "replace").lower()


def _server_message(body: bytes) -> str:
    """The message in an error body of any common shape; "" for HTML or nothing."""
    if len(body) >= _ERROR_BODY_LIMIT:  # cut where it was read: drop the last, partial word
        return _clip(body, cut=True)
    text = body.decode("utf-8", "replace").strip()
    if text[:1] in ("{", "[", '"'):
        try:
            message = _message_of(_json(text))
        except (ValueError, RecursionError):
            message = ""
        if message:
            return message
    if not text or text[:1] == "<":
        return ""
    return text


# how a server names the request field it refuses, in words: each pattern is looked for only
# where its words are (a name is at most 64 characters: a longer run is no name)
_NAMING = (
    ("parameter", r"""parameters?:\s*['"`]?([a-z_][\w.]{0,63})"""),  # Unknown parameter: 'x'
    ("argument", r"""arguments? supplied:\s*['"`]?([a-z_][\w.]{0,63})"""),  # Azure
    ("field", r"""field ['"`]([a-z_][\w.]{0,63})['"`]"""),  # llama.cpp: Field 'x': ...
    ("must be", r"""['"`]([a-z_][\w.]{0,63})['"`] must be"""),  # LM Studio: 'x' must be ...
    ("extra inputs", r"""([a-z_][\w.]{0,63}):?\s+extra inputs are not permitted"""),  # pydantic
    ("loc", r"""['"]loc['"]:\s*[\[(]\s*['"]body['"],\s*['"]([a-z_][\w.]{0,63})['"]"""),  # FastAPI, as text
)


def _named_fields(raw: str) -> "Set[str]":
    """The request fields that an error answer (its text, lower case) names as wrong: its
    ``param``, FastAPI's ``loc``, the words of its messages ("Unknown parameter: 'x'");
    never a request body it echoes (FastAPI's ``input``, in vLLM's message as text)."""
    import re  # loaded by json already
    try:
        parsed = _json(raw)
    except (ValueError, RecursionError):
        parsed = raw  # plain text: its words
    names = set()  # type: Set[str]
    texts = []  # type: List[str]
    pending = [(parsed, 0)]
    while pending:
        value, depth = pending.pop()
        if isinstance(value, str):
            texts.append(re.sub(r"""['"]input['"]:.*""", "", value, flags=re.S))  # no echo
        elif isinstance(value, dict) and depth < 5:
            if isinstance(value.get("param"), str):
                names.add(value["param"])
            loc = value.get("loc")
            if isinstance(loc, list) and loc[:1] == ["body"] and len(loc) > 1:
                names.add(".".join(str(part) for part in loc[1:]))
            pending += [(value.get(key), depth + 1) for key in ("error", "message", "detail", "msg")]
        elif isinstance(value, list) and depth < 5:
            pending += [(item, depth + 1) for item in value[:16]]
    for text in texts:
        for words, pattern in _NAMING:
            if words in text:
                names.update(re.findall(pattern, text))
    return names


def _policy(body: "Optional[Dict[str, Any]]", status: int, raw: str, retry_after: "Optional[str]",
            attempt: int, retries: int, resent: "FrozenSet[str]") -> "Tuple[str, Any]":
    """What a call does after an error answer (``status`` 0: a failure before any answer;
    ``raw``: its text, lower case): ``("resend", refusal)`` at once, changed for a known
    refusal, once each; ``("retry", delay)`` after ``delay`` seconds (None: the backoff)
    as ``retries`` allow; or ``("fail", more)``, its message with ``more`` added."""
    refused = _refusal(body, status, raw) if body else None
    if refused is not None and refused not in resent:
        return "resend", refused
    if status and status not in _RETRY_STATUSES or attempt >= retries:
        return "fail", ""
    delay = _retry_after(retry_after)
    if delay is not None and delay > _RETRY_AFTER_CAP:
        return "fail", " (the server asks to retry after %gs)" % delay
    return "retry", delay


def _refusal(body: "Dict[str, Any]", status: int, raw: str) -> "Optional[str]":
    """Which known refusal an error answer is, from the field it names, never one that merely
    appears in it: ``"stream_options"`` (older vLLM, Mistral, older Azure), ``"max_tokens"``
    (OpenAI's newer models), ``"json_object"`` (LM Studio wants a json_schema), or None."""
    if status not in (400, 422):
        return None
    named = _named_fields(raw)
    if body.get("stream_options") is _ASK_USAGE and not named.isdisjoint(_USAGE_FIELDS):
        return "stream_options"
    if ("max_tokens" in named and "max_completion_tokens" in raw and "max_tokens" in body
            and "max_completion_tokens" not in body):
        return "max_tokens"
    if (not named.isdisjoint(("response_format", "response_format.type")) and "json_schema" in raw
            and _field(body.get("response_format"), "type") == "json_object"):
        return "json_object"
    return None


def _adjusted(body: "Dict[str, Any]", refused: str) -> str:
    """Adjust the request for a refusal; a sentence saying so, "" when nothing is said."""
    if refused == "stream_options" and body.get("stream_options") is _ASK_USAGE:
        del body["stream_options"]  # the library's own field: no usage in streams, said nowhere
    elif refused == "max_tokens" and "max_tokens" in body and "max_completion_tokens" not in body:
        body["max_completion_tokens"] = body.pop("max_tokens")
        return ("the server refuses max_tokens: the client sent the limit as"
                " max_completion_tokens instead")
    elif refused == "json_object" and _field(body.get("response_format"), "type") == "json_object":
        body["response_format"] = {"type": "json_schema", "json_schema": {
            "name": "json_object", "schema": {"type": "object"}}}
        return ("the server refuses response_format json_object: the client asked for a"
                " json_schema of any object instead")
    return ""


def _message_of(value: "Any", depth: int = 0) -> str:
    """Find the message in ``{"error": {"message"}}``, ``{"error": "..."}``,
    ``{"message"}``, ``{"detail"}`` (a string, or FastAPI's list) and the like."""
    if isinstance(value, str):
        return value
    if depth > 4:
        return ""
    if isinstance(value, list):
        return "; ".join(filter(None, (_message_of(item, depth + 1) for item in value[:5])))
    if not isinstance(value, dict):
        return ""
    for key in ("error", "message", "detail", "msg"):
        message = _message_of(value.get(key), depth + 1)
        if message:
            if key == "msg" and isinstance(value.get("loc"), list):  # FastAPI validation
                message = "%s: %s" % (".".join(map(str, value["loc"])), message)
            raw = _field(value.get("metadata"), "raw") if key == "message" else None
            if isinstance(raw, str) and raw:  # OpenRouter: the provider's own words
                message = "%s (%s)" % (message, raw)
            return message
    return ""


def _unread(exc: BaseException, waited: float, connection: "Any") -> bool:
    """Whether a kept-alive connection that failed before any answer never had its request read.

    Unread: a reset (closed with the request unread), a pipe broken while sending, or a close
    sooner than a round trip (twice its TCP connect, _CROSSING at least) after the request went
    out, which crossed it (llama.cpp closes connections after a streamed answer). A later close
    may follow a read (a worker killed mid-reply): not resent.
    """
    if isinstance(exc, http.client.RemoteDisconnected):
        return waited < max(2 * getattr(connection, "round_trip", 0.0), _CROSSING)
    return isinstance(exc, ConnectionError)


# signs that an error is a context overflow, in any server's words (lower case): OpenAI's
# code, llama.cpp's type and words, vLLM's, OpenAI's, DeepSeek's and OpenRouter's "maximum
# context length", Anthropic's, LM Studio's and Ollama's words
_OVERFLOW_SIGNS = ("context_length_exceeded", "exceed_context_size_error", "maximum context length",
                   "exceeds the available context size", "larger than the max context size",
                   "context window", "prompt is too long", "when context the overflows",
                   "longer than the context length", "exceeds the context length")
# where the prompt's size and the context's are said: (?P<prompt>...) and (?P<limit>...)
_OVERFLOW_NUMBERS = (
    r'"n_prompt_tokens":\s*(?P<prompt>\d{1,12})',  # llama.cpp's structured error
    r'"n_ctx":\s*(?P<limit>\d{1,12})',
    r"request \((?P<prompt>\d{1,12}) tokens\) exceeds the available context size \((?P<limit>\d{1,12})",
    r"input \((?P<prompt>\d{1,12}) tokens\) is larger than the max context size \((?P<limit>\d{1,12})",
    r"maximum context length is (?P<limit>\d{1,12})",  # vLLM, OpenAI, DeepSeek, OpenRouter
    r"\((?P<prompt>\d{1,12}) in the messages",  # ... you requested N tokens (P in the messages, ...)
    r"requested (?P<prompt>\d{1,12}) tokens in the messages",
    r"request has (?P<prompt>\d{1,12}) input tokens",  # vLLM 0.10.2 to 0.15
    r"prompt contains (?P<prompt>\d{1,12}) input tokens",  # vLLM 0.18 on ("at least N": a bound)
    r"messages resulted in (?P<prompt>\d{1,12}) tokens",  # OpenAI
    r"requested about (?P<prompt>\d{1,12}) tokens",  # OpenRouter
    r"prompt is too long: (?P<prompt>\d{1,12}) tokens > (?P<limit>\d{1,12})",  # Anthropic
    r"keep the first (?P<prompt>\d{1,12}) tokens",  # LM Studio
    r"context length of only (?P<limit>\d{1,12}) tokens",
)


# the kind of an error answer by its status (404 and 405: most often a wrong model, or URL)
_STATUS_KINDS = {401: "auth", 403: "auth", 429: "rate_limit", 404: "not_found", 405: "not_found",
                 408: "timeout", 504: "timeout", 413: "too_large"}


def _error_kind(status: int, raw: str) -> "Tuple[str, Optional[Dict[str, int]]]":
    """The kind of an error answer (its status, and its text in lower case), and for a context
    overflow the prompt's size and the context's, in tokens, when the server said them."""
    if any(sign in raw for sign in _OVERFLOW_SIGNS):
        import re  # loaded by json already
        overflow = {}  # type: Dict[str, int]
        for pattern in _OVERFLOW_NUMBERS:
            found = re.search(pattern, raw)
            for name, value in (found.groupdict() if found else {}).items():
                overflow.setdefault("prompt_tokens" if name == "prompt" else "context_length", int(value))
        return "context_overflow", overflow
    kind = _STATUS_KINDS.get(status) or ("not_found" if 300 <= status < 400  # redirects too
                                         else "bad_request" if 400 <= status < 500 else "server")
    return kind, None


def _in_band(payload: "Any", said: str) -> _Failure:
    """The failure a server sent inside a reply (an error object or event), with its kind."""
    code = _field(_field(payload, "error"), "code")
    kind, overflow = _error_kind(code if type(code) is int else 0, json.dumps(payload).lower())
    return _Failure(_message_of(payload) or said, kind, overflow=overflow)


def _network_kind(exc: BaseException) -> str:
    return "timeout" if isinstance(exc, socket.timeout) else "network"


def _network_error(exc: BaseException, client: "Client") -> str:
    """What a failed send or read means, in words, and where it happened."""
    if isinstance(exc, socket.timeout):
        return "timed out after %gs waiting for data" % client._settings.read_timeout
    if isinstance(exc, http.client.RemoteDisconnected):
        return "%s closed the connection without answering" % _peer(client)
    if isinstance(exc, ConnectionResetError):
        return "connection reset by %s" % _peer(client)
    if isinstance(exc, BrokenPipeError):
        return "%s closed the connection while the request was sent" % _peer(client)
    return "%s (%s)" % (_describe(exc), _peer(client))


def _peer(client: "Client") -> str:
    """The server (or the proxy) a client talks to, as ``host:port``."""
    if client._settings.proxy:
        return "proxy %s" % _where(*client._settings.proxy)
    return _where(client._settings.host, client._settings.port)


def _retry_after(value: "Optional[str]") -> "Optional[float]":
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    from email.utils import parsedate_to_datetime
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def _field(value: "Any", key: str) -> "Any":
    return value.get(key) if isinstance(value, dict) else None


def _string(value: "Any") -> str:
    return value if isinstance(value, str) else ""


def _one_line(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _ERROR_TEXT_LIMIT else text[:_ERROR_TEXT_LIMIT - 3] + "..."


def _clip(data: "Union[bytes, str]", cut: bool = False) -> str:
    """The start of what a server sent (bytes, or text), for an error, in whole words: a
    secret cut in two would not be redacted (``Response.error`` is cut after that)."""
    if isinstance(data, str):  # only its start is looked at: encode no more than that
        data = data[:_ERROR_BODY_LIMIT + 1].encode("utf-8", "replace")
    words = data[:_ERROR_BODY_LIMIT].decode("utf-8", "replace").split()
    if words and (cut or len(data) > _ERROR_BODY_LIMIT and not data[_ERROR_BODY_LIMIT:][:1].isspace()):
        del words[-1]
    return " ".join(words) or "(empty)"


def _where(host: str, port: int) -> str:
    return "[%s]:%d" % (host, port) if ":" in host else "%s:%d" % (host, port)


def _describe(exc: BaseException) -> str:
    try:
        text = str(exc)
    except Exception:  # an exception that cannot say what it is
        text = ""
    return "%s: %s" % (type(exc).__name__, text) if text else type(exc).__name__


def _short_repr(value: "Any") -> str:
    """repr(value), cut short; never raises."""
    try:
        text = repr(value)
    except Exception:
        return "<%s>" % type(value).__name__
    return text if len(text) <= 80 else text[:77] + "..."


# ---------------------------------------------------------------- the command line

_PROMPT = "> "
_DIM, _PLAIN = "\033[2m", "\033[0m"
# C0 controls but newline and tab, DEL and C1, as a terminal is shown them: ESC is \u001b, the
# JSON way, so that --json on a terminal stays the same JSON
_VISIBLE = {c: text for c, text in _VISIBLE_CONTROLS.items() if c not in (9, 10)}
_EPILOG = """\
examples:
  %(prog)s "Why is the sky blue?"
  cat notes.txt | %(prog)s "Summarise:"
  %(prog)s --base-url http://localhost:8080 --model qwen2.5 --temperature 0 "Hi"
  %(prog)s -o seed 42 -o stop '["\\n"]' "Hi"
  %(prog)s --stats "Hi"          (tokens, time to first token, tokens/s on stderr)
  %(prog)s --json "Say hi" > reply.json
  %(prog)s --trace "Hi"          (every request and reply on stderr, secrets hidden)
  %(prog)s --curl "Hi"           (the request as a curl command; nothing is sent)
  %(prog)s --models
  %(prog)s          (no prompt on a terminal: a chat; /help lists its commands)

environment:
  LLM_BASE_URL (or OPENAI_BASE_URL, or OLLAMA_HOST), LLM_MODEL, LLM_API_KEY (or
  OPENAI_API_KEY); with nothing set the server is http://localhost:11434.
  LLM_TRACE=1 traces to stderr, LLM_TRACE=FILE to a file.

exit status: 0 done, 1 failed (or the model refused), 2 bad arguments, 130 interrupted.
"""
_CHAT_HELP = ("/reset forgets the conversation, /help lists the commands, /exit or Ctrl-D leaves,"
              " Ctrl-C stops a reply.")
_CHAT_COMMANDS = """\
/reset, /clear   forget the conversation
/exit, /quit     leave (Ctrl-D too)
/help            this list
//text           send "/text" (a message that starts with /)
Ctrl-C stops a reply; the conversation keeps what came.
"""


def _main(argv: "Optional[List[str]]" = None) -> int:
    """Run the command line (``python llm.py --help``) on ``argv`` (``sys.argv[1:]``); return
    the exit status. Errors are one line on stderr: no traceback, whatever the input."""
    try:
        return _command(argv)
    except KeyboardInterrupt:
        _console(sys.stderr).end_line()
        return 130
    except BrokenPipeError:  # the reader went away (``| head``): nothing left to say
        _stdout_to_devnull()
        return 1
    except Exception as exc:  # the last boundary
        try:
            _complain("unexpected failure: " + _describe(exc))
        except Exception:  # not even stderr works: the status says it
            pass
        return 1


def _command(argv: "Optional[List[str]]") -> int:
    options = _arguments(argv)
    client = Client(options.base_url, model=options.model, api_key=options.key,
                    system=options.system and _without_surrogates(options.system),
                    timeout=_DEFAULT_TIMEOUT if options.timeout is None else options.timeout,
                    trace=sys.stderr if options.trace else None)
    if client._settings.problem:  # a bad --timeout, or a base URL that is no URL
        _complain(client._settings.problem)
        return 2
    try:
        return _run(client, options)
    finally:
        client.close()  # and the trace written to its end


def _run(client: Client, options: "Any") -> int:
    if options.models:
        return _list_models(client, options.json)
    params = {"temperature": options.temperature, "max_tokens": options.max_tokens}
    params.update(_option_values(options.option or []))
    prompt = _prompt(options.prompt)
    if prompt is None and options.curl:
        _complain("--curl needs a prompt, as an argument or piped in")
        return 2
    if prompt is None:
        return _chat_loop(client, options, params)
    if not prompt.strip():
        _complain("no prompt: give one as an argument or pipe it in (see --help)")
        return 2
    messages = [{"role": "user", "content": prompt}]
    if options.curl:
        return _print_curl(client, messages, params, not options.no_stream, options.key)
    reply = _interruptible(client, messages, options, params)
    if reply.stop_reason == "cancelled":
        return 130
    return 0 if reply.ok and not reply.refusal else 1


def _print_curl(client: Client, messages: "List[Any]", params: "Dict[str, Any]", stream: bool,
                key_given: "Optional[str]") -> int:
    """Print the request as a curl command that a POSIX shell runs; nothing is sent. The key
    is the variable it came from (``LLM_API_KEY`` for ``--key``), never its value."""
    from shlex import quote
    try:
        data = _encode(client._body(messages, params, stream)).decode("utf-8")
    except _Failure as failure:
        _complain(str(failure))
        return 2
    settings = client._settings
    url = settings.url(settings.chat_path)
    hidden = _redact(url, settings.secrets)  # a key-like query value of base_url
    if hidden != url:
        _complain("the URL's key-like query values are shown as ***: put them back")
    words = ["curl", "-sS"] + (["-N"] if stream else []) + [quote(hidden)]
    for name, value in (settings.stream_headers if stream else settings.plain_headers).items():
        if name.lower() == "authorization" and settings.api_key:
            variable = "LLM_API_KEY" if key_given or os.environ.get("LLM_API_KEY") == settings.api_key \
                else "OPENAI_API_KEY"
            words += ["-H", '"Authorization: Bearer $%s"' % variable]
        else:
            words += ["-H", quote(_redact("%s: %s" % (name, value), settings.secrets))]
    command = " ".join(words + ["--data-binary", quote(data)])
    if len(command) > 100000:  # longer than one argument may be: the body from a here-document
        marker = "LLM_PY_BODY_%d" % len(data)
        command = "%s --data-binary @- <<'%s'\n%s\n%s" % (" ".join(words), marker, data, marker)
    _console(sys.stdout).write(command + "\n")
    return 0


def _arguments(argv: "Optional[List[str]]") -> "Any":
    import argparse
    if _TYPE_CHECKING:
        from typing import NoReturn

    class Parser(argparse.ArgumentParser):
        def error(self, message: str) -> "NoReturn":  # one line, not the usage text
            _complain("%s (see --help)" % message)
            sys.exit(2)

    parser = Parser(description="Chat with any OpenAI-compatible server: the reply streams"
                    " to stdout.", epilog=_EPILOG,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("prompt", nargs="*", help="the prompt; piped input is added after it")
    add("--base-url", metavar="URL", help="the server: host root, .../v1, or a full"
        " .../chat/completions URL (default: the environment, else localhost:11434)")
    add("-m", "--model", help="the model (default: LLM_MODEL; some servers need none)")
    add("-s", "--system", metavar="TEXT", help="a system prompt")
    add("--key", metavar="KEY", help="API key (default: LLM_API_KEY or OPENAI_API_KEY,"
        " which keep it out of the process list)")
    add("-t", "--temperature", type=float, metavar="T", help="sampling temperature (0: the"
        " most likely words)")
    add("--max-tokens", type=int, metavar="N", help="the longest reply, in tokens")
    add("-o", "--option", nargs=2, action="append", metavar=("NAME", "VALUE"),
        help="any request parameter (repeat it): -o seed 42 -o stop '[\"END\"]';"
        " VALUE is read as JSON when it parses, else taken as text")
    add("--timeout", type=float, metavar="SECONDS", help="for connecting and for each"
        " piece of the reply to arrive (default: 30 to connect, 600 per read)")
    add("--json", action="store_true", help="print the whole response as JSON: content,"
        " stop_reason, usage, tool_calls, reasoning, logprobs, headers, timings")
    add("--models", action="store_true", help="list the server's models and exit")
    add("--no-stream", action="store_true", help="ask for the whole reply at once")
    add("--show-reasoning", action="store_true", help="print the model's reasoning,"
        " when it sends any, to stderr")
    add("--stats", action="store_true", help="after the reply, print its tokens, the time"
        " to the first token and the tokens per second to stderr")
    add("--trace", action="store_true", help="show what goes over the wire on stderr, every"
        " secret hidden (also LLM_TRACE=1, or LLM_TRACE=FILE)")
    add("--curl", action="store_true", help="print the request as a curl command instead of"
        " sending it (the key as its variable, never its value)")
    add("--version", action="version", version="%(prog)s " + __version__)
    return parser.parse_args(argv)


def _option_values(pairs: "List[List[str]]") -> "Dict[str, Any]":
    """``-o NAME VALUE`` pairs as request parameters: VALUE as JSON when it parses."""
    params = {}  # type: Dict[str, Any]
    for name, value in pairs:
        value = _without_surrogates(value)
        try:
            params[_without_surrogates(name)] = _json(value)
        except (ValueError, RecursionError):
            params[_without_surrogates(name)] = value
    return params


def _prompt(words: "List[str]") -> "Optional[str]":
    """The prompt: the words, then what is piped in; None for a chat on a terminal."""
    text = " ".join(_without_surrogates(word) for word in words)
    if _is_terminal(sys.stdin):
        return text or None
    piped = _read_stdin()
    return "%s\n\n%s" % (text, piped) if text and piped.strip() else text or piped


def _without_surrogates(text: str) -> str:
    """Text as typed: a C locale turns UTF-8 into lone surrogates, which are no JSON."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        try:
            return os.fsencode(text).decode("utf-8", "replace")
        except (UnicodeError, ValueError):
            pass
        try:  # PyPy in a C locale: arguments decoded as UTF-8, an ASCII file system encoding
            return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        except UnicodeError:
            return text.encode("utf-8", "replace").decode("utf-8")


def _read_stdin() -> str:
    stdin = sys.stdin
    if stdin is None:
        return ""
    binary = getattr(stdin, "buffer", None)
    if binary is None:
        return str(stdin.read())
    text = bytes(binary.read()).decode("utf-8", "replace")  # whatever the locale says
    return text[1:] if text.startswith("\ufeff") else text


def _list_models(client: Client, as_json: bool) -> int:
    models = client.models()
    if models.error:
        _complain(models.error)
        return 1
    _console(sys.stdout).write(json.dumps(list(models)) + "\n" if as_json
                               else "".join(name + "\n" for name in models))
    return 0


def _chat_loop(client: Client, options: "Any", params: "Dict[str, Any]") -> int:
    """Talk until /exit or end of input, keeping the conversation: a reply stopped with
    Ctrl-C as far as it came (what the user saw), a failed turn not at all (to send again)."""
    try:
        import readline  # noqa: F401  (input() edits lines and keeps history once loaded)
    except ImportError:  # Windows, or a Python built without it
        pass
    notes = _console(sys.stderr)
    notes.write("llm.py %s: %s at %s. %s\n" % (__version__, client.model or "the default model",
                                               _url_to_show(client.base_url), _CHAT_HELP))
    history = []  # type: List[Dict[str, Any]]
    while True:
        line = _next_line()
        if line is None:
            return 0
        command = line.strip()
        if command in ("/exit", "/quit"):
            return 0
        if command in ("/reset", "/clear"):
            history = []
            notes.write("(the conversation is forgotten)\n")
        elif command == "/help":
            notes.write(_CHAT_COMMANDS)
        elif command.startswith("/") and not command.startswith("//"):
            _complain("unknown command %s: /help lists them; start with // to send a line"
                      " that begins with /" % command.split()[0])
        elif command:
            _turn(client, history, line.replace("/", "", 1) if command.startswith("//")
                  else line, options, params)


def _next_line() -> "Optional[str]":
    """The next line typed; "" after Ctrl-C or an unreadable line, None at the end."""
    try:
        return _without_surrogates(input(_PROMPT))
    except EOFError:  # Ctrl-D
        _console(sys.stdout).write("\n")
        return None
    except KeyboardInterrupt:  # Ctrl-C at the prompt: a fresh line
        _console(sys.stdout).write("\n")
    except UnicodeDecodeError as exc:  # the terminal sent bytes its encoding lacks
        _complain("that line could not be read: %s" % exc.reason)
    return ""


def _turn(client: Client, history: "List[Dict[str, Any]]", line: str, options: "Any",
          params: "Dict[str, Any]") -> None:
    """Send one line and keep the reply in the history; a failed turn leaves no trace."""
    history.append({"role": "user", "content": line})
    reply = _interruptible(client, history, options, params)
    if reply.ok or (reply.stop_reason == "cancelled" and reply.content):
        history.append(_without_reasoning(reply.to_message()))
        history.extend(_unanswered(reply))
    else:
        history.pop()


def _unanswered(reply: Response) -> "List[Dict[str, Any]]":
    """An answer for each tool call of a reply, which a chat cannot run: servers refuse a
    history in which a call has none."""
    said = "This chat cannot run tools; answer without them."
    if reply._legacy_call:
        return [{"role": "function", "name": call.name, "content": said} for call in reply.tool_calls]
    return [{"role": "tool", "tool_call_id": call.id, "content": said} for call in reply.tool_calls]


def _without_reasoning(message: "Dict[str, Any]") -> "Dict[str, Any]":
    """Plain chat history: some servers refuse their own reasoning sent back."""
    message.pop("reasoning_content", None)
    message.pop("reasoning", None)
    if isinstance(message["content"], list):  # thinking sent as content parts (Mistral's)
        message["content"] = "".join(part["text"] for part in message["content"]
                                     if part["type"] == "text")
    return message


def _interruptible(client: Client, messages: "List[Any]", options: "Any",
                   params: "Dict[str, Any]") -> Response:
    """One reply, shown as ``options`` ask; Ctrl-C cancels it and keeps what came: the first
    from a helper thread (``cancel()`` takes a lock that the interrupted code may hold),
    a second one by interrupting the wait itself."""
    import signal
    cancelling = []  # type: List[threading.Thread]

    def on_interrupt(signum: int, frame: "Any") -> None:
        if cancelling:
            raise KeyboardInterrupt
        cancelling.append(threading.Thread(target=client.cancel, daemon=True))
        cancelling[0].start()

    try:
        previous = signal.signal(signal.SIGINT, on_interrupt)  # type: Any
    except ValueError:  # not the main thread: Ctrl-C stays a KeyboardInterrupt
        previous = None
    try:
        reply = _reply(client, messages, options, params)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
        if cancelling:
            cancelling[0].join(1.0)
    _report(reply)
    return reply


def _reply(client: Client, messages: "List[Any]", options: "Any",
           params: "Dict[str, Any]") -> Response:
    out = _console(sys.stdout)
    shown = _ReplyOutput(None if options.json else out, options.show_reasoning)
    try:
        reply = client.chat(messages, **params) if options.no_stream \
            else client.chat_stream(messages, shown, **params)
    except KeyboardInterrupt:  # the second Ctrl-C: stop waiting
        reply = Response("", "cancelled")
    if options.show_reasoning:  # what did not stream
        shown.write_reasoning(reply.reasoning[shown.reasoned:])
        _console(sys.stderr).end_line()
    if options.json:
        out.write(json.dumps(_as_json(reply, client._settings.secrets), indent=2,
                             ensure_ascii=not _utf8(sys.stdout)) + "\n")
    else:
        if options.no_stream:
            out.write(reply.content)
        out.end_line()
    if options.stats:
        _console(sys.stderr).write(_stats(reply) + "\n")
    return reply


def _stats(reply: Response) -> str:
    """Tokens, the time to the first token and the rate, as Ollama's --verbose shows them."""
    tokens = (reply.usage or {}).get("completion_tokens")
    parts = ["%d tokens" % tokens if isinstance(tokens, int) else "tokens: not reported"]
    first = reply.first_token_seconds
    if first is not None:
        parts.append("first token after %.2f s" % first)
    if isinstance(tokens, int):  # the generation rate: the tokens after the first, over their time
        made, took = (tokens - 1, reply.total_seconds - first) if first is not None \
            and tokens > 1 else (tokens, reply.total_seconds)
        try:
            parts.append("%.1f tokens/s" % (made / took))
        except (ZeroDivisionError, OverflowError):  # no time, or more tokens than a float holds
            pass
    parts.append("%.2f s in all" % reply.total_seconds)
    return ", ".join(parts) + _server_stats(reply.timings or {})


def _server_stats(timings: "Dict[str, Any]") -> str:
    """The server's own figures (llama.cpp's timings): its prompt and generation rates, and
    the prompt tokens it took from its cache."""
    parts = []
    for count, rate, what in (("prompt_n", "prompt_per_second", "prompt"),
                              ("predicted_n", "predicted_per_second", "generated")):
        if isinstance(timings.get(count), int) and isinstance(timings.get(rate), (int, float)):
            parts.append("%d %s tokens at %.1f tokens/s" % (timings[count], what, timings[rate]))
    if isinstance(timings.get("cache_n"), int):
        parts.append("%d prompt tokens from its cache" % timings["cache_n"])
    return "\nserver: " + ", ".join(parts) if parts else ""


class _ReplyOutput:
    """Where a streamed reply goes: its text to stdout, and its reasoning (when it is to be
    shown) to stderr, dimmed on a terminal."""

    reasoned = 0  # characters of reasoning shown

    def __init__(self, out: "Optional[_Console]", reasoning: bool) -> None:
        self.out, self.reasoning = out, reasoning
        self.style = _DIM if _colours(sys.stderr) else ""

    def write(self, text: str) -> None:
        if self.reasoning:
            _console(sys.stderr).end_line()
        if self.out is not None:
            self.out.write(text)

    def write_reasoning(self, text: str) -> None:
        if self.reasoning:
            _console(sys.stderr).write(text, self.style)
            self.reasoned += len(text)


def _as_json(reply: Response, secrets: "List[str]") -> "Any":
    return _finite({"content": reply.content, "stop_reason": reply.stop_reason, "error": reply.error,
            "status": reply.status, "model": reply.model, "id": reply.id, "usage": reply.usage,
            "tool_calls": [call.to_dict() for call in reply.tool_calls],
            "reasoning": reply.reasoning, "refusal": reply.refusal, "logprobs": reply.logprobs,
            "headers": _header_dict(reply.headers, secrets),
            "first_token_seconds": reply.first_token_seconds,
            "total_seconds": reply.total_seconds, "timings": reply.timings,
            "warnings": reply.warnings, "error_kind": reply.error_kind, "overflow": reply.overflow})


def _finite(value: "Any") -> "Any":
    """``value`` as strict JSON can hold it: an infinite or NaN float (Python servers send
    ``-Infinity`` log-probabilities; a huge integer is read as one) becomes null."""
    if isinstance(value, float):
        return value if value - value == 0 else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite(item) for item in value]
    return value


def _header_dict(headers: "http.client.HTTPMessage", secrets: "List[str]") -> "Dict[str, str]":
    """Headers as a JSON object: names in lower case, repeated values joined with ", ",
    and any secret of the client's that a server echoes in them redacted."""
    joined = {}  # type: Dict[str, str]
    for name, value in headers.items():
        name, value = name.lower(), _redact(value, secrets)
        joined[name] = joined[name] + ", " + value if name in joined else value
    return joined


def _report(reply: Response) -> None:
    """Say on stderr why a reply ended early, and what tools it calls."""
    notes = _console(sys.stderr)
    if reply.tool_calls or reply.warnings:
        notes.end_line()
        notes.write("".join("tool call: %s %s\n" % (call.name, call.arguments)
                            for call in reply.tool_calls))
        notes.write("".join("warning: %s\n" % warning for warning in reply.warnings))
    if reply.stop_reason == "error":
        _complain(reply.error)
    elif reply.refusal:
        notes.end_line()
        notes.write("refusal: %s\n" % reply.refusal)
    elif reply.stop_reason == "cancelled":
        notes.write("[stopped]\n")
    elif reply.stop_reason == "length" and _is_terminal(sys.stderr):
        notes.write("[the reply reached its token limit]\n")


def _complain(error: str) -> None:
    hints = (("connection refused", "is the server running?"),
             ("cannot resolve host", "is the URL right?"),
             ("HTTP 401", "is the API key right? see --key"))
    for start, hint in hints:
        if error.startswith(start):
            error = "%s (%s)" % (error, hint)
    _console(sys.stderr).end_line()
    _console(sys.stderr).write("error: %s\n" % error)


_consoles = {}  # type: Dict[Any, _Console]


def _console(stream: "Any") -> "_Console":
    """The console of a stream, made at its first use and kept."""
    console = _consoles.get(stream)
    if console is None:
        console = _consoles[stream] = _Console(stream)
    return console


class _Console:
    """Writes to a terminal or pipe at once, never failing on what it cannot encode. On a
    terminal control characters are shown as escapes, not obeyed (a reply must not write
    the clipboard, retitle the window or clear the screen); a pipe gets the text exactly."""

    last = "\n"  # the last character written

    def __init__(self, stream: "Any") -> None:
        self.stream, self.visible = stream, _is_terminal(stream)

    def write(self, text: str, style: str = "") -> None:
        if not text or self.stream is None:
            return
        shown = text.translate(_VISIBLE) if self.visible else text
        shown = style + shown + _PLAIN if style else shown
        try:
            self.stream.write(shown)
        except UnicodeEncodeError:  # a console that cannot show it: show what it can
            encoding = getattr(self.stream, "encoding", None) or "ascii"
            self.stream.write(shown.encode(encoding, "replace").decode(encoding))
        self.stream.flush()
        self.last = text[-1]

    def end_line(self) -> None:
        """Finish the line when something was written on it."""
        if self.last != "\n":
            self.write("\n")


def _is_terminal(stream: "Any") -> bool:
    try:
        return stream is not None and bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or closed
        return False


def _colours(stream: "Any") -> bool:
    return (_is_terminal(stream) and os.name != "nt" and not os.environ.get("NO_COLOR")
            and os.environ.get("TERM") != "dumb")


def _utf8(stream: "Any") -> bool:
    encoding = getattr(stream, "encoding", None) or ""
    return encoding.lower().replace("-", "").replace("_", "") == "utf8"


def _stdout_to_devnull() -> None:
    """Point stdout at nothing, so that Python's final flush does not complain."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (AttributeError, OSError, ValueError):
        pass


if __name__ == "__main__":
    sys.exit(_main())
