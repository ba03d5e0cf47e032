"""Summarise a file too long for one request: summarise its parts, then merge them.

Usage:
    python summarise.py report.txt
    python summarise.py report.txt --chunk-chars 4000 --words 150 --parallel 4
    journalctl -b | python summarise.py -

The text is cut into parts of at most --chunk-chars characters (at blank
lines where it can, then at line ends), each part is summarised, and the
summaries are merged into one, which streams to stdout. When the summaries
together are still too long for one request, they are summarised again in
groups first. About four characters make a token in English: keep
--chunk-chars well under the model's context. The server is --base-url and
--model, or LLM_BASE_URL and LLM_MODEL (an API key: LLM_API_KEY or
OPENAI_API_KEY).
"""

import argparse
import os
import sys
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
for folder in (HERE, os.path.join(HERE, os.pardir)):  # a copy beside this file, else the
    if os.path.isfile(os.path.join(folder, "llm.py")):  # checkout's: before any installed llm
        sys.path.insert(0, folder)
        break
import llm  # noqa: E402

SYSTEM = "You summarise documents faithfully and concisely. Keep names, numbers and decisions."
MAX_ROUNDS = 4  # of summarising summaries, before the merge


class Failed(Exception):
    pass


def split(text, limit):
    """Cut text into parts of at most limit characters, at paragraph or line ends."""
    parts, current = [], ""
    for piece in pieces(text, limit):
        if current and len(current) + len(piece) > limit:
            parts.append(current)
            current = ""
        current += piece
    if current.strip():
        parts.append(current)
    return parts


def pieces(text, limit):
    """Paragraphs (with their blank lines); a longer one by lines; a longer line by force."""
    for paragraph in text.replace("\r\n", "\n").split("\n\n"):
        paragraph += "\n\n"
        if len(paragraph) <= limit:
            yield paragraph
            continue
        for line in paragraph.splitlines(True):
            for start in range(0, len(line), limit):
                yield line[start:start + limit]


def summarise(client, text, instruction):
    reply = client.chat([{"role": "user", "content": "%s\n\n%s" % (instruction, text)}])
    if not reply.ok:
        raise Failed(reply.error)
    return reply.content.strip()


def summarise_parts(client, parts, name, words, parallel, what="part"):
    total = len(parts)

    def one(numbered):
        number, part = numbered
        sys.stderr.write("summarising %s %d of %d (%d characters)\n"  # one write per line:
                         % (what, number, total, len(part)))       # threads share stderr
        return summarise(client, part, "Here is %s %d of %d of %s. Summarise it in at most %d"
                         " words." % (what, number, total, name, words))

    with ThreadPoolExecutor(max_workers=parallel) as pool:
        return list(pool.map(one, enumerate(parts, 1)))


def main():
    parser = argparse.ArgumentParser(description="Summarise a long file in parts.")
    parser.add_argument("file", help="the file to summarise; - reads stdin")
    parser.add_argument("--chunk-chars", type=int, default=8000,
                        help="the most characters sent at once (default 8000)")
    parser.add_argument("--words", type=int, default=200,
                        help="about how long the summary is (default 200 words)")
    parser.add_argument("--parallel", type=int, default=1,
                        help="parts summarised at the same time (default 1); the server needs"
                        " room for that many requests at once (llama.cpp shares its context)")
    parser.add_argument("--base-url", help="the server (default: LLM_BASE_URL)")
    parser.add_argument("--model", help="the model (default: LLM_MODEL)")
    options = parser.parse_args()
    if options.chunk_chars < 100 or options.parallel < 1:
        parser.error("--chunk-chars must be at least 100 and --parallel at least 1")
    if options.file == "-":
        text, name = sys.stdin.read(), "a text"
    else:
        try:
            with open(options.file, encoding="utf-8", errors="replace") as f:
                text, name = f.read(), "the file %s" % os.path.basename(options.file)
        except OSError as error:  # missing, a folder, not readable
            print("error: cannot read %s: %s" % (options.file, error.strerror or error),
                  file=sys.stderr)
            return 1
    client = llm.Client(options.base_url, model=options.model, system=SYSTEM)
    try:
        return run(client, text, name, options)
    except Failed as failure:
        print("error: %s" % failure, file=sys.stderr)
        return 1


def run(client, text, name, options):
    limit = options.chunk_chars
    parts = split(text, limit)
    if not parts:
        print("error: %s is empty" % name, file=sys.stderr)
        return 1
    if len(parts) == 1:
        merged = parts[0]
        instruction = "Summarise %s in at most %d words." % (name, options.words)
    else:
        summaries = summarise_parts(client, parts, name, options.words, options.parallel)
        rounds = 0
        while len("\n\n".join(summaries)) > limit and len(summaries) > 1 and rounds < MAX_ROUNDS:
            groups = split("\n\n".join(summaries), limit)  # too long to merge at once
            summaries = summarise_parts(client, groups, name, options.words, options.parallel,
                                        what="group of summaries")
            rounds += 1
        merged = "\n\n".join("Part %d: %s" % (n, s) for n, s in enumerate(summaries, 1))
        instruction = ("Below are summaries of the consecutive parts of %s. Merge them into one"
                       " summary of at most %d words." % (name, options.words))
        print("merging %d summaries" % len(summaries), file=sys.stderr)
    reply = client.chat_stream([{"role": "user", "content": "%s\n\n%s" % (instruction, merged)}],
                               sys.stdout)
    print()
    if not reply.ok:
        raise Failed(reply.error)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl-C: no traceback
        sys.exit(130)
