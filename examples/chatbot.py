"""A terminal chat whose history lives in SQLite, one conversation per id.

Usage:
    python chatbot.py                      # the conversation "default", in chat.db
    python chatbot.py --id trip-to-rome    # another conversation; run it again to resume
    python chatbot.py --list               # the conversations in the database
    python chatbot.py --id trip-to-rome --forget

The server is --base-url and --model, or LLM_BASE_URL and LLM_MODEL (an API key
comes from LLM_API_KEY or OPENAI_API_KEY). Type /exit or Ctrl-D to leave;
lines can also be piped in, one message per line.
"""

import argparse
import json
import os
import sqlite3
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
for folder in (HERE, os.path.join(HERE, os.pardir)):  # a copy beside this file, else the
    if os.path.isfile(os.path.join(folder, "llm.py")):  # checkout's: before any installed llm
        sys.path.insert(0, folder)
        break
import llm  # noqa: E402

SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    conversation TEXT NOT NULL,
    position INTEGER NOT NULL,
    message TEXT NOT NULL,          -- the message as JSON, in the wire shape
    created REAL NOT NULL,
    PRIMARY KEY (conversation, position)
)
"""


def open_database(path):
    database = sqlite3.connect(path)
    try:
        database.execute(SCHEMA)
    except BaseException:  # a file that is no database: close it before saying so
        database.close()
        raise
    return database


def load(database, conversation):
    rows = database.execute(
        "SELECT message FROM messages WHERE conversation = ? ORDER BY position", (conversation,))
    return [json.loads(text) for (text,) in rows]


def save(database, conversation, start, messages):
    """Add messages at positions start, start + 1, ... in one transaction."""
    with database:
        database.executemany(
            "INSERT INTO messages (conversation, position, message, created) VALUES (?, ?, ?, ?)",
            [(conversation, start + number, json.dumps(message), time.time())
             for number, message in enumerate(messages)])


def list_conversations(database):
    rows = database.execute("SELECT conversation, COUNT(*), MAX(created) FROM messages"
                            " GROUP BY conversation ORDER BY MAX(created) DESC")
    for conversation, count, last in rows:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(last))
        print("%-24s %4d messages, last %s" % (conversation, count, when))


def chat(client, database, conversation):
    history = load(database, conversation)
    if history:
        print("(resuming %r: %d messages; the last: %s)" % (
            conversation, len(history), preview(history[-1])), file=sys.stderr)
    for line in typed_lines():
        if line.strip() == "/exit":
            return 0
        if not line.strip():
            continue
        question = {"role": "user", "content": line.strip()}
        print("bot> ", end="", flush=True)
        reply = client.chat_stream(history + [question], sys.stdout)
        print()
        if not reply.ok:  # the turn is not kept: send it again when the server is back
            print("error: %s" % reply.error, file=sys.stderr)
            continue
        answer = {"role": "assistant", "content": reply.content}
        save(database, conversation, len(history), [question, answer])
        history += [question, answer]
    return 0


def typed_lines():
    """The user's messages: typed at a prompt, or piped in one per line."""
    if not sys.stdin.isatty():
        for line in sys.stdin:
            yield line
        return
    try:
        import readline  # noqa: F401  (line editing for input(), where there is one)
    except ImportError:
        pass
    while True:
        try:
            yield input("you> ")
        except EOFError:  # Ctrl-D
            print()
            return


def preview(message):
    text = " ".join(str(message.get("content") or "").split())
    return text if len(text) <= 60 else text[:57] + "..."


def main():
    parser = argparse.ArgumentParser(description="A chat whose history is kept in SQLite.")
    parser.add_argument("--id", default="default", help="the conversation (default: default)")
    parser.add_argument("--db", default="chat.db", help="the SQLite file (default: chat.db)")
    parser.add_argument("--list", action="store_true", help="list the conversations")
    parser.add_argument("--forget", action="store_true", help="delete the conversation")
    parser.add_argument("--base-url", help="the server (default: LLM_BASE_URL)")
    parser.add_argument("--model", help="the model (default: LLM_MODEL)")
    parser.add_argument("--system", help="a system prompt, not stored with the history")
    options = parser.parse_args()
    try:
        database = open_database(options.db)
    except sqlite3.Error as error:  # a folder that does not exist, a file that is no database
        print("error: cannot open the database %s: %s" % (options.db, error), file=sys.stderr)
        return 1
    try:
        return run(options, database)
    finally:
        database.close()


def run(options, database):
    """List, forget or chat, as the options say, with the database open."""
    if options.list:
        list_conversations(database)
        return 0
    if options.forget:
        with database:
            deleted = database.execute("DELETE FROM messages WHERE conversation = ?",
                                       (options.id,)).rowcount
        if not deleted:
            print("error: there is no conversation %r in %s (--list shows them)"
                  % (options.id, options.db), file=sys.stderr)
            return 1
        return 0
    client = llm.Client(options.base_url, model=options.model, system=options.system)
    try:
        return chat(client, database, options.id)
    except KeyboardInterrupt:
        print()
        return 130


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl-C: no traceback
        sys.exit(130)
