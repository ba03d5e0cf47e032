"""Tests for llm.py's command line: run with ``python -m unittest tests.test_cli``.

Each test runs ``python llm.py ...`` as a subprocess against a loopback server
from tests/loopback.py (exact bytes, in steps). The chat loop is driven through a
pseudo-terminal where the platform has one. Every wait is bounded.
"""

import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as a file: this checkout's llm.py and tests
    sys.path.insert(0, ROOT)

from tests.loopback import (END, HANG, KEY, RESET, LoopbackCase, answer, chunk, delta, free_port,
                            head, message, sse, wait_until)

LLM = os.path.join(ROOT, "llm.py")
WAIT = 20  # seconds: the longest any one command may take
try:
    import pty
except ImportError:  # Windows
    pty = None


def environment(**values):
    """The test's environment: none of the caller's LLM settings, UTF-8 output; a value
    None takes a variable out."""
    env = {name: value for name, value in os.environ.items()
           if not name.startswith(("LLM_", "OPENAI_", "OLLAMA_"))}
    env.update(PYTHONIOENCODING="utf-8", NO_COLOR="", TERM="dumb")
    env.update(values)
    return {name: value for name, value in env.items() if value is not None}


class Result:
    def __init__(self, status, out, err):
        self.status, self.out, self.err = status, out.decode("utf-8"), err.decode("utf-8")


def run(command, stdin=b"", env=None, cwd=None):
    """Run a program to its end (WAIT seconds at most) with stdin piped in: its Result."""
    process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, cwd=cwd, env=env or environment())
    try:
        out, err = process.communicate(stdin, timeout=WAIT)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(WAIT)
    return Result(process.returncode, out, err)


class CommandLineCase(LoopbackCase):
    def run_cli(self, *args, **options):
        """Run llm.py with args; ``stdin`` bytes are piped in (default: nothing)."""
        server = options.pop("server", None)
        command = [sys.executable, LLM] + (["--base-url", server.url] if server else []) + list(args)
        result = run(command, options.pop("stdin", b""), environment(**options.pop("env", {})))
        self.assertNotIn("Traceback", result.err)
        return result

    def start(self, *args, **options):
        """Start llm.py with its output on pipes; the test reads it as it comes."""
        process = subprocess.Popen([sys.executable, LLM] + list(args), stdin=subprocess.DEVNULL,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   env=environment(**options.get("env", {})))
        self.addCleanup(self.stop, process)
        return process

    def stop(self, process):
        if process.poll() is None:
            process.kill()
        process.wait(WAIT)
        process.stdout.close()
        process.stderr.close()

    def finish(self, process):
        out, err = process.communicate(timeout=WAIT)
        self.assertNotIn(b"Traceback", err)
        return Result(process.returncode, out, err)


def read_until(stream, text, timeout=WAIT):
    """Read a pipe until ``text`` (bytes) has come; return all that came."""
    seen = b""
    deadline = time.monotonic() + timeout
    while text not in seen:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([stream], [], [], left)[0]:
            raise AssertionError("%r did not come; got %r" % (text, seen))
        data = os.read(stream.fileno(), 4096)
        if not data:
            raise AssertionError("the output ended before %r; got %r" % (text, seen))
        seen += data
    return seen


# ---------------------------------------------------------------- one prompt


