"""Tests for the programs in examples/: run with ``python -m unittest tests.test_examples``.

Each example runs as a subprocess against loopback servers from
tests/loopback.py (exact bytes, in steps); relay.py is started on a free port
and spoken to with http.client. Every wait is bounded.
"""

import http.client
import importlib.util
import json
import os
import re
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as a file: this checkout's llm.py and tests
    sys.path.insert(0, ROOT)

from tests.loopback import Server, answer, delta, free_port, message, sse
from tests.test_cli import WAIT, environment, read_until, run

EXAMPLES = os.path.join(ROOT, "examples")


def tool_call(name, arguments, call_id):
    return {"index": 0, "id": call_id, "type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments)}}


class ExampleCase(unittest.TestCase):
    def setUp(self):
        self.directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.directory, True)

    def serve(self, *answers):
        server = Server(*answers)
        self.addCleanup(server.close)
        return server

    def run_example(self, name, *args, **options):
        command = [sys.executable, os.path.join(EXAMPLES, name)] + list(args)
        result = run(command, options.get("stdin", b""), environment(**options.get("env", {})),
                     cwd=self.directory)
        self.assertNotIn("Traceback", result.err)
        return result


# ---------------------------------------------------------------- chatbot.py


class ChatbotTest(ExampleCase):
    def chat(self, server, lines, *args):
        return self.run_example("chatbot.py", "--base-url", server.url, "--db", "chat.db",
                                *args, stdin=lines.encode("utf-8"))

    def test_the_history_is_kept_in_sqlite_and_resumed_in_the_next_run(self):
        server = self.serve(sse(delta("Hello, Ada.", "stop")), sse(delta("You are Ada.", "stop")),
                            sse(delta("Still Ada.", "stop")))
        result = self.chat(server, "I am Ada\nWho am I?\n")
        self.assertEqual((result.status, result.out), (0, "bot> Hello, Ada.\nbot> You are Ada.\n"))
        self.assertEqual(len(server.requests[1].json()["messages"]), 3)
        result = self.chat(server, "And now?\n")
        self.assertIn("resuming 'default': 4 messages", result.err)
        self.assertEqual(server.requests[2].json()["messages"], [
            {"role": "user", "content": "I am Ada"},
            {"role": "assistant", "content": "Hello, Ada."},
            {"role": "user", "content": "Who am I?"},
            {"role": "assistant", "content": "You are Ada."},
            {"role": "user", "content": "And now?"}])

    def test_each_id_is_its_own_conversation_and_can_be_listed_and_forgotten(self):
        server = self.serve(sse(delta("ok", "stop")))
        self.chat(server, "one\n", "--id", "first")
        self.chat(server, "two\nthree\n", "--id", "second")
        self.chat(server, "four\n", "--id", "first")
        self.assertEqual([m["content"] for m in server.requests[3].json()["messages"]],
                         ["one", "ok", "four"])
        listing = self.chat(server, "", "--list").out.splitlines()
        self.assertEqual([line.split()[:2] for line in listing], [["first", "4"], ["second", "4"]])
        self.chat(server, "", "--id", "first", "--forget")
        self.assertEqual([line.split()[0] for line in self.chat(server, "", "--list").out.splitlines()],
                         ["second"])

    def test_a_failed_turn_is_not_stored(self):
        server = self.serve(answer({"error": "busy"}, 503), sse(delta("fine", "stop")))
        result = self.chat(server, "first try\nsecond try\n")
        self.assertIn("error: HTTP 503: busy", result.err)
        self.assertEqual(server.requests[1].json()["messages"], [{"role": "user", "content": "second try"}])
        self.chat(server, "third\n")
        self.assertEqual([m["content"] for m in server.requests[2].json()["messages"]],
                         ["second try", "fine", "third"])

    def test_the_database_is_closed_on_every_path(self):
        # Python 3.13 and later warn (ResourceWarning) of a connection left to the collector
        server = self.serve(sse(delta("ok", "stop")))
        loud = {"env": {"PYTHONWARNINGS": "always::ResourceWarning"}}
        with open(os.path.join(self.directory, "text.db"), "w") as f:
            f.write("this is not a database, " * 100)
        for args in (["--id", "kept"], ["--list"], ["--id", "kept", "--forget"],
                     ["--id", "nope", "--forget"], ["--db", "text.db", "--list"]):
            result = self.run_example("chatbot.py", "--base-url", server.url, *args,
                                      stdin=b"Hi\n", **loud)
            self.assertNotIn("ResourceWarning", result.err, args)

    def test_exit_command_and_system_prompt(self):
        server = self.serve(sse(delta("ok", "stop")))
        result = self.chat(server, "hi\n/exit\nnever sent\n", "--system", "Be terse.")
        self.assertEqual(result.status, 0)
        self.assertEqual(len(server.requests), 1)
        self.assertEqual(server.requests[0].json()["messages"][0], {"role": "system", "content": "Be terse."})


