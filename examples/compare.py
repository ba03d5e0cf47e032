"""One prompt to several backends at once; the answers side by side.

Usage:
    python compare.py "Why is the sky blue?" \\
        --backend http://localhost:11434 llama3.2 \\
        --backend http://localhost:8080 qwen2.5 \\
        --backend https://api.groq.com/openai/v1 llama-3.1-8b-instant GROQ_API_KEY

Each --backend is a URL and a model, and optionally the name of the environment
variable that holds its API key (keys stay out of the process list). With no
--backend, the one backend of LLM_BASE_URL, LLM_MODEL and LLM_API_KEY is asked.
Each backend is asked in its own thread; each column ends with its time to the
first token, its total time and its tokens. A backend that fails shows its
error in its column; the others still answer.
"""

import argparse
import os
import shutil
import sys
import textwrap
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
for folder in (HERE, os.path.join(HERE, os.pardir)):  # a copy beside this file, else the
    if os.path.isfile(os.path.join(folder, "llm.py")):  # checkout's: before any installed llm
        sys.path.insert(0, folder)
        break
import llm  # noqa: E402

PRINTING = threading.Lock()  # one progress line at a time


class Backend:
    def __init__(self, url, model, key_variable=None):
        self.url, self.model = url, model
        self.key = os.environ.get(key_variable, "") if key_variable else None
        self.reply, self.first, self.seconds = None, None, 0.0

    def title(self):
        return "%s @ %s" % (self.model or "(default model)", self.url or "(environment)")

    def ask(self, messages, timeout):
        """Stream the reply, noting when the first piece came; keep the whole Response."""
        client = llm.Client(self.url, model=self.model, api_key=self.key, timeout=timeout)
        self.url, self.model = client.base_url, client.model  # as read from the environment
        started = time.monotonic()
        backend = self

        class FirstPiece:
            def write(self, text):
                if backend.first is None:
                    backend.first = time.monotonic() - started

        self.reply = client.chat_stream(messages, FirstPiece())
        self.seconds = time.monotonic() - started
        client.close()
        with PRINTING:
            print("%s: %s after %.2f s" % (self.title(), "answered" if self.reply.ok else "failed",
                                          self.seconds), file=sys.stderr)

    def footer(self):
        reply = self.reply
        if not reply.ok:
            return "error: %s" % reply.error
        lines = ["%.2f s" % self.seconds]
        if self.first is not None:
            lines[0] += " (first token %.2f s)" % self.first
        tokens = (reply.usage or {}).get("completion_tokens")
        if isinstance(tokens, int):
            lines.append("%d tokens, %.1f tokens/s" % (tokens, tokens / max(self.seconds, 1e-6)))
        if reply.stop_reason != "stop":
            lines.append("stopped: %s" % reply.stop_reason)
        return "\n".join(lines)


def ask_all(backends, prompt, timeout):
    messages = [{"role": "user", "content": prompt}]
    threads = [threading.Thread(target=backend.ask, args=(messages, timeout), daemon=True)
               for backend in backends]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def wrap(text, width):
    lines = []
    for paragraph in text.splitlines() or [""]:
        lines.extend(textwrap.wrap(paragraph, width) or [""])
    return lines


def side_by_side(backends, total_width):
    """A table: the titles, a rule, the answers, a rule, the times and tokens."""
    gap = " | "
    width = max(20, (total_width - len(gap) * (len(backends) - 1)) // len(backends))
    sections = [[wrap(backend.title(), width) for backend in backends],
                [wrap(backend.reply.content, width) for backend in backends],
                [wrap(backend.footer(), width) for backend in backends]]
    rows = []
    for number, section in enumerate(sections):
        if number:
            rows.append(gap.join(["-" * width] * len(backends)))
        for row in range(max(len(cell) for cell in section)):
            line = [(cell[row] if row < len(cell) else "").ljust(width) for cell in section]
            rows.append(gap.join(line).rstrip())
    return "\n".join(rows)


def main():
    parser = argparse.ArgumentParser(description="One prompt to several backends, side by side.")
    parser.add_argument("prompt")
    parser.add_argument("--backend", "-b", action="append", nargs="+",
                        metavar="URL MODEL [KEY_VARIABLE]", help="a backend to ask (repeat it)")
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="seconds to wait for each backend's next piece (default 120)")
    parser.add_argument("--width", type=int, default=shutil.get_terminal_size().columns,
                        help="the width of the table (default: the terminal's)")
    options = parser.parse_args()
    for spec in options.backend or []:
        if not 2 <= len(spec) <= 3:
            parser.error("--backend takes a URL, a model and maybe a key variable, got %r" % spec)
    for spec in options.backend or []:
        if len(spec) == 3 and not os.environ.get(spec[2]):
            print("error: %s is not set: it should hold the API key for %s"
                  % (spec[2], spec[0]), file=sys.stderr)
            return 2
    backends = [Backend(*spec) for spec in options.backend or []] or [Backend(None, None)]
    ask_all(backends, options.prompt, options.timeout)
    print(side_by_side(backends, options.width))
    return 0 if any(backend.reply.ok for backend in backends) else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl-C: no traceback
        sys.exit(130)