class OnePromptTest(CommandLineCase):
    def test_streams_the_reply_to_stdout_and_ends_with_a_newline(self):
        server = self.serve(sse(delta("Rayleigh "), delta("scattering."), delta(finish="stop")))
        result = self.run_cli("Why is the sky blue?", server=server)
        self.assertEqual((result.status, result.out, result.err), (0, "Rayleigh scattering.\n", ""))
        body = server.requests[0].json()
        self.assertEqual(body["messages"], [{"role": "user", "content": "Why is the sky blue?"}])
        self.assertIs(body["stream"], True)

    def test_a_refusal_is_shown_on_stderr_with_status_1(self):
        server = self.serve(sse(delta(None, refusal="I can't help with that."), delta(None, "stop")))
        result = self.run_cli("Do something bad", server=server)
        self.assertEqual((result.status, result.out, result.err),
                         (1, "", "refusal: I can't help with that.\n"))
        result = self.run_cli("--json", "Do something bad", server=server)
        self.assertEqual(result.status, 1)
        self.assertEqual(json.loads(result.out)["refusal"], "I can't help with that.")
        self.assertEqual(json.loads(result.out)["stop_reason"], "refusal")

    def test_json_never_shows_a_key_the_server_echoes_in_a_header(self):
        server = self.serve([head(extra="X-Seen-Authorization: Bearer " + KEY)]
                            + sse(delta("ok", "stop"))[1:])
        result = self.run_cli("--json", "--key", KEY, "Hi", server=server)
        self.assertEqual(result.status, 0)
        self.assertNotIn(KEY, result.out)
        self.assertEqual(json.loads(result.out)["headers"]["x-seen-authorization"], "Bearer ***")

    def test_words_of_the_prompt_are_joined(self):
        server = self.serve(sse(delta("ok", "stop")))
        self.run_cli("Why", "is", "the", "sky", "blue?", server=server)
        self.assertEqual(server.requests[0].json()["messages"][0]["content"], "Why is the sky blue?")

    def test_each_piece_is_shown_before_the_server_sends_the_next(self):
        shown = threading.Event()
        waited = []
        server = self.serve(sse(delta("one "), lambda: waited.append(shown.wait(WAIT)),
                                delta("two "), 0.05, delta("three", "stop")))
        process = self.start("--base-url", server.url, "count")
        self.assertEqual(read_until(process.stdout, b"one "), b"one ")
        shown.set()
        result = self.finish(process)
        self.assertEqual(waited, [True])  # "two" was held back until "one" was on stdout
        self.assertEqual((result.status, result.out), (0, "two three\n"))

    def test_piped_input_follows_the_prompt(self):
        server = self.serve(sse(delta("A summary.", "stop")))
        notes = "Line one.\nLine two, caf\u00e9.\n".encode("utf-8")
        result = self.run_cli("Summarise:", server=server, stdin=notes)
        self.assertEqual((result.status, result.out), (0, "A summary.\n"))
        self.assertEqual(server.requests[0].json()["messages"][0]["content"],
                         "Summarise:\n\nLine one.\nLine two, caf\u00e9.\n")

    def test_piped_input_alone_is_the_prompt(self):
        server = self.serve(sse(delta("4", "stop")))
        result = self.run_cli(server=server, stdin=b"\xef\xbb\xbfWhat is 2+2?")
        self.assertEqual(result.out, "4\n")
        self.assertEqual(server.requests[0].json()["messages"][0]["content"], "What is 2+2?")

    def test_options_reach_the_request(self):
        server = self.serve(sse(delta("ok", "stop")))
        result = self.run_cli("--model", "llama3.2", "--system", "Be brief.", "--temperature", "0.2",
                              "--max-tokens", "50", "--key", KEY, "Hi", server=server)
        self.assertEqual(result.status, 0)
        request = server.requests[0]
        body = request.json()
        self.assertEqual((body["model"], body["temperature"], body["max_tokens"]), ("llama3.2", 0.2, 50))
        self.assertEqual(body["messages"][0], {"role": "system", "content": "Be brief."})
        self.assertEqual(request.headers["authorization"], "Bearer " + KEY)

    def test_unset_options_are_left_out_and_the_environment_is_read(self):
        server = self.serve(sse(delta("ok", "stop")))
        result = self.run_cli("Hi", env={"LLM_BASE_URL": server.url, "LLM_MODEL": "from-env",
                                         "LLM_API_KEY": KEY})
        self.assertEqual((result.status, result.out), (0, "ok\n"))
        request = server.requests[0]
        self.assertEqual(request.json()["model"], "from-env")
        self.assertNotIn("temperature", request.json())
        self.assertEqual(request.headers["authorization"], "Bearer " + KEY)

    def test_an_environment_key_goes_only_to_the_server_it_is_paired_with(self):
        server = self.serve(sse(delta("ok", "stop")))
        result = self.run_cli("Hi", server=server, env={"OPENAI_API_KEY": KEY})  # OpenAI's key
        self.assertEqual((result.status, result.out), (0, "ok\n"))
        self.assertNotIn("authorization", server.requests[-1].headers)
        self.run_cli("Hi", server=server, env={"LLM_BASE_URL": "http://127.0.0.1:1", "LLM_API_KEY": KEY})
        self.assertNotIn("authorization", server.requests[-1].headers)
        self.run_cli("Hi", server=server, env={"OPENAI_BASE_URL": server.url + "/v1", "OPENAI_API_KEY": KEY})
        self.assertEqual(server.requests[-1].headers["authorization"], "Bearer " + KEY)
        self.run_cli("--key", KEY, "Hi", server=server)
        self.assertEqual(server.requests[-1].headers["authorization"], "Bearer " + KEY)

    def test_no_stream_asks_for_the_whole_reply(self):
        server = self.serve(answer(message("All at once.")))
        result = self.run_cli("--no-stream", "Hi", server=server)
        self.assertEqual((result.status, result.out, result.err), (0, "All at once.\n", ""))
        self.assertIs(server.requests[0].json()["stream"], False)

    def test_show_reasoning_writes_it_to_stderr_before_the_answer(self):
        thinking = {"choices": [{"index": 0, "delta": {"reasoning_content": "Two and two "}}]}
        more = {"choices": [{"index": 0, "delta": {"reasoning_content": "make four."}}]}
        server = self.serve(sse(thinking, more, delta("4", "stop")),
                            answer(message("4", reasoning_content="2+2")))
        result = self.run_cli("--show-reasoning", "2+2?", server=server)
        self.assertEqual((result.status, result.out, result.err), (0, "4\n", "Two and two make four.\n"))
        result = self.run_cli("--show-reasoning", "--no-stream", "2+2?", server=server)
        self.assertEqual((result.out, result.err), ("4\n", "2+2\n"))

    def test_reasoning_is_not_shown_unless_asked(self):
        thinking = {"choices": [{"index": 0, "delta": {"reasoning_content": "hmm"}}]}
        server = self.serve(sse(thinking, delta("4", "stop")))
        result = self.run_cli("2+2?", server=server)
        self.assertEqual((result.out, result.err), ("4\n", ""))

    @unittest.skipIf(os.name == "nt", "POSIX arguments are bytes")
    def test_arguments_that_are_not_utf8_are_sent_as_valid_text(self):
        server = self.serve(sse(delta("ok", "stop")))
        process = subprocess.Popen([sys.executable, LLM, "--base-url", server.url, b"caf\xc3\xa9 \xff"],
                                   stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   env=environment(LC_ALL="C"))
        out, err = process.communicate(timeout=WAIT)
        self.assertEqual((process.returncode, out, err), (0, b"ok\n", b""))
        self.assertEqual(server.requests[0].json()["messages"][0]["content"], "caf\u00e9 \ufffd")

    def test_text_the_output_cannot_encode_does_not_fail(self):
        server = self.serve(sse(delta("caf\u00e9 \U0001F600", "stop")))
        result = self.run_cli("Hi", server=server, env={"PYTHONIOENCODING": "ascii"})
        self.assertEqual((result.status, result.out), (0, "caf? ?\n"))

    def test_a_closed_stdout_ends_quietly(self):
        closed = threading.Event()  # the rest of the reply comes once stdout is closed
        server = self.serve(sse(delta("first "), lambda: closed.wait(WAIT),
                                *[delta("more ") for _ in range(50)]))
        self.addCleanup(closed.set)  # before the server closes
        process = self.start("--base-url", server.url, "Hi")
        read_until(process.stdout, b"first")
        process.stdout.close()  # as `| head -c 5` does
        closed.set()
        self.assertEqual(process.wait(WAIT), 1)
        self.assertEqual(process.stderr.read(), b"")