# ---------------------------------------------------------------- compare.py


class CompareTest(ExampleCase):
    def test_backends_answer_in_parallel_side_by_side_and_a_dead_one_shows_its_error(self):
        arrived = [threading.Event(), threading.Event()]
        waited = []

        def meet(mine, other):  # each server holds its answer until the other was asked too
            return lambda: (arrived[mine].set(), waited.append(arrived[other].wait(5)))

        usage = {"prompt_tokens": 5, "completion_tokens": 12, "total_tokens": 17}
        first = self.serve(sse(meet(0, 1), delta("Rayleigh scattering."), delta(finish="stop"),
                               {"choices": [], "usage": usage}))
        second = self.serve(sse(meet(1, 0), delta("Blue light scatters most.", "stop")))
        dead = "http://127.0.0.1:%d" % free_port()
        result = self.run_example("compare.py", "Why is the sky blue?", "--width", "120",
                                  "-b", first.url, "llama3.2", "-b", dead, "qwen2.5",
                                  "-b", second.url, "mistral")
        self.assertEqual(result.status, 0)
        self.assertEqual(waited, [True, True])
        lines = result.out.splitlines()
        self.assertTrue(lines[0].startswith("llama3.2 @ http://127.0.0.1:"), lines[0])
        self.assertEqual(lines[0].count(" | "), 2)
        table = result.out.replace(" | ", "\n")
        for text in ("Rayleigh scattering.", "Blue light scatters most.", "error: connection refused:",
                     "12 tokens", "first token"):
            self.assertIn(text, table)
        self.assertEqual(first.requests[0].json()["model"], "llama3.2")
        self.assertEqual(second.requests[0].json()["model"], "mistral")
        self.assertIn("qwen2.5 @ %s: failed" % dead, result.err)

    def test_keys_come_from_the_named_variable_and_all_failing_is_status_1(self):
        server = self.serve(answer({"error": "bad key"}, 401))
        result = self.run_example("compare.py", "Hi", "-b", server.url, "m", "MY_KEY",
                                  env={"MY_KEY": "sk-from-variable"})
        self.assertEqual(result.status, 1)
        self.assertIn("error: HTTP 401: bad key", result.out)
        self.assertEqual(server.requests[0].headers["authorization"], "Bearer sk-from-variable")

    def test_without_backends_the_environment_one_is_asked(self):
        server = self.serve(sse(delta("from the environment", "stop")))
        result = self.run_example("compare.py", "Hi", env={"LLM_BASE_URL": server.url, "LLM_MODEL": "env-model"})
        self.assertIn("from the environment", result.out)
        self.assertIn("env-model @ %s" % server.url, result.out)


# ---------------------------------------------------------------- summarise.py


class SummariseTest(ExampleCase):
    def write(self, text):
        path = os.path.join(self.directory, "long.txt")
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return path

    def summariser(self, request):
        """Summaries of parts by their numbers; the merge streams MERGED."""
        body = request.json()
        text = body["messages"][-1]["content"]
        if "Merge them" in text:
            return sse(delta("MERGED "), delta("summary.", "stop"))
        number = text.split(" of ")[0].split()[-1]
        return answer(message("summary %s" % number))

    def test_a_long_file_is_summarised_in_parts_then_merged(self):
        paragraphs = ["Paragraph %d. %s" % (n, "word " * 40) for n in range(12)]
        path = self.write("\n\n".join(paragraphs))
        server = self.serve(self.summariser)
        result = self.run_example("summarise.py", path, "--chunk-chars", "700",
                                  "--base-url", server.url, "--model", "m")
        self.assertEqual((result.status, result.out), (0, "MERGED summary.\n"))
        parts = server.requests[:-1]
        self.assertEqual(len(parts), 4)  # paragraphs of 216 characters: three fit in 700
        for request in parts:
            content = request.json()["messages"][-1]["content"]
            self.assertLessEqual(len(content.split(" words.\n\n", 1)[1]), 700)
        merge = server.requests[-1].json()
        self.assertIs(merge["stream"], True)
        self.assertIn("Part 1: summary 1\n\nPart 2: summary 2", merge["messages"][-1]["content"])
        self.assertIn("summarising part 4 of 4", result.err)
        text = "".join(r.json()["messages"][-1]["content"].split(" words.\n\n", 1)[1] for r in parts)
        for paragraph in paragraphs:  # nothing lost at the cuts
            self.assertIn(paragraph, text)

    def test_a_short_file_is_one_request(self):
        server = self.serve(sse(delta("Short.", "stop")))
        result = self.run_example("summarise.py", self.write("A short note."), "--base-url", server.url)
        self.assertEqual((result.status, result.out, len(server.requests)), (0, "Short.\n", 1))
        self.assertIn("A short note.", server.requests[0].json()["messages"][-1]["content"])

    def test_summaries_too_long_to_merge_are_summarised_again_in_groups(self):
        def long_summaries(request):
            text = request.json()["messages"][-1]["content"]
            if "Merge them" in text:
                return sse(delta("done", "stop"))
            return answer(message("s" * 150))

        server = self.serve(long_summaries)
        path = self.write("\n\n".join("p%d %s" % (n, "x" * 180) for n in range(6)))
        result = self.run_example("summarise.py", path, "--chunk-chars", "400", "--parallel", "3",
                                  "--base-url", server.url)
        self.assertEqual((result.status, result.out), (0, "done\n"))
        self.assertIn("summarising group of summaries 1 of", result.err)

    def test_stdin_and_errors(self):
        server = self.serve(answer({"error": "model not loaded"}, 500))
        result = self.run_example("summarise.py", "-", "--base-url", server.url, stdin=b"some text")
        self.assertEqual(result.status, 1)
        self.assertEqual(result.err.splitlines()[-1], "error: HTTP 500: model not loaded")


