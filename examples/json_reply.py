"""Ask for a JSON reply, parse it with json, and cope when it is not JSON.

Usage:
    python json_reply.py "Three facts about Mars, as {\\"facts\\": [...]}"
    python json_reply.py --schema greeting.schema.json "Greet me"   # the schema beside this file
    python json_reply.py --no-format "List two colours as a JSON array"

The request asks for JSON with ``response_format``: ``{"type": "json_object"}``,
or with --schema FILE a JSON schema that servers which support it enforce
(``json_schema``); --no-format leaves it out, for servers that reject it.
The reply is parsed with ``json.loads``. A model may still answer with text
around the JSON, or no JSON at all: then the JSON inside a ``` block or
between the outer braces is tried, and failing that the parse error is sent
back once, asking for JSON only (--attempts). The parsed value is printed;
exit status 1 when no JSON came. The server is --base-url and --model, or
LLM_BASE_URL and LLM_MODEL (an API key: LLM_API_KEY or OPENAI_API_KEY).
"""

import argparse
import json
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
for folder in (HERE, os.path.join(HERE, os.pardir)):  # a copy beside this file, else the
    if os.path.isfile(os.path.join(folder, "llm.py")):  # checkout's: before any installed llm
        sys.path.insert(0, folder)
        break
import llm  # noqa: E402

SYSTEM = "Reply with one JSON value and nothing else: no prose, no code fences."
FENCED = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL)


def parse(text):
    """The JSON value in text; raises json's ValueError (or RecursionError) when there is none."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as error:  # RecursionError: nested too deep
        first_error = error
    candidates = FENCED.findall(text)
    for opening, closing in (("{", "}"), ("[", "]")):
        start, end = text.find(opening), text.rfind(closing)
        if 0 <= start < end:
            candidates.append(text[start:end + 1])
    for candidate in candidates:
        try:
            value = json.loads(candidate)
        except (ValueError, RecursionError):
            continue
        print("note: the JSON came wrapped in other text; it was taken out", file=sys.stderr)
        return value
    raise first_error


class BadSchema(Exception):
    pass


def response_format(options):
    if options.no_format:
        return None
    if not options.schema:
        return {"type": "json_object"}
    try:
        with open(options.schema, encoding="utf-8") as f:
            schema = json.load(f)
    except (OSError, ValueError) as error:  # missing, unreadable, or not JSON
        raise BadSchema("cannot read the schema %s: %s" % (options.schema, error))
    if not isinstance(schema, dict):
        raise BadSchema("the schema %s is not a JSON object" % options.schema)
    return {"type": "json_schema",
            "json_schema": {"name": "reply", "schema": schema, "strict": True}}


def main():
    parser = argparse.ArgumentParser(description="Ask for JSON and parse the reply.")
    parser.add_argument("prompt")
    parser.add_argument("--schema", metavar="FILE", help="a JSON schema the reply must follow")
    parser.add_argument("--no-format", action="store_true", help="send no response_format")
    parser.add_argument("--attempts", type=int, default=2, help="requests before giving up (2)")
    parser.add_argument("--base-url", help="the server (default: LLM_BASE_URL)")
    parser.add_argument("--model", help="the model (default: LLM_MODEL)")
    options = parser.parse_args()
    client = llm.Client(options.base_url, model=options.model, system=SYSTEM)
    messages = [{"role": "user", "content": options.prompt}]
    try:
        wanted = response_format(options)
    except BadSchema as error:
        print("error: %s" % error, file=sys.stderr)
        return 2
    for attempt in range(1, max(1, options.attempts) + 1):
        reply = client.chat(messages, response_format=wanted, temperature=0)
        if not reply.ok:
            print("error: %s" % reply.error, file=sys.stderr)
            return 1
        try:
            value = parse(reply.content)
        except (ValueError, RecursionError) as error:
            print("attempt %d: the reply is not JSON (%s):\n    %r"
                  % (attempt, error, reply.content), file=sys.stderr)
            messages += [reply.to_message(), {"role": "user", "content":
                         "That was not valid JSON (%s). Reply with only the JSON." % error}]
            continue
        print(json.dumps(value, indent=2, ensure_ascii=False))
        return 0
    print("error: no JSON after %d attempts" % options.attempts, file=sys.stderr)
    return 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl-C: no traceback
        sys.exit(130)