class OptionTest(CommandLineCase):
    def test_any_request_parameter_as_name_and_value_read_as_json_or_text(self):
        server = self.serve(sse(delta("ok", "stop")))
        result = self.run_cli("-o", "seed", "42", "-o", "stop", '["\\n", "END"]', "--option",
                              "top_p", "0.9", "-o", "logit_bias", '{"50256": -100}',
                              "-o", "response_format", '{"type": "json_object"}',
                              "-o", "user", "ada", "-o", "ignore_eos", "true", "-o", "note", "{not json",
                              "Hi", server=server)
        self.assertEqual((result.status, result.out, result.err), (0, "ok\n", ""))
        body = server.requests[0].json()
        self.assertEqual({name: body[name] for name in ("seed", "stop", "top_p", "logit_bias",
                                                         "response_format", "user", "ignore_eos", "note")},
                         {"seed": 42, "stop": ["\n", "END"], "top_p": 0.9, "logit_bias": {"50256": -100},
                          "response_format": {"type": "json_object"}, "user": "ada",
                          "ignore_eos": True, "note": "{not json"})

    def test_a_later_option_wins_and_a_missing_value_is_a_usage_error(self):
        server = self.serve(sse(delta("ok", "stop")))
        self.run_cli("-t", "0.5", "-o", "temperature", "0", "-o", "seed", "1", "-o", "seed", "2",
                     "Hi", server=server)
        body = server.requests[0].json()
        self.assertEqual((body["temperature"], body["seed"]), (0, 2))
        result = self.run_cli("-o", "seed", server=server)
        self.assertEqual(result.status, 2)
        self.assertIn("-o/--option: expected 2 arguments", result.err)


class StatsTest(CommandLineCase):
    def test_stats_print_tokens_first_token_time_and_rate_on_stderr(self):
        usage = {"prompt_tokens": 5, "completion_tokens": 20, "total_tokens": 25}
        server = self.serve(sse(0.2, delta("Hello "), 0.2, delta("there", "stop"),
                                {"choices": [], "usage": usage}))
        result = self.run_cli("--stats", "Hi", server=server)
        self.assertEqual((result.status, result.out), (0, "Hello there\n"))
        match = re.match(r"^20 tokens, first token after (\d+\.\d\d) s, (\d+\.\d) tokens/s,"
                         r" (\d+\.\d\d) s in all\n$", result.err)
        self.assertIsNotNone(match, result.err)
        first, rate, total = (float(value) for value in match.groups())
        self.assertGreaterEqual(first, 0.19)
        self.assertGreaterEqual(total, first + 0.19)
        self.assertLessEqual(rate, 20 / 0.19)  # 20 tokens over at least the 0.2 s pause

    def test_stats_without_usage_and_without_stats(self):
        server = self.serve(sse(delta("ok", "stop")))
        result = self.run_cli("--stats", "--no-stream", "Hi", server=server)
        self.assertRegex(result.err, r"^tokens: not reported, first token after \d+\.\d\d s,"
                                     r" \d+\.\d\d s in all\n$")
        self.assertEqual(self.run_cli("Hi", server=server).err, "")