# ---------------------------------------------------------------- json_reply.py


class JSONReplyTest(ExampleCase):
    def ask(self, server, *args):
        return self.run_example("json_reply.py", "--base-url", server.url, "Colours?", *args)

    def test_a_json_reply_is_parsed_and_printed(self):
        server = self.serve(answer(message('{"colours": ["red", "blue"]}')))
        result = self.ask(server)
        self.assertEqual(result.status, 0)
        self.assertEqual(json.loads(result.out), {"colours": ["red", "blue"]})
        self.assertEqual(server.requests[0].json()["response_format"], {"type": "json_object"})

    def test_text_that_is_not_json_is_shown_and_the_error_sent_back(self):
        server = self.serve(answer(message("Sure! Red and blue.")), answer(message('["red", "blue"]')))
        result = self.ask(server)
        self.assertEqual((result.status, json.loads(result.out)), (0, ["red", "blue"]))
        try:  # the parser's own words: PyPy says "Unexpected 'S'" where CPython says "Expecting value"
            json.loads("Sure! Red and blue.")
        except ValueError as exc:
            why = str(exc)
        self.assertIn("attempt 1: the reply is not JSON (%s)" % why, result.err)
        self.assertIn("'Sure! Red and blue.'", result.err)
        retry = server.requests[1].json()["messages"]
        self.assertEqual(retry[-2], {"role": "assistant", "content": "Sure! Red and blue."})
        self.assertTrue(retry[-1]["content"].startswith("That was not valid JSON"))

    def test_json_nested_deeper_than_python_recurses_is_not_json(self):
        deep = "[" * 100000 + "]" * 100000
        server = self.serve(answer(message(deep)), answer(message('["red", "blue"]')))
        result = self.ask(server)
        self.assertEqual((result.status, json.loads(result.out)), (0, ["red", "blue"]))
        # the parser's own words vary: "maximum recursion depth exceeded while decoding a JSON
        # array" up to 3.13, "Stack overflow (used 8152 kB) while decoding ..." from 3.14 on
        self.assertRegex(result.err, r"^attempt 1: the reply is not JSON \([^\n]+\):\n    '\[\[\[")
        self.assertNotIn("Traceback", result.err)
        self.assertNotIn("attempt 2", result.err)
        retry = server.requests[1].json()["messages"]
        self.assertTrue(retry[-1]["content"].startswith("That was not valid JSON ("), retry[-1])

    def test_never_json_is_status_1(self):
        server = self.serve(answer(message("I cannot do JSON.")))
        result = self.ask(server, "--attempts", "3")
        self.assertEqual((result.status, result.out), (1, ""))
        self.assertEqual(len(server.requests), 3)
        self.assertIn("error: no JSON after 3 attempts", result.err)

    def test_json_inside_other_text_is_taken_out(self):
        server = self.serve(answer(message('Here you are:\n```json\n{"a": 1}\n```\nEnjoy!')))
        result = self.ask(server)
        self.assertEqual((result.status, json.loads(result.out)), (0, {"a": 1}))
        self.assertIn("wrapped in other text", result.err)

    def test_schema_and_no_format(self):
        schema_path = os.path.join(self.directory, "schema.json")
        with open(schema_path, "w") as f:
            json.dump({"type": "object", "properties": {"n": {"type": "integer"}}}, f)
        server = self.serve(answer(message('{"n": 3}')))
        self.assertEqual(json.loads(self.ask(server, "--schema", schema_path).out), {"n": 3})
        wanted = server.requests[0].json()["response_format"]
        self.assertEqual((wanted["type"], wanted["json_schema"]["schema"]["properties"]),
                         ("json_schema", {"n": {"type": "integer"}}))
        self.ask(server, "--no-format")
        self.assertNotIn("response_format", server.requests[1].json())

    def test_a_server_error_is_status_1(self):
        server = self.serve(answer({"error": {"message": "response_format is not supported"}}, 400))
        result = self.ask(server)
        self.assertEqual((result.status, result.err), (1, "error: HTTP 400: response_format is not supported\n"))


