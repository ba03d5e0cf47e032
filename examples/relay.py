"""A small web chat: the page streams the reply as server-sent events.

Usage:
    python relay.py                          # then open http://127.0.0.1:8000
    python relay.py --port 8080 --model llama3.2 --base-url http://localhost:11434
    python relay.py --host 192.168.1.20      # reachable from other machines at that address
    python relay.py --host 0.0.0.0           # at every address and name of this machine

``GET /`` is the page. The page posts the conversation to ``POST /chat`` as
``{"messages": [...]}``, and the server relays ``client.chat_stream`` to it
through ``llm.SSEWriter``: one ``data: {"content": "..."}`` event per piece,
``data: {"error": "..."}`` when the call fails, then ``data: [DONE]``. The page
reads the stream with ``fetch`` and shows the reply as it grows. Each request
has its own thread; the one client is shared (it is thread-safe). A page
closed in the middle of a reply ends that call when the next piece cannot be
written; the server goes on serving the others. The LLM server is --base-url
and --model, or LLM_BASE_URL and LLM_MODEL (an API key: LLM_API_KEY or
OPENAI_API_KEY). Standard library only.

Any web page the user visits could post to this server and spend the key, or
read the replies by pointing a name of its own at 127.0.0.1 (DNS rebinding).
So only the server's own names are served (the address it is bound to, and
localhost for a loopback address; 421 otherwise), a request from another
origin is refused (403), and a post must be ``application/json`` (415), which
a page elsewhere cannot send without this server's consent.
"""

import argparse
import ipaddress
import json
import os
import socket
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer

try:
    from http.server import ThreadingHTTPServer
except ImportError:  # Python 3.6
    from socketserver import ThreadingMixIn

    class ThreadingHTTPServer(ThreadingMixIn, HTTPServer):
        daemon_threads = True

HERE = os.path.dirname(os.path.abspath(__file__))
for folder in (HERE, os.path.join(HERE, os.pardir)):  # a copy beside this file, else the
    if os.path.isfile(os.path.join(folder, "llm.py")):  # checkout's: before any installed llm
        sys.path.insert(0, folder)
        break
import llm  # noqa: E402

