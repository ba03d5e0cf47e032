"""The README's Python snippets run as written: ``python -m unittest tests.test_readme``.

Each fenced ``python`` block of README.md runs in its own interpreter, from
the checkout's root (so ``import llm`` is this checkout's), with every URL in it
pointed at a loopback server from tests/loopback.py that answers as a model
would: streamed text, whole replies with log-probabilities and a request id,
and one tool call when tools are offered.
"""

import os
import re
import sys
import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as a file: this checkout's llm.py and tests
    sys.path.insert(0, ROOT)

from tests.loopback import LoopbackCase, answer, delta, message, sse
from tests.test_cli import environment, run

URL = re.compile(r'"https?://[^"\s]+"')


def snippets():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        return re.findall(r"^```python\n(.*?)^```$", f.read(), re.M | re.S)


def model(request):
    """Answer as a model would: a tool call when tools are offered and none ran yet."""
    body = request.json()
    words = sum(len(str(message.get("content") or "").split()) for message in body["messages"])
    usage = {"prompt_tokens": 9 + words, "completion_tokens": 3, "total_tokens": 12 + words}
    if len(body["messages"]) > 4:  # a small context: llama.cpp's own answer when it is full
        return answer({"error": {"code": 400, "message": "request (5000 tokens) exceeds the available"
                                 " context size (4096 tokens), try increasing it",
                                 "type": "exceed_context_size_error", "n_prompt_tokens": 5000,
                                 "n_ctx": 4096}}, 400)
    if body.get("stream"):
        return sse(delta("2, 3 "), delta("and 5.", "stop"), {"choices": [], "usage": usage})
    if body.get("tools") and body["messages"][-1]["role"] != "tool":
        call = {"id": "call_1", "type": "function",
                "function": {"name": "add", "arguments": '{"a": 2, "b": 40}'}}
        return answer(message(None, "tool_calls", tool_calls=[call]))
    reply = message("42", usage=usage)
    reply["choices"][0]["logprobs"] = {"content": [
        {"token": "42", "logprob": -0.01, "bytes": [52, 50], "top_logprobs": []}]}
    return answer(reply, extra="X-Request-Id: req-123")


class ReadmeSnippetTest(LoopbackCase):
    def test_there_are_snippets(self):
        self.assertGreaterEqual(len(snippets()), 4)

    def test_every_python_snippet_runs_against_a_loopback_server(self):
        server = self.serve(model)
        for number, code in enumerate(snippets(), 1):
            with self.subTest(snippet=number, first_line=code.splitlines()[0]):
                asked = len(server.requests)
                code = URL.sub('"%s"' % server.url, code)
                result = run([sys.executable, "-c", code],
                             env=environment(GROQ_API_KEY="gsk-test"), cwd=ROOT)
                self.assertEqual((result.status, result.err), (0, ""), code)
                self.assertGreater(len(server.requests), asked, "it asked no server")
                self.assertNotIn("fail", result.out)
                self.assertNotIn("error", result.out)

    def test_the_tool_loop_runs_the_tool_and_the_speed_snippet_prints_what_came(self):
        server = self.serve(model)
        outputs = {}
        for code in snippets():
            if "run_tool" in code or "logprobs" in code:
                result = run([sys.executable, "-c", URL.sub('"%s"' % server.url, code)], cwd=ROOT)
                outputs["tool" if "run_tool" in code else "speed"] = result.out
        self.assertEqual(outputs["tool"], "42\n")
        self.assertEqual(server.requests[1].json()["messages"][-1],
                         {"role": "tool", "content": "42", "tool_call_id": "call_1"})
        self.assertRegex(outputs["speed"], r"^first token after [0-9.e-]+ s, [0-9.]+ s in all,"
                                           r" 3 tokens\nrequest id: req-123\n'42' -0.01\n$")

    def test_the_history_trimming_loop_forgets_the_oldest_turn_when_the_context_is_full(self):
        server = self.serve(model)
        code = [code for code in snippets() if "context_overflow" in code][0]
        result = run([sys.executable, "-c", URL.sub('"%s"' % server.url, code)], cwd=ROOT)
        self.assertEqual((result.out, result.err), ("42\n42\n42\n", ""))
        sent = [[m["content"] for m in request.json()["messages"][1:]] for request in server.requests]
        self.assertEqual(sent, [["What is 2 + 2?"], ["What is 2 + 2?", "42", "And times 10?"],
                                ["What is 2 + 2?", "42", "And times 10?", "42", "And minus 1?"],
                                ["And times 10?", "42", "And minus 1?"]])


if __name__ == "__main__":
    unittest.main()