class JSONTest(CommandLineCase):
    def test_json_prints_the_whole_response(self):
        usage = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
        thinking = {"choices": [{"index": 0, "delta": {"reasoning_content": "short"}}]}
        server = self.serve(sse(thinking, delta("Hi "), delta("there", "stop"),
                                {"choices": [], "usage": usage}))
        result = self.run_cli("--json", "Hi", server=server)
        self.assertEqual((result.status, result.err), (0, ""))
        reply = json.loads(result.out)
        self.assertEqual(reply, {"content": "Hi there", "stop_reason": "stop", "error": "",
                                 "status": 200, "model": "m", "id": "chatcmpl-1", "usage": usage,
                                 "tool_calls": [], "reasoning": "short", "refusal": "", "logprobs": None,
                                 "headers": {"content-type": "text/event-stream",
                                             "transfer-encoding": "chunked"},
                                 "first_token_seconds": reply["first_token_seconds"],
                                 "total_seconds": reply["total_seconds"], "timings": None,
                                 "warnings": [], "error_kind": "", "overflow": None})
        self.assertLessEqual(0, reply["first_token_seconds"])
        self.assertLessEqual(reply["first_token_seconds"], reply["total_seconds"])

    def test_json_has_tool_calls_in_the_wire_shape(self):
        call = {"index": 0, "id": "call_1", "type": "function",
                "function": {"name": "now", "arguments": "{}"}}
        server = self.serve(sse(delta(tool_calls=[call]), delta(finish="tool_calls")))
        reply = json.loads(self.run_cli("--json", "What time is it?", server=server).out)
        self.assertEqual(reply["stop_reason"], "tool_calls")
        self.assertEqual(reply["tool_calls"], [{"id": "call_1", "type": "function",
                                                "function": {"name": "now", "arguments": "{}"}}])

    def test_json_of_a_failed_call_has_the_error_and_the_status_is_1(self):
        server = self.serve(answer({"error": {"message": "model \"x\" not found"}}, 404))
        result = self.run_cli("--json", "--no-stream", "Hi", server=server)
        self.assertEqual(result.status, 1)
        reply = json.loads(result.out)
        self.assertEqual((reply["stop_reason"], reply["error"], reply["status"]),
                         ("error", 'HTTP 404: model "x" not found (POST %s/v1/chat/completions)'
                          % server.url, 404))
        self.assertEqual(result.err, "error: %s\n" % reply["error"])

    def test_json_is_strict_json_whatever_numbers_the_server_sent(self):
        # Python servers send log-probabilities of -Infinity and NaN, which strict JSON lacks;
        # an integer of thousands of digits is read as a float, infinite
        def strict(text):
            return json.loads(text, parse_constant=lambda name: self.fail("%s in --json" % name))
        logprobs = {"content": [{"token": "a", "logprob": float("-inf"), "bytes": [97],
                                 "top_logprobs": [{"token": "b", "logprob": float("nan")}]}]}
        chunk_ = {"id": "c", "model": "m", "choices": [{"index": 0, "delta": {"content": "a"},
                                                          "logprobs": logprobs, "finish_reason": "stop"}]}
        usage = '{"choices": [], "usage": {"prompt_tokens": %s, "completion_tokens": 1}}' % ("9" * 5000)
        body = ("data: %s\n\ndata: %s\n\ndata: [DONE]\n\n" % (json.dumps(chunk_), usage)).encode()
        server = self.serve([head()] + [chunk(body)] + [END])
        result = self.run_cli("--json", "Hi", server=server)
        self.assertEqual(result.status, 0)
        reply = strict(result.out)
        self.assertEqual(reply["logprobs"], [{"token": "a", "logprob": None, "bytes": [97],
                                              "top_logprobs": [{"token": "b", "logprob": None}]}])
        self.assertEqual((reply["content"], reply["usage"]["prompt_tokens"]), ("a", None))

    def test_stats_with_counts_too_large_for_a_float_prints_what_it_can(self):
        usage = {"prompt_tokens": 1, "completion_tokens": 10 ** 400, "total_tokens": 10 ** 400 + 1}
        server = self.serve(sse(delta("Hello", "stop"), {"choices": [], "usage": usage}))
        result = self.run_cli("--stats", "Hi", server=server)
        self.assertEqual((result.status, result.out), (0, "Hello\n"))
        self.assertRegex(result.err, r"^1(0{400}) tokens, first token after \d+\.\d\d s,"
                                     r" \d+\.\d\d s in all\n$")

    def test_warnings_go_to_stderr_and_leave_the_status_alone(self):
        usage = {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 50, "total_tokens": 55}}
        server = self.serve(sse(delta("a long answer", "stop"), usage))
        result = self.run_cli("--max-tokens", "8", "Hi", server=server)
        self.assertEqual((result.status, result.out), (0, "a long answer\n"))
        self.assertEqual(result.err, "warning: the server made 50 tokens where the request allowed 8:"
                                     " it ignored the limit\n")
        reply = json.loads(self.run_cli("--json", "--max-tokens", "8", "Hi", server=server).out)
        self.assertEqual(reply["warnings"], [result.err[len("warning: "):-1]])

    def test_json_of_a_context_overflow_has_its_kind_and_numbers(self):
        # llama.cpp's structured error (tools/server/server-common.cpp)
        body = {"error": {"code": 400, "message": "request (5000 tokens) exceeds the available context"
                          " size (4096 tokens), try increasing it", "type": "exceed_context_size_error",
                          "n_prompt_tokens": 5000, "n_ctx": 4096}}
        result = self.run_cli("--json", "Hi", server=self.serve(answer(body, 400)))
        reply = json.loads(result.out)
        self.assertEqual((result.status, reply["error_kind"], reply["overflow"]),
                         (1, "context_overflow", {"prompt_tokens": 5000, "context_length": 4096}))

    def test_stats_show_the_servers_own_timings(self):
        timings = {"cache_n": 70, "prompt_n": 12, "prompt_ms": 35.2, "prompt_per_token_ms": 2.93,
                   "prompt_per_second": 340.9, "predicted_n": 20, "predicted_ms": 410.0,
                   "predicted_per_token_ms": 21.6, "predicted_per_second": 46.3}
        usage = {"prompt_tokens": 82, "completion_tokens": 20, "total_tokens": 102}
        server = self.serve(sse(delta("Hi", "stop"), {"choices": [], "usage": usage, "timings": timings}))
        lines = self.run_cli("--stats", "Hi", server=server).err.splitlines()
        self.assertEqual(lines[1], "server: 12 prompt tokens at 340.9 tokens/s, 20 generated tokens at"
                                   " 46.3 tokens/s, 70 prompt tokens from its cache")

    def test_json_keeps_non_ascii_readable(self):
        server = self.serve(sse(delta("caf\u00e9", "stop")))
        result = self.run_cli("--json", "Hi", server=server)
        self.assertIn('"content": "caf\u00e9"', result.out)