# ---------------------------------------------------------------- tools.py


class ToolsTest(ExampleCase):
    def test_tool_calls_run_locally_and_their_results_go_back_until_a_text_answer(self):
        calls = [tool_call("calculate", {"expression": "(3 + 4.5) * 2 ** 3"}, "call_a"),
                 dict(tool_call("current_time", {}, "call_b"), index=1)]
        server = self.serve(sse(delta(tool_calls=calls), delta(finish="tool_calls")),
                            sse(delta(tool_calls=[tool_call("calculate", {"expression": "__import__('os')"}, "call_c")]),
                                delta(finish="tool_calls")),
                            sse(delta("It is 60."), delta(finish="stop")))
        result = self.run_example("tools.py", "--base-url", server.url, "What is (3+4.5)*2**3?")
        self.assertEqual((result.status, result.out), (0, "It is 60.\n"))
        self.assertEqual([tool["function"]["name"] for tool in server.requests[0].json()["tools"]],
                         ["current_time", "calculate"])
        second = server.requests[1].json()["messages"]
        self.assertEqual(second[2]["role"], "assistant")
        self.assertEqual([c["id"] for c in second[2]["tool_calls"]], ["call_a", "call_b"])
        self.assertEqual(second[3], {"role": "tool", "tool_call_id": "call_a", "content": '{"result": 60.0}'})
        self.assertEqual(second[4]["tool_call_id"], "call_b")
        self.assertRegex(json.loads(second[4]["content"])["result"], r"^\w+day \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC")
        third = server.requests[2].json()["messages"]
        self.assertEqual(json.loads(third[-1]["content"]), {"error": "not allowed in a calculation: Call"})
        self.assertIn("[calculate", result.err)

    def test_a_model_that_never_stops_calling_is_cut_off(self):
        server = self.serve(sse(delta(tool_calls=[tool_call("current_time", {"utc_offset": "+02:00"}, "c")]),
                                delta(finish="tool_calls")))
        result = self.run_example("tools.py", "--base-url", server.url, "--rounds", "3", "time?")
        self.assertEqual(result.status, 1)
        self.assertEqual(len(server.requests), 3)
        self.assertIn("error: no answer after 3 requests", result.err)
        self.assertIn("UTC+0200", server.requests[1].json()["messages"][-1]["content"])

    def test_the_calculator_evaluates_arithmetic_and_refuses_the_rest(self):
        spec = importlib.util.spec_from_file_location("example_tools", os.path.join(EXAMPLES, "tools.py"))
        tools = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(tools)

        for expression, value in (("1 + 2 * 3", 7), ("(3 + 4.5) * 2 ** 3", 60.0), ("-7 // 2", -4),
                                  ("7 % 3", 1), ("sqrt(16) + abs(-2)", 6.0), ("round(pi, 2)", 3.14)):
            self.assertEqual(tools.calculate(expression), value)
        for expression in ("__import__('os').system('true')", "open('x')", "x", "2 ** 100000",
                           "9 ** 9 ** 9", "(lambda: 1)()", "[1, 2]", "'a' * 3", "True + 1", "1 +"):
            with self.assertRaises(ValueError, msg=expression):
                tools.calculate(expression)
        with self.assertRaises(ZeroDivisionError):
            tools.calculate("1 / 0")


# ---------------------------------------------------------------- relay.py