MAX_BODY = 1024 * 1024  # bytes of conversation a page may post
ROLES = ("system", "user", "assistant")

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>llm.py relay</title>
<style>
  body { font: 16px/1.5 system-ui, sans-serif; max-width: 46rem; margin: 2rem auto;
         padding: 0 1rem; }
  #log p { white-space: pre-wrap; margin: .5rem 0; padding: .5rem .75rem; border-radius: .5rem; }
  .user { background: #e8f0fe; }
  .assistant { background: #f1f3f4; }
  .error { background: #fce8e6; }
  form { display: flex; gap: .5rem; margin-top: 1rem; }
  #prompt { flex: 1; font: inherit; padding: .5rem; }
</style>
</head>
<body>
<h1>Chat</h1>
<div id="log"></div>
<form id="form">
  <input id="prompt" autocomplete="off" placeholder="Ask something" autofocus>
  <button id="send">Send</button>
  <button id="stop" type="button" disabled>Stop</button>
</form>
<script>
"use strict";
const log = document.getElementById("log"), form = document.getElementById("form");
const input = document.getElementById("prompt"), sendButton = document.getElementById("send");
const stopButton = document.getElementById("stop");
const conversation = [];
let controller = null;

function say(role, text) {
  const p = document.createElement("p");
  p.className = role;
  p.textContent = text;
  log.appendChild(p);
  return p;
}

// Calls onEvent with each event's parsed data; the stream ends at [DONE].
async function readEvents(response, onEvent) {
  const reader = response.body.getReader(), decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, {stream: true});
    let end;
    while ((end = buffer.indexOf("\\n\\n")) >= 0) {
      const frame = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = frame.split("\\n").filter(l => l.startsWith("data:"))
                        .map(l => l.slice(5).replace(/^ /, "")).join("\\n");
      if (data === "[DONE]") return;
      if (data) onEvent(JSON.parse(data));
    }
  }
}

form.addEventListener("submit", async (event) => {
  event.preventDefault();
  const text = input.value.trim();
  if (!text || controller) return;
  input.value = "";
  say("user", text);
  conversation.push({role: "user", content: text});
  const reply = say("assistant", "");
  let content = "", failed = "";
  controller = new AbortController();
  sendButton.disabled = true;
  stopButton.disabled = false;
  try {
    const response = await fetch("/chat", {
      method: "POST", headers: {"Content-Type": "application/json"},
      body: JSON.stringify({messages: conversation}), signal: controller.signal});
    if (!response.ok) throw new Error("HTTP " + response.status + ": " + await response.text());
    await readEvents(response, (data) => {
      if (data.content) { content += data.content; reply.textContent = content; }
      if (data.error) failed = data.error;
    });
  } catch (error) {
    if (error.name !== "AbortError") failed = String(error.message || error);
  }
  if (failed) say("error", failed);
  if (content) conversation.push({role: "assistant", content: content});
  else conversation.pop();  // nothing came: the question can be asked again
  controller = null;
  sendButton.disabled = false;
  stopButton.disabled = true;
  input.focus();
});

stopButton.addEventListener("click", () => controller && controller.abort());
</script>
</body>
</html>
"""


def served_hosts(address, port):
    """The Host headers this server answers to: its address, and localhost names on loopback.

    Bound to every address (0.0.0.0 or ::), it also answers to the machine's own
    names; and to the address each request reached (see Relay.refused).
    """
    names = ["[%s]" % address if ":" in address else address]
    if ipaddress.ip_address(address).is_loopback:
        names += ["localhost", "127.0.0.1", "[::1]"]
    if ipaddress.ip_address(address).is_unspecified:
        names += ["localhost", socket.gethostname().lower(), socket.getfqdn().lower()]
    return {"%s:%d" % (name, port) for name in names} | (set(names) if port == 80 else set())


class Relay(BaseHTTPRequestHandler):
    client = None  # the llm.Client, set by main()
    hosts = set()  # served_hosts(), set by main()
    everywhere = False  # bound to every address of the machine
    timeout = 30  # seconds a page may take to send a request: a slow one cannot hold a thread
    server_version = "relay.py"

    def refused(self):
        """Refuse a request for another host or from another site; True when refused."""
        host = self.headers.get("Host", "").lower()
        hosts = self.hosts
        if self.everywhere:  # the address this request reached is one of the machine's own
            hosts = hosts | served_hosts(self.connection.getsockname()[0], self.server.server_address[1])
        if host not in hosts:
            self.send_error(421, "not a name of this server")
        elif (self.headers.get("Origin", "http://" + host) != "http://" + host
              or self.headers.get("Sec-Fetch-Site", "none") not in ("same-origin", "none")):
            self.send_error(403, "cross-site requests are refused")
        else:
            return False
        return True

    def do_GET(self):
        if self.refused():
            return
        if self.path.split("?")[0] != "/":
            return self.send_error(404)
        body = PAGE.encode("utf-8")
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        if self.refused():
            return
        if self.path != "/chat":
            return self.send_error(404)
        if self.headers.get_content_type() != "application/json":
            return self.send_error(415, "post JSON (Content-Type: application/json)")
        try:
            messages = self.read_messages()
        except OSError:  # the body did not come in time
            return self.send_error(408, "the request took too long to arrive")
        if messages is None:
            return self.send_error(400, 'expected {"messages": [{"role": ..., "content": ...}]}')
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("X-Accel-Buffering", "no")  # tell nginx, if it is in front, not to buffer
        self.end_headers()  # HTTP/1.0: the stream ends when the connection closes
        reply = self.client.chat_stream(messages, llm.SSEWriter(self.wfile))
        if not reply.ok:
            self.log_message("reply ended: %s", reply.error)

    def read_messages(self):
        """The posted conversation, checked; None when it is not one."""
        try:
            length = int(self.headers.get("Content-Length", "0"))
            if not 0 < length <= MAX_BODY:
                return None
            messages = json.loads(self.rfile.read(length).decode("utf-8")).get("messages")
        except (ValueError, AttributeError, RecursionError):  # RecursionError: nested too deep
            return None
        if not isinstance(messages, list) or not messages:
            return None
        for message in messages:
            if (not isinstance(message, dict) or message.get("role") not in ROLES
                    or not isinstance(message.get("content"), str)):
                return None
        return [{"role": m["role"], "content": m["content"]} for m in messages]


def main():
    parser = argparse.ArgumentParser(description="A web page that streams replies.")
    parser.add_argument("--host", default="127.0.0.1", help="the address to serve on")
    parser.add_argument("--port", type=int, default=8000, help="the port (0: any free one)")
    parser.add_argument("--base-url", help="the LLM server (default: LLM_BASE_URL)")
    parser.add_argument("--model", help="the model (default: LLM_MODEL)")
    parser.add_argument("--system", help="a system prompt")
    parser.add_argument("--request-timeout", type=float, default=30, metavar="SECONDS",
                        help="how long a page may take to send its request, or to take a"
                        " piece of the reply (default 30)")
    options = parser.parse_args()
    Relay.timeout = options.request_timeout
    Relay.client = llm.Client(options.base_url, model=options.model, system=options.system)
    try:
        server = ThreadingHTTPServer((options.host, options.port), Relay)
    except OSError as error:  # the port is taken, or the address is not this machine's
        print("error: cannot serve on %s:%d: %s" % (options.host, options.port,
                                                   error.strerror or error), file=sys.stderr)
        return 1
    server.daemon_threads = True
    host, port = server.server_address[:2]
    Relay.hosts = served_hosts(host, port)
    Relay.everywhere = ipaddress.ip_address(host).is_unspecified
    print("serving http://%s:%d/ (relaying to %s)" % (host, port, Relay.client.base_url),
          file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl-C: no traceback
        sys.exit(130)