class WireTest(CommandLineCase):
    """--trace shows the wire on stderr; --curl prints the request as a curl command."""

    def test_trace_shows_the_wire_on_stderr_and_never_the_key(self):
        server = self.serve(sse(delta("Hi", "stop")))
        result = self.run_cli("--trace", "Hello", server=server, env={"LLM_API_KEY": KEY,
                                                                      "LLM_BASE_URL": server.url})
        self.assertEqual((result.status, result.out), (0, "Hi\n"))
        lines = result.err.splitlines()
        self.assertIn("> POST /v1/chat/completions HTTP/1.1", lines)
        self.assertIn("> Authorization: Bearer ***", lines)
        self.assertTrue(any(line.startswith("< +") and "HTTP/1.1 200 OK" in line for line in lines))
        self.assertTrue(any(line.startswith("< +") and "data: [DONE]" in line for line in lines))
        self.assertNotIn(KEY[3:9], result.err)

    def curl_of(self, server, *args, **env):
        result = self.run_cli("--curl", *args, server=server, env=env)
        self.assertEqual(result.err, "")
        self.assertEqual(result.status, 0)
        self.assertNotIn(KEY[3:9], result.out)
        return result.out

    @unittest.skipUnless(shutil.which("curl") and shutil.which("sh"), "needs curl and a POSIX shell")
    def test_curl_runs_with_a_real_curl_and_gets_the_clients_answer(self):
        prompt = "It's \"quoted\" $HOME `date` \\ and caf\u00e9"
        for stream in (True, False):
            with self.subTest(stream=stream):
                server = self.serve(sse(delta("Hel"), delta("lo", "stop")) if stream
                                    else answer(message("Hello")))
                options = ["-o", "seed", "42"] + ([] if stream else ["--no-stream"]) + [prompt]
                for key_variable in ("LLM_API_KEY", "OPENAI_API_KEY"):
                    env = {key_variable: KEY, key_variable.replace("API_KEY", "BASE_URL"): server.url + "/v1"}
                    command = self.curl_of(server, *options, **env)
                    self.assertIn('"Authorization: Bearer $%s"' % key_variable, command)
                    self.assertEqual(server.requests, [])  # --curl sends nothing
                    ran = run(["sh", "-c", command], env=environment(**env))
                    self.assertEqual(ran.status, 0, ran.err)
                    by_curl = server.requests[-1]
                    reply = self.run_cli(*options, server=server, env=env)
                    by_llm = server.requests[-1]
                    self.assertEqual(by_curl.json(), by_llm.json())
                    for name in ("authorization", "content-type", "accept"):
                        self.assertEqual(by_curl.headers[name], by_llm.headers[name])
                    if stream:
                        said = "".join(json.loads(line[6:])["choices"][0]["delta"].get("content", "")
                                       for line in ran.out.splitlines() if line.startswith("data: {"))
                    else:
                        said = json.loads(ran.out)["choices"][0]["message"]["content"]
                    self.assertEqual((said + "\n", reply.out), ("Hello\n", "Hello\n"))
                    with server.lock:
                        server.requests.clear()

    def test_curl_with_a_key_given_on_the_command_line_names_the_variable(self):
        server = self.serve(sse(delta("x", "stop")))
        command = self.curl_of(server, "--key", KEY, "Hi")
        self.assertIn('"Authorization: Bearer $LLM_API_KEY"', command)
        self.assertEqual(server.requests, [])

    def test_curl_needs_a_prompt(self):
        result = self.run_cli("--curl", server=self.serve(sse(delta("x", "stop"))))
        self.assertEqual(result.status, 2)
        self.assertIn("no prompt", result.err)


class ModelsTest(CommandLineCase):
    def test_lists_the_models_one_per_line(self):
        server = self.serve(answer({"object": "list", "data": [{"id": "llama3.2"}, {"id": "qwen2.5"}]}))
        result = self.run_cli("--models", server=server)
        self.assertEqual((result.status, result.out, result.err), (0, "llama3.2\nqwen2.5\n", ""))
        self.assertEqual((server.requests[0].method, server.requests[0].path), ("GET", "/v1/models"))

    def test_lists_the_models_as_json(self):
        server = self.serve(answer({"models": [{"name": "mistral:7b"}]}))
        result = self.run_cli("--models", "--json", server=server)
        self.assertEqual(json.loads(result.out), ["mistral:7b"])

    def test_a_failed_listing_is_one_error_line(self):
        server = self.serve(answer({"error": "not here"}, 404))
        result = self.run_cli("--models", server=server)
        self.assertEqual((result.status, result.out, result.err), (1, "", "error: HTTP 404: not here (GET %s/v1/models)\n" % server.url))


# ---------------------------------------------------------------- errors and exit status