class RelayTest(ExampleCase):
    def start_relay(self, server, *options):
        process = subprocess.Popen([sys.executable, os.path.join(EXAMPLES, "relay.py"), "--port", "0",
                                    "--base-url", server.url, "--model", "m"] + list(options),
                                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, env=environment())
        process.said = b""  # its log, as far as the test has read it
        self.addCleanup(self.stop_relay, process)
        line = b""
        deadline = time.monotonic() + WAIT
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([process.stderr], [], [], left)[0]:
                self.fail("relay.py did not say where it serves: %r" % line)
            byte = os.read(process.stderr.fileno(), 1)
            if not byte:
                self.fail("relay.py ended: %r" % line)
            line += byte
        self.assertTrue(line.startswith(b"serving http://"), line)
        self.relay = process
        return int(line.split(b":")[2].split(b"/")[0])

    def relay_says(self, text):
        """Read relay.py's log until ``text`` (bytes) comes in it."""
        self.relay.said += read_until(self.relay.stderr, text)

    def stop_relay(self, process):
        if process.poll() is None:
            process.kill()
        process.wait(WAIT)
        err = (process.said + process.stderr.read()).decode("utf-8", "replace")
        process.stderr.close()
        self.assertNotIn("Traceback", err)

    def post(self, port, messages, raw=None):
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT)
        self.addCleanup(connection.close)
        body = raw if raw is not None else json.dumps({"messages": messages}).encode()
        connection.request("POST", "/chat", body, {"Content-Type": "application/json"})
        return connection.getresponse()

    def events(self, reply):
        """The data of each event, read as they come."""
        while True:
            line = reply.readline()
            if not line:
                return
            if line.startswith(b"data: "):
                data = line[6:].strip().decode()
                yield data if data == "[DONE]" else json.loads(data)

    def test_the_page_is_served(self):
        port = self.start_relay(self.serve(sse(delta("x", "stop"))))
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT)
        self.addCleanup(connection.close)
        connection.request("GET", "/")
        reply = connection.getresponse()
        page = reply.read().decode()
        self.assertEqual((reply.status, reply.getheader("Content-Type")), (200, "text/html; charset=utf-8"))
        for text in ("<form", 'fetch("/chat"', "getReader()", "[DONE]"):
            self.assertIn(text, page)
        connection.request("GET", "/nothing")
        self.assertEqual(connection.getresponse().status, 404)

    def test_the_reply_is_relayed_as_server_sent_events_as_it_comes(self):
        relayed = threading.Event()
        waited = []
        server = self.serve(sse(delta("Hel"), lambda: waited.append(relayed.wait(5)),
                                delta('lo "there"'), delta("!", "stop")))
        port = self.start_relay(server)
        reply = self.post(port, [{"role": "user", "content": "Hi"}])
        self.assertEqual((reply.status, reply.getheader("Content-Type")),
                         (200, "text/event-stream; charset=utf-8"))
        events = self.events(reply)
        self.assertEqual(next(events), {"content": "Hel"})
        relayed.set()  # the server sends the rest only now
        self.assertEqual(list(events), [{"content": 'lo "there"'}, {"content": "!"}, "[DONE]"])
        self.assertEqual(waited, [True])
        self.assertEqual(server.requests[0].json()["messages"], [{"role": "user", "content": "Hi"}])

    def test_an_upstream_error_becomes_an_error_event(self):
        server = self.serve(answer({"error": "model not found"}, 404))
        port = self.start_relay(server)
        events = list(self.events(self.post(port, [{"role": "user", "content": "Hi"}])))
        self.assertEqual(events, [{"error": "HTTP 404: model not found (POST %s/v1/chat/completions)"
                                   % server.url}, "[DONE]"])

    def test_bad_requests_are_refused(self):
        port = self.start_relay(self.serve(sse(delta("x", "stop"))))
        for raw in (b"not json", b'{"messages": []}', b'{"messages": [{"role": "robot", "content": "x"}]}',
                    b'{"messages": [{"role": "user", "content": 5}]}', b"[]",
                    b'{"messages": ' + b"[" * 100000 + b"]" * 100000 + b"}"):  # deeper than Python recurses
            with self.subTest(raw=raw[:60]):
                self.assertEqual(self.post(port, None, raw=raw).status, 400)

    def exchange(self, port, request, address="127.0.0.1"):
        """Send request (bytes, "{port}" filled in) as it is: all the reply, until the relay
        closes the connection (it speaks HTTP/1.0)."""
        connection = socket.create_connection((address, port), timeout=WAIT)
        self.addCleanup(connection.close)
        connection.sendall(request.replace(b"{port}", str(port).encode()))
        reply = b""
        for _ in range(10000):
            data = connection.recv(65536)
            if not data:
                break
            reply += data
        return reply

    def raw(self, port, request, address="127.0.0.1"):
        """Send request as it is: the reply's status and body."""
        head, _, body = self.exchange(port, request, address).partition(b"\r\n\r\n")
        return int(head.split()[1]), body

    def post_raw(self, port, headers, body=b'{"messages": [{"role": "user", "content": "Hi"}]}'):
        return self.raw(port, b"POST /chat HTTP/1.1\r\n" + headers + b"Content-Length: %d\r\n\r\n"
                        % len(body) + body)

    def test_a_post_that_is_not_json_is_refused(self):
        server = self.serve(sse(delta("x", "stop")))
        port = self.start_relay(server)
        for content_type in (b"text/plain", b"text/plain; charset=utf-8", b"application/x-www-form-urlencoded",
                             b"multipart/form-data; boundary=x", None):
            with self.subTest(content_type=content_type):
                headers = b"Host: 127.0.0.1:{port}\r\n"
                if content_type is not None:
                    headers += b"Content-Type: " + content_type + b"\r\n"
                self.assertEqual(self.post_raw(port, headers)[0], 415)
        status, body = self.post_raw(port, b"Host: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n")
        self.assertEqual((status, body.count(b"data: ")), (200, 2))  # the normal path still works
        self.assertEqual(len(server.requests), 1)  # nothing refused reached the LLM server

    def test_only_the_servers_own_host_names_are_served(self):
        server = self.serve(sse(delta("x", "stop")))
        port = self.start_relay(server)
        for host in (b"evil.example:{port}", b"evil.example", b"127.0.0.1.nip.io:{port}", b"127.0.0.1",
                     b"127.0.0.1:%d" % (port + 1 if port < 65535 else port - 1), b"", None):
            with self.subTest(host=host):
                headers = b"Host: " + host + b"\r\n" if host is not None else b""
                self.assertEqual(self.raw(port, b"GET / HTTP/1.1\r\n" + headers + b"\r\n")[0], 421)
                self.assertEqual(self.post_raw(port, headers + b"Content-Type: application/json\r\n")[0], 421)
        self.assertEqual(server.requests, [])
        for host in (b"127.0.0.1:{port}", b"localhost:{port}", b"LocalHost:{port}", b"[::1]:{port}"):
            with self.subTest(host=host):
                status, page = self.raw(port, b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
                self.assertEqual(status, 200)
                self.assertIn(b'fetch("/chat"', page)
                status, body = self.post_raw(port, b"Host: " + host + b"\r\nContent-Type: application/json\r\n")
                self.assertEqual((status, body.count(b"data: ")), (200, 2))

    def status_via(self, address, port, host):
        """The status of GET / sent to address:port with this Host header."""
        return self.raw(port, b"GET / HTTP/1.1\r\nHost: %s\r\n\r\n" % host.encode(), address)[0]

    def test_on_every_address_the_machines_own_names_and_addresses_are_served(self):
        server = self.serve(sse(delta("x", "stop")))
        port = self.start_relay(server, "--host", "0.0.0.0")
        reached = [("127.0.0.1", name) for name in ("127.0.0.1", "localhost", "0.0.0.0", socket.gethostname())]
        try:  # an address of this machine other than loopback, when it has one
            outer = socket.gethostbyname(socket.gethostname())
        except OSError:
            outer = "127.0.0.1"
        if not outer.startswith("127."):
            reached.append((outer, outer))
        for address, name in reached:
            with self.subTest(address=address, name=name):
                self.assertEqual(self.status_via(address, port, "%s:%d" % (name, port)), 200)
        for host in ("evil.example:%d" % port, "127.0.0.1.nip.io:%d" % port, "127.0.0.1"):
            with self.subTest(host=host):
                self.assertEqual(self.status_via("127.0.0.1", port, host), 421)

    def test_a_request_that_never_finishes_arriving_does_not_hold_the_server(self):
        server = self.serve(sse(delta("x", "stop")))
        port = self.start_relay(server, "--request-timeout", "1")
        requests = {b"HTTP/1.0 408": b"POST /chat HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type:"
                                      b" application/json\r\nContent-Length: 100\r\n\r\n{\"mess" % port,
                    b"": b"POST /chat HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n" % port}  # headers cut short
        for expected, request in requests.items():
            with self.subTest(expected=expected):
                reply = self.exchange(port, request)  # and nothing more: the relay gives up, and closes
                self.assertTrue(reply.startswith(expected), reply)
        status, body = self.post_raw(port, b"Host: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n")
        self.assertEqual((status, body.count(b"data: ")), (200, 2))
        self.assertEqual(len(server.requests), 1)

    def test_cross_site_requests_are_refused(self):
        server = self.serve(sse(delta("x", "stop")))
        port = self.start_relay(server)
        other = b"http://127.0.0.1:%d" % (port + 1 if port < 65535 else port - 1)
        for headers in (b"Origin: http://evil.example\r\n", b"Origin: " + other + b"\r\n",
                        b"Origin: null\r\n", b"Origin: http://localhost:{port}\r\n",
                        b"Origin: https://127.0.0.1:{port}\r\n", b"Sec-Fetch-Site: cross-site\r\n",
                        b"Sec-Fetch-Site: same-site\r\n",
                        b"Origin: http://127.0.0.1:{port}\r\nSec-Fetch-Site: same-site\r\n"):
            with self.subTest(headers=headers):
                host = b"Host: 127.0.0.1:{port}\r\n"
                self.assertEqual(self.raw(port, b"GET / HTTP/1.1\r\n" + host + headers + b"\r\n")[0], 403)
                self.assertEqual(self.post_raw(port, host + headers + b"Content-Type: application/json\r\n")[0],
                                 403)
        self.assertEqual(server.requests, [])
        for host, headers in ((b"127.0.0.1", b"Origin: http://127.0.0.1:{port}\r\nSec-Fetch-Site: same-origin\r\n"),
                              (b"localhost", b"Origin: http://localhost:{port}\r\n"),
                              (b"127.0.0.1", b"Sec-Fetch-Site: none\r\n")):
            with self.subTest(host=host, headers=headers):
                status, body = self.post_raw(port, b"Host: " + host + b":{port}\r\n" + headers
                                             + b"Content-Type: application/json\r\n")
                self.assertEqual((status, body.count(b"data: ")), (200, 2))

    def test_several_pages_at_once(self):
        all_in, apart = threading.Barrier(5), []

        def meet():  # no reply goes on before every page's request is in: they overlap
            try:
                all_in.wait(WAIT)
            except threading.BrokenBarrierError:
                apart.append(True)
        server = self.serve(lambda request: sse(delta("reply to "), meet,
                                                delta(request.json()["messages"][-1]["content"], "stop")))
        port = self.start_relay(server)
        results = {}

        def page(number):
            events = self.events(self.post(port, [{"role": "user", "content": "page %d" % number}]))
            results[number] = "".join(e["content"] for e in events if isinstance(e, dict))

        threads = [threading.Thread(target=page, args=(n,), daemon=True) for n in range(5)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(2 * WAIT)
        self.assertEqual(results, {n: "reply to page %d" % n for n in range(5)})
        self.assertEqual(apart, [])

    def test_a_page_closed_mid_reply_does_not_break_the_server(self):
        gone = threading.Event()  # the rest of the reply comes once the tab has gone
        more = [step for n in range(40) for step in (0.05, delta("more "))]
        server = self.serve(sse(delta("one "), lambda: gone.wait(WAIT), *more),
                            sse(delta("next page", "stop")))
        self.addCleanup(gone.set)  # before the server closes
        port = self.start_relay(server)
        reply = self.post(port, [{"role": "user", "content": "long"}])
        self.assertEqual(next(self.events(reply)), {"content": "one "})
        reply.close()  # the tab goes away
        gone.set()
        self.relay_says(b"reply ended: writing the reply failed")  # relay.py saw it go
        events = list(self.events(self.post(port, [{"role": "user", "content": "again"}])))
        self.assertEqual(events, [{"content": "next page"}, "[DONE]"])
        self.assertIsNone(self.relay.poll())


# ---------------------------------------------------------------- every example


NAMES = sorted(name for name in os.listdir(EXAMPLES) if name.endswith(".py"))
INSTALLED_LLM = "raise SystemExit('an installed llm was imported, not the checkout llm.py')\n"


class ImportTest(ExampleCase):
    def installed_llm(self):
        """A folder holding another package named llm (as simonw's llm is), for PYTHONPATH."""
        site = os.path.join(self.directory, "site-packages")
        os.makedirs(os.path.join(site, "llm"))
        with open(os.path.join(site, "llm", "__init__.py"), "w") as f:
            f.write(INSTALLED_LLM)
        return site

    def test_from_a_checkout_the_examples_use_its_llm_py_before_an_installed_llm(self):
        env = {"PYTHONPATH": self.installed_llm()}
        for name in NAMES:
            with self.subTest(name):
                result = self.run_example(name, "--help", env=env)
                self.assertEqual((result.status, result.err), (0, ""))
                self.assertIn("usage:", result.out)
        server = self.serve(answer(message('{"a": 1}')))
        result = self.run_example("json_reply.py", "--base-url", server.url, "Hi", env=env)
        self.assertEqual((result.status, json.loads(result.out)), (0, {"a": 1}))

    def test_a_copy_beside_llm_py_uses_that_llm_py(self):
        shutil.copy(os.path.join(EXAMPLES, "json_reply.py"), self.directory)
        shutil.copy(os.path.join(ROOT, "llm.py"), self.directory)
        server = self.serve(answer(message('{"b": 2}')))
        result = run([sys.executable, os.path.join(self.directory, "json_reply.py"), "--base-url",
                      server.url, "Hi"], b"", environment(PYTHONPATH=self.installed_llm()))
        self.assertEqual((result.status, json.loads(result.out)), (0, {"b": 2}))


class CleanErrorTest(ExampleCase):
    """Each mistake in the setup is one line on stderr and a non-zero status, never a traceback."""

    def assert_one_line(self, result, status, text):
        self.assertEqual(result.status, status)
        self.assertTrue(result.err.startswith("error: ") and result.err.count("\n") == 1, result.err)
        self.assertIn(text, result.err)

    def test_json_reply_with_a_missing_or_malformed_schema(self):
        server = self.serve(answer(message("{}")))
        bad = os.path.join(self.directory, "bad.json")
        with open(bad, "w") as f:
            f.write('{"type": "object",')
        for schema, text in (("missing.schema.json", "cannot read the schema missing.schema.json"),
                             (bad, "cannot read the schema %s: " % bad),  # the JSON error's words vary
                             (self.directory, "cannot read the schema")):
            with self.subTest(schema):
                result = self.run_example("json_reply.py", "--base-url", server.url, "--schema",
                                          schema, "Hi")
                self.assert_one_line(result, 2, text)
        with open(bad, "w") as f:
            f.write("[1, 2]")
        result = self.run_example("json_reply.py", "--base-url", server.url, "--schema", bad, "Hi")
        self.assert_one_line(result, 2, "is not a JSON object")
        self.assertEqual(server.requests, [])

    def test_the_schema_the_usage_names_is_shipped_and_sent(self):
        with open(os.path.join(EXAMPLES, "json_reply.py"), encoding="utf-8") as f:
            usage = f.read().split('"""')[1]
        with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
            readme = f.read()
        named = set(re.findall(r"[\w.-]+\.schema\.json", usage + readme))
        self.assertEqual(named, {"greeting.schema.json"})
        path = os.path.join(EXAMPLES, "greeting.schema.json")
        with open(path, encoding="utf-8") as f:
            schema = json.load(f)
        server = self.serve(answer(message('{"greeting": "Hello", "count": 1}')))
        result = self.run_example("json_reply.py", "--base-url", server.url, "--schema", path, "Greet me")
        self.assertEqual(json.loads(result.out), {"greeting": "Hello", "count": 1})
        self.assertEqual(server.requests[0].json()["response_format"]["json_schema"]["schema"], schema)

    def test_summarise_a_missing_file_or_a_folder(self):
        result = self.run_example("summarise.py", "missing.txt")
        self.assert_one_line(result, 1, "cannot read missing.txt: No such file or directory")
        result = self.run_example("summarise.py", self.directory)
        self.assert_one_line(result, 1, "cannot read %s" % self.directory)

    def test_chatbot_forgetting_an_unknown_conversation_and_a_database_it_cannot_open(self):
        server = self.serve(sse(delta("ok", "stop")))
        self.run_example("chatbot.py", "--base-url", server.url, "--id", "kept", stdin=b"Hi\n")
        result = self.run_example("chatbot.py", "--id", "nope", "--forget")
        self.assert_one_line(result, 1, "there is no conversation 'nope' in chat.db (--list shows them)")
        self.assertEqual(self.run_example("chatbot.py", "--id", "kept", "--forget").status, 0)
        result = self.run_example("chatbot.py", "--db", os.path.join("no", "such", "folder.db"), "--list")
        self.assert_one_line(result, 1, "cannot open the database")
        with open(os.path.join(self.directory, "text.db"), "w") as f:
            f.write("this is not a database, " * 100)
        result = self.run_example("chatbot.py", "--db", "text.db", "--list")
        self.assert_one_line(result, 1, "cannot open the database text.db")

    def test_compare_with_an_unset_key_variable(self):
        server = self.serve(sse(delta("ok", "stop")))
        result = self.run_example("compare.py", "Hi", "-b", server.url, "m", "-b", server.url, "m",
                                  "NO_SUCH_KEY_VARIABLE")
        self.assert_one_line(result, 2, "NO_SUCH_KEY_VARIABLE is not set: it should hold the API"
                                        " key for %s" % server.url)
        self.assertEqual(server.requests, [])

    def test_relay_on_a_port_that_is_taken(self):
        taken = socket.socket()
        self.addCleanup(taken.close)
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        result = self.run_example("relay.py", "--port", str(taken.getsockname()[1]))
        self.assert_one_line(result, 1, "cannot serve on 127.0.0.1:%d" % taken.getsockname()[1])


if __name__ == "__main__":
    unittest.main()