class ErrorTest(CommandLineCase):
    def test_connection_refused_is_one_line_and_status_1(self):
        port = free_port()
        result = self.run_cli("--base-url", "http://127.0.0.1:%d" % port, "Hi")
        self.assertEqual((result.status, result.out), (1, ""))
        self.assertEqual(result.err, "error: connection refused: 127.0.0.1:%d"
                                     " (is the server running?)\n" % port)

    def test_http_error_is_the_servers_message(self):
        server = self.serve(answer({"error": {"message": "model \"nope\" not found"}}, 404))
        result = self.run_cli("--model", "nope", "Hi", server=server)
        self.assertEqual((result.status, result.out), (1, ""))
        self.assertEqual(result.err, 'error: HTTP 404: model "nope" not found'
                                     ' (POST %s/v1/chat/completions)\n' % server.url)

    def test_the_key_is_never_shown(self):
        server = self.serve(answer({"error": "invalid key " + KEY}, 401))
        result = self.run_cli("--key", KEY, "Hi", server=server)
        self.assertEqual(result.status, 1)
        self.assertNotIn(KEY, result.out + result.err)
        self.assertEqual(result.err, "error: HTTP 401: invalid key *** (is the API key right? see --key)\n")

    def test_an_error_mid_stream_keeps_the_text_that_came(self):
        server = self.serve(sse(delta("Partial "), delta("answer"), RESET, done=False))
        result = self.run_cli("Hi", server=server)
        self.assertEqual((result.status, result.out), (1, "Partial answer\n"))
        self.assertEqual(result.err.count("\n"), 1)
        self.assertTrue(result.err.startswith("error: connection reset by 127.0.0.1:"), result.err)

    def test_a_stream_cut_short_is_an_error(self):
        server = self.serve([head(), chunk(b'data: {"choices": [{"delta": {"content": "Hal"}}]}\n\n'), END])
        result = self.run_cli("Hi", server=server)
        self.assertEqual((result.status, result.out, result.err),
                         (1, "Hal\n", "error: stream ended before [DONE]\n"))

    def test_a_timeout_is_reported(self):
        server = self.serve(sse(delta("slow"), HANG))
        result = self.run_cli("--timeout", "0.3", "Hi", server=server)
        self.assertEqual((result.status, result.out), (1, "slow\n"))
        self.assertEqual(result.err, "error: timed out after 0.3s waiting for data\n")

    def test_bad_arguments_are_one_line_and_status_2(self):
        for args, error in ((["--temperature", "hot", "Hi"], "argument -t/--temperature: invalid float value: 'hot'"),
                            (["--timeout", "-1", "Hi"], "timeout must be a positive number of seconds, got -1.0"),
                            (["--base-url", "ftp://example.com", "Hi"], "base_url must be an http:// or https:// URL"),
                            (["--bogus"], "unrecognized arguments: --bogus")):
            with self.subTest(args=args):
                result = self.run_cli(*args)
                self.assertEqual((result.status, result.out), (2, ""))
                self.assertTrue(result.err.startswith("error: " + error), result.err)
                self.assertEqual(result.err.count("\n"), 1)

    def test_no_prompt_at_all_is_a_usage_error(self):
        result = self.run_cli(stdin=b"  \n")
        self.assertEqual((result.status, result.out), (2, ""))
        self.assertTrue(result.err.startswith("error: no prompt"), result.err)

    def test_version_and_help(self):
        result = self.run_cli("--version")
        self.assertEqual((result.status, result.out.strip()), (0, "llm.py " + self.version()))
        result = self.run_cli("--help")
        self.assertEqual(result.status, 0)
        for text in ("--base-url", "--models", "--show-reasoning", "examples:", "LLM_BASE_URL",
                     'cat notes.txt | llm.py "Summarise:"'):
            self.assertIn(text, result.out)

    def version(self):
        with open(LLM) as f:
            for line in f:
                if line.startswith("__version__"):
                    return line.split('"')[1]

    @unittest.skipIf(os.name == "nt", "POSIX signals")
    def test_ctrl_c_stops_the_reply_keeps_its_text_and_exits_130(self):
        server = self.serve(sse(delta("The beginning"), HANG))
        process = self.start("--base-url", server.url, "Tell me a long story")
        read_until(process.stdout, b"The beginning")
        started = time.monotonic()
        process.send_signal(signal.SIGINT)
        result = self.finish(process)
        self.assertLess(time.monotonic() - started, 5)
        self.assertEqual((result.status, result.out, result.err), (130, "\n", "[stopped]\n"))


# ---------------------------------------------------------------- the chat loop


class Terminal:
    """llm.py (or another ``command``) on a pseudo-terminal: type lines, wait for text."""

    def __init__(self, args, env=None, command=None, cwd=None):
        master, slave = pty.openpty()
        self.master = master
        self.process = subprocess.Popen((command or [sys.executable, LLM]) + args, stdin=slave,
                                        stdout=slave, stderr=slave, cwd=cwd,
                                        env=environment(**(env or {})),
                                        start_new_session=True)
        os.close(slave)
        self.seen = b""
        self.position = 0  # what expect() has already matched

    def type(self, text):
        os.write(self.master, text.encode("utf-8"))

    def expect(self, text, timeout=WAIT):
        """Wait for ``text`` after what was last expected; return what came up to it."""
        wanted = text.encode("utf-8")
        deadline = time.monotonic() + timeout
        while self.seen.find(wanted, self.position) < 0:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.master], [], [], left)[0]:
                raise AssertionError("%r did not come; got %r" % (text, self.seen[self.position:]))
            try:
                data = os.read(self.master, 4096)
            except OSError:  # EIO: the other side closed
                data = b""
            if not data:
                raise AssertionError("the terminal closed before %r; got %r" % (text, self.seen))
            self.seen += data.replace(b"\r\n", b"\n")
        end = self.seen.find(wanted, self.position) + len(wanted)
        came, self.position = self.seen[self.position:end], end
        return came.decode("utf-8", "replace")

    def sleeping(self):
        """Whether the program sleeps in a system call (after a prompt: waiting for a key)."""
        try:
            with open("/proc/%d/stat" % self.process.pid) as f:
                return f.read().rsplit(")", 1)[1].split()[0] == "S"
        except OSError:  # no /proc here: ps tells the same
            state = subprocess.check_output(["ps", "-o", "stat=", "-p", str(self.process.pid)])
            return state.strip()[:1] in (b"S", b"I")

    def wait(self):
        deadline = time.monotonic() + WAIT
        while self.process.poll() is None and time.monotonic() < deadline:
            if select.select([self.master], [], [], 0.1)[0]:
                try:
                    self.seen += os.read(self.master, 4096).replace(b"\r\n", b"\n")
                except OSError:
                    pass
        return self.process.poll()

    def close(self):
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(WAIT)
        os.close(self.master)


@unittest.skipIf(pty is None or os.name == "nt", "needs a pseudo-terminal")
class ChatLoopTest(CommandLineCase):
    def terminal(self, *args, **options):
        terminal = Terminal(list(args), **options)
        self.addCleanup(terminal.close)
        return terminal

    def test_a_conversation_keeps_history_until_reset_and_exit(self):
        server = self.serve(sse(delta("Hello, "), 0.05, delta("Ada!", "stop")),
                            sse(delta("You are Ada.", "stop")),
                            sse(delta("I do not know.", "stop")))
        terminal = self.terminal("--base-url", server.url, "--model", "m")
        banner = terminal.expect("> ")
        self.assertIn("/reset", banner)
        terminal.type("I am Ada\n")
        self.assertIn("Hello, Ada!\n", terminal.expect("> "))
        terminal.type("Who am I?\n")
        self.assertIn("You are Ada.\n", terminal.expect("> "))
        self.assertEqual(server.requests[1].json()["messages"], [
            {"role": "user", "content": "I am Ada"},
            {"role": "assistant", "content": "Hello, Ada!"},
            {"role": "user", "content": "Who am I?"}])
        terminal.type("/reset\n")
        self.assertIn("forgotten", terminal.expect("> "))
        terminal.type("Who am I?\n")
        self.assertIn("I do not know.", terminal.expect("> "))
        self.assertEqual(server.requests[2].json()["messages"], [{"role": "user", "content": "Who am I?"}])
        terminal.type("/exit\n")
        self.assertEqual(terminal.wait(), 0)
        self.assertNotIn(b"Traceback", terminal.seen)

    def test_ctrl_c_stops_a_reply_and_the_loop_goes_on(self):
        server = self.serve(sse(delta("Once upon a time"), HANG),
                            sse(delta("The end.", "stop")))
        terminal = self.terminal("--base-url", server.url)
        terminal.expect("> ")
        terminal.type("Tell me a story\n")
        terminal.expect("Once upon a time")
        terminal.process.send_signal(signal.SIGINT)  # what Ctrl-C sends
        self.assertIn("[stopped]", terminal.expect("> "))
        terminal.type("Finish it\n")
        self.assertIn("The end.", terminal.expect("> "))
        self.assertEqual(server.requests[1].json()["messages"], [  # the partial reply stays
            {"role": "user", "content": "Tell me a story"},
            {"role": "assistant", "content": "Once upon a time"},
            {"role": "user", "content": "Finish it"}])
        terminal.type("\x04")  # Ctrl-D
        self.assertEqual(terminal.wait(), 0)

    def test_a_reply_that_calls_tools_is_shown_and_the_history_stays_valid(self):
        calls = [{"index": 0, "id": "call_1", "type": "function",
                  "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}},
                 {"index": 1, "id": "call_2", "type": "function",
                  "function": {"name": "get_time", "arguments": "{}"}}]
        server = self.serve(sse(delta("Let me look.", tool_calls=calls), delta(finish="tool_calls")),
                            sse(delta("Sunny.", "stop")))
        tools = json.dumps([{"type": "function", "function": {"name": "get_weather"}}])
        terminal = self.terminal("--base-url", server.url, "-o", "tools", tools)
        terminal.expect("> ")
        terminal.type("Weather in Paris?\n")
        shown = terminal.expect("> ")
        self.assertIn('tool call: get_weather {"city": "Paris"}', shown)
        self.assertIn("tool call: get_time {}", shown)
        terminal.type("Thanks\n")
        self.assertIn("Sunny.", terminal.expect("> "))
        history = server.requests[1].json()["messages"]
        self.assertEqual(history[0], {"role": "user", "content": "Weather in Paris?"})
        self.assertEqual((history[1]["content"], [c["id"] for c in history[1]["tool_calls"]]),
                         ("Let me look.", ["call_1", "call_2"]))
        # every call has its answer before the next user message, as servers require
        self.assertEqual([(m["role"], m["tool_call_id"]) for m in history[2:4]],
                         [("tool", "call_1"), ("tool", "call_2")])
        self.assertTrue(all(m["content"] for m in history[2:4]))
        self.assertEqual(history[4:], [{"role": "user", "content": "Thanks"}])
        terminal.type("/exit\n")
        self.assertEqual(terminal.wait(), 0)

    def test_reasoning_stays_out_of_the_history_whatever_its_shape(self):
        thinking = {"type": "thinking", "thinking": [{"type": "text", "text": "Hmm."}]}
        server = self.serve(sse(delta([thinking, {"type": "text", "text": "Hi!"}], "stop")),
                            sse(delta("Bye.", "stop", reasoning="Hmm.", reasoning_content="Hmm.")),
                            sse(delta("Done.", "stop")))
        terminal = self.terminal("--base-url", server.url)
        terminal.expect("> ")
        for line in ("Hello\n", "Go on\n", "End\n"):
            terminal.type(line)
            terminal.expect("> ")
        self.assertEqual(server.requests[2].json()["messages"], [
            {"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi!"},
            {"role": "user", "content": "Go on"}, {"role": "assistant", "content": "Bye."},
            {"role": "user", "content": "End"}])
        terminal.type("/exit\n")
        self.assertEqual(terminal.wait(), 0)

    def test_a_failed_turn_is_reported_and_dropped_from_history(self):
        server = self.serve(answer({"error": "overloaded"}, 503), sse(delta("Fine.", "stop")))
        terminal = self.terminal("--base-url", server.url)
        terminal.expect("> ")
        terminal.type("Hi\n")
        self.assertIn("error: HTTP 503: overloaded", terminal.expect("> "))
        terminal.type("Hi again\n")
        self.assertIn("Fine.", terminal.expect("> "))
        self.assertEqual(server.requests[1].json()["messages"], [{"role": "user", "content": "Hi again"}])
        terminal.type("/exit\n")
        self.assertEqual(terminal.wait(), 0)

    def test_ctrl_c_at_the_prompt_gives_a_new_prompt(self):
        server = self.serve(sse(delta("ok", "stop")))
        terminal = self.terminal("--base-url", server.url)
        terminal.expect("> ")
        # a signal just before readline waits for a key is seen at the next key
        self.assertTrue(wait_until(terminal.sleeping, WAIT), "the chat did not wait for a key")
        terminal.process.send_signal(signal.SIGINT)
        terminal.expect("> ")
        terminal.type("/exit\n")
        self.assertEqual(terminal.wait(), 0)
        self.assertEqual(server.requests, [])

    def test_unknown_commands_are_reported_not_sent_and_help_lists_them_all(self):
        server = self.serve(sse(delta("Sent.", "stop")))
        terminal = self.terminal("--base-url", server.url)
        terminal.expect("> ")
        terminal.type("/rest\n")
        self.assertIn("error: unknown command /rest: /help lists them", terminal.expect("> "))
        terminal.type("/help\n")
        listing = terminal.expect("> ")
        for command in ("/reset", "/clear", "/exit", "/quit", "/help", "//"):
            self.assertIn(command, listing)
        terminal.type("//usr/bin is a folder\n")
        self.assertIn("Sent.", terminal.expect("> "))
        self.assertEqual(len(server.requests), 1)
        self.assertEqual(server.requests[0].json()["messages"],
                         [{"role": "user", "content": "/usr/bin is a folder"}])
        terminal.type("/exit\n")
        self.assertEqual(terminal.wait(), 0)

    def test_reasoning_is_dimmed_on_a_terminal(self):
        thinking = {"choices": [{"index": 0, "delta": {"reasoning_content": "thinking"}}]}
        server = self.serve(sse(thinking, delta("42", "stop")))
        terminal = self.terminal("--base-url", server.url, "--show-reasoning", "The answer?",
                                 env={"TERM": "xterm"})
        terminal.expect("\033[2mthinking\033[0m\n42\n")
        self.assertEqual(terminal.wait(), 0)


# ---------------------------------------------------------------- what a server's text may do to a terminal

# A clipboard write (OSC 52), a title change, a screen clear, a C1 CSI, a bell, a DEL and a NUL.
HOSTILE = "\x1b]52;c;aGk=\x07\x1b]0;owned\x07\x1b[2J\u009b31m\x7f\x00"
SHOWN = "\\u001b]52;c;aGk=\\u0007\\u001b]0;owned\\u0007\\u001b[2J\\u009b31m\\u007f\\u0000"
RAW_CONTROLS = (b"\x1b", b"\x07", b"\xc2\x9b", b"\x7f", b"\x00")


@unittest.skipIf(pty is None or os.name == "nt", "needs a pseudo-terminal")
class TerminalControlTest(CommandLineCase):
    """On a terminal the server's control characters are shown, not obeyed; pipes get them as sent."""

    def on_terminal(self, *args, **options):
        terminal = Terminal(list(args), **options)
        self.addCleanup(terminal.close)
        status = terminal.wait()
        return status, terminal.seen

    def assertNoRawControls(self, seen):
        for control in RAW_CONTROLS:
            self.assertNotIn(control, seen)

    def hostile_stream(self):
        thinking = {"choices": [{"index": 0, "delta": {"reasoning_content": "think " + HOSTILE}}]}
        # the escape is cut between two pieces: each half alone looks harmless
        return sse(thinking, delta("before \x1b"), delta(HOSTILE[1:] + " after", "stop"))

    def test_reply_text_and_reasoning_reach_a_terminal_as_visible_escapes(self):
        server = self.serve(self.hostile_stream())
        status, seen = self.on_terminal("--base-url", server.url, "--show-reasoning", "Hi",
                                        env={"TERM": "xterm"})
        self.assertEqual(status, 0)
        self.assertIn(("\033[2mthink " + SHOWN + "\033[0m\n").encode(), seen)  # still dimmed
        self.assertIn(("before \\u001b" + SHOWN[len("\\u001b"):] + " after\n").encode(), seen)
        self.assertNoRawControls(seen.replace(b"\033[2m", b"").replace(b"\033[0m", b""))

    def test_a_whole_reply_reaches_a_terminal_as_visible_escapes(self):
        server = self.serve(answer(message("x " + HOSTILE)))
        status, seen = self.on_terminal("--base-url", server.url, "--no-stream", "Hi")
        self.assertEqual((status, seen), (0, ("x " + SHOWN + "\n").encode()))

    def test_an_error_reaches_a_terminal_as_visible_escapes(self):
        server = self.serve(answer({"error": "bad " + HOSTILE}, 400))
        status, seen = self.on_terminal("--base-url", server.url, "Hi")
        self.assertEqual(status, 1)
        self.assertEqual(seen, ("error: HTTP 400: bad " + SHOWN + "\n").encode())

    def test_model_ids_reach_a_terminal_as_visible_escapes(self):
        server = self.serve(answer({"data": [{"id": "m" + HOSTILE}]}))
        status, seen = self.on_terminal("--base-url", server.url, "--models")
        self.assertEqual((status, seen), (0, ("m" + SHOWN + "\n").encode()))

    def test_json_on_a_terminal_is_the_same_json_without_raw_controls(self):
        server = self.serve(self.hostile_stream())
        status, seen = self.on_terminal("--base-url", server.url, "--json", "Hi")
        self.assertEqual(status, 0)
        self.assertNoRawControls(seen)
        reply = json.loads(seen.decode("utf-8"))
        self.assertEqual((reply["content"], reply["reasoning"]),
                         ("before " + HOSTILE + " after", "think " + HOSTILE))

    def test_pipes_get_the_text_byte_for_byte(self):
        server = self.serve(self.hostile_stream(), self.hostile_stream(),
                            answer({"error": "bad " + HOSTILE}, 400),
                            answer({"data": [{"id": "m" + HOSTILE}]}))
        result = self.run_cli("--show-reasoning", "Hi", server=server)
        self.assertEqual((result.out, result.err),
                         ("before " + HOSTILE + " after\n", "think " + HOSTILE + "\n"))
        result = self.run_cli("--json", "Hi", server=server)
        self.assertIn('"content": "before \\u001b]52;c;aGk=\\u0007\\u001b]0;owned\\u0007\\u001b[2J'
                      '\u009b31m\x7f\\u0000 after"', result.out)  # what json.dumps writes
        self.assertEqual(json.loads(result.out)["content"], "before " + HOSTILE + " after")
        self.assertEqual(self.run_cli("Hi", server=server).err, "error: HTTP 400: bad " + HOSTILE + "\n")
        self.assertEqual(self.run_cli("--models", server=server).out, "m" + HOSTILE + "\n")


if __name__ == "__main__":
    unittest.main()
