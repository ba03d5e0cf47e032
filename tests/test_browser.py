"""examples/relay.py in a real browser: headless Chromium, driven over the DevTools protocol.

Run with ``python -m unittest tests.test_browser``. It is skipped when
/usr/bin/chromium is absent (a failure instead when LLM_BROWSER_REQUIRED is
set). The test starts a loopback LLM server (from tests/loopback.py) that sends its
reply in pieces with pauses, relay.py on a free port, and Chromium with
``--remote-debugging-port``, spoken to through a minimal WebSocket client
written here (standard library only). It types a prompt into the page,
records what the page shows over time, and checks that the reply grew in
pieces, in order; it closes a tab in the middle of a reply and checks that
the server goes on serving the other tabs. A page on another loopback origin
(another port) tries to post to the relay with fetch and with a form, and a
name that Chromium resolves to 127.0.0.1 (as DNS rebinding would) tries to
use it as its own: the relay refuses them all, and its own page still
works. A screenshot taken during the
run is written to a temporary directory and its path printed; the checks
are on the page's text, not on pixels. All traffic is to 127.0.0.1, and
every wait is bounded.
"""

import base64
import hashlib
import http.client
import json
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as a file: this checkout's llm.py and tests
    sys.path.insert(0, ROOT)

from tests.loopback import Server, answer, delta, sse, wait_until

RELAY = os.path.join(ROOT, "examples", "relay.py")
CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-extensions", "--window-size=900,700", "--remote-debugging-address=127.0.0.1",
         "--remote-debugging-port=0",
         "--host-resolver-rules=MAP rebound.test 127.0.0.1"]  # a name rebound to loopback
WAIT = 30  # seconds: the longest any one step may take
PIECES = ["The sky ", "looks blue ", "because air ", "scatters ", "blue light ", "more than ",
          "red light."]
STORY = ["Once upon a time "] + ["and then more "] * 100
ELSEWHERE = (b'<!doctype html><title>elsewhere</title><iframe name="sink"></iframe>'
             b'<form method="post" enctype="text/plain" target="sink"><input name="x"></form>')


# ---------------------------------------------------------------- a minimal WebSocket client (RFC 6455)


class WebSocket:
    """Text messages over one WebSocket connection; enough for the DevTools protocol."""

    GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

    def __init__(self, url, timeout=WAIT):
        assert url.startswith("ws://127.0.0.1:"), url  # loopback only
        address, _, path = url[len("ws://"):].partition("/")
        host, port = address.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=timeout)
        key = base64.b64encode(os.urandom(16))
        self.sock.sendall(b"GET /" + path.encode() + b" HTTP/1.1\r\nHost: " + address.encode()
                          + b"\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: "
                          + key + b"\r\nSec-WebSocket-Version: 13\r\n\r\n")
        head = b""
        while b"\r\n\r\n" not in head:
            data = self.sock.recv(4096)
            if not data or len(head) > 65536:
                raise ConnectionError("no WebSocket handshake: %r" % head)
            head += data
        head, self.buffer = head.split(b"\r\n\r\n", 1)
        accept = base64.b64encode(hashlib.sha1(key + self.GUID).digest())
        if not head.startswith(b"HTTP/1.1 101") or accept not in head:
            raise ConnectionError("WebSocket handshake refused: %r" % head)

    def send(self, text):
        payload = text.encode("utf-8")
        mask = os.urandom(4)
        size = len(payload)
        if size < 126:
            header = struct.pack("!BB", 0x81, 0x80 | size)
        elif size < 65536:
            header = struct.pack("!BBH", 0x81, 0x80 | 126, size)
        else:
            header = struct.pack("!BBQ", 0x81, 0x80 | 127, size)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(header + mask + masked)

    def receive(self):
        """The next whole text message (fragments joined; pings answered)."""
        parts = []
        while True:
            first, second = self._read(2)
            opcode, size = first & 0x0F, second & 0x7F
            if size == 126:
                size = struct.unpack("!H", self._read(2))[0]
            elif size == 127:
                size = struct.unpack("!Q", self._read(8))[0]
            mask = self._read(4) if second & 0x80 else None
            payload = self._read(size)
            if mask:
                payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
            if opcode == 0x8:
                raise ConnectionError("the browser closed the WebSocket")
            if opcode == 0x9:  # ping
                self.sock.sendall(struct.pack("!BB", 0x8A, 0x80 | len(payload)) + b"\0\0\0\0" + payload)
                continue
            if opcode in (0x0, 0x1, 0x2):
                parts.append(payload)
                if first & 0x80:  # FIN
                    return b"".join(parts).decode("utf-8")

    def _read(self, size):
        while len(self.buffer) < size:
            data = self.sock.recv(max(65536, size - len(self.buffer)))
            if not data:
                raise ConnectionError("the WebSocket connection ended")
            self.buffer += data
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data

    def close(self):
        try:
            self.sock.sendall(struct.pack("!BB", 0x88, 0x80) + b"\0\0\0\0")
        except OSError:
            pass
        self.sock.close()


class Tab:
    """One page target, driven with DevTools protocol commands."""

    def __init__(self, target):
        self.id = target["id"]
        self.socket = WebSocket(target["webSocketDebuggerUrl"])
        self.next_id = 0

    def call(self, method, **params):
        self.next_id += 1
        self.socket.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        for _ in range(100000):  # events come in between; they are not needed here
            reply = json.loads(self.socket.receive())
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise AssertionError("%s failed: %s" % (method, reply["error"]))
                return reply.get("result", {})
        raise AssertionError("no answer to %s" % method)

    def evaluate(self, expression):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True,
                           awaitPromise=True)
        if "exceptionDetails" in result:
            raise AssertionError("%s: %s" % (expression, result["exceptionDetails"]))
        return result["result"].get("value")

    def wait_for(self, expression, timeout=WAIT, pause=0.05):
        """Evaluate expression until it is true; return its value."""
        value = wait_until(lambda: self.evaluate(expression), timeout, pause)
        if not value:
            raise AssertionError("%s stayed false for %gs" % (expression, timeout))
        return value

    def open(self, url):
        self.call("Page.navigate", url=url)
        self.wait_for("document.readyState === 'complete' && location.href === %s"
                      " && !!document.getElementById('prompt')" % json.dumps(url))

    def type_and_send(self, text):
        """Type into the prompt box as a user does, then press Enter."""
        self.call("Page.bringToFront")
        self.evaluate("document.getElementById('prompt').focus()")
        self.call("Input.insertText", text=text)
        for kind in ("keyDown", "keyUp"):
            self.call("Input.dispatchKeyEvent", type=kind, key="Enter", code="Enter",
                      windowsVirtualKeyCode=13, nativeVirtualKeyCode=13,
                      **({"text": "\r"} if kind == "keyDown" else {}))

    def record_replies(self):
        """Keep, in the page, each new text of the last reply with the time it appeared."""
        self.evaluate("""
            window.seen = [];
            new MutationObserver(() => {
              const replies = document.querySelectorAll('#log p.assistant');
              const text = replies.length ? replies[replies.length - 1].textContent : '';
              const last = window.seen[window.seen.length - 1];
              if (text && (!last || last.text !== text)) window.seen.push({text, at: performance.now()});
            }).observe(document.getElementById('log'), {childList: true, subtree: true, characterData: true});
            true""")

    def replies(self):
        return self.evaluate("Array.from(document.querySelectorAll('#log p.assistant'), p => p.textContent)")

    def close(self):
        self.socket.close()


# ---------------------------------------------------------------- the browser and the servers


def answer_for(request):
    """The LLM server: a story that never hurries for "story", else the sky's colour in pieces."""
    prompt = request.json()["messages"][-1]["content"]
    pieces = STORY if "story" in prompt else PIECES
    pause = 0.2 if "story" in prompt else 0.25
    steps = [step for piece in pieces[:-1] for step in (delta(piece), pause)]
    return sse(*steps + [delta(pieces[-1], "stop")])


class ChromiumPresentTest(unittest.TestCase):
    @unittest.skipUnless(os.environ.get("LLM_BROWSER_REQUIRED"), "LLM_BROWSER_REQUIRED is not set")
    def test_chromium_is_installed_when_required(self):  # so that CI cannot skip the browser quietly
        self.assertTrue(os.path.exists(CHROMIUM), "LLM_BROWSER_REQUIRED is set but %s is missing" % CHROMIUM)


@unittest.skipUnless(os.path.exists(CHROMIUM), "needs Chromium at %s" % CHROMIUM)
class RelayInChromiumTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.llm_server = Server(answer_for)
        cls.relay = subprocess.Popen([sys.executable, RELAY, "--port", "0", "--base-url",
                                      cls.llm_server.url, "--model", "m"],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        cls.relay_log, cls.relay_logged = [], threading.Condition()  # notified at each line
        first_line = threading.Event()
        threading.Thread(target=cls._read_log, args=(first_line,), daemon=True).start()
        if not first_line.wait(WAIT) or not cls.relay_log[0].startswith("serving http://127.0.0.1:"):
            cls._stop()
            raise AssertionError("relay.py did not start: %r" % cls.relay_log)
        cls.url = cls.relay_log[0].split()[1]
        cls.profile = tempfile.mkdtemp(prefix="llm-chromium-profile-")
        cls.browser = subprocess.Popen([CHROMIUM] + FLAGS + ["--user-data-dir=" + cls.profile,
                                                             "about:blank"],
                                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            cls.devtools_port = cls._devtools_port()
        except Exception:
            cls._stop()
            raise
        cls.screenshots = tempfile.mkdtemp(prefix="llm-relay-screenshots-")

    @classmethod
    def _read_log(cls, first_line):
        for line in iter(cls.relay.stderr.readline, b""):
            with cls.relay_logged:
                cls.relay_log.append(line.decode("utf-8", "replace").rstrip("\n"))
                cls.relay_logged.notify_all()
            first_line.set()
        first_line.set()

    @classmethod
    def _devtools_port(cls):
        """Chromium writes the port it chose into DevToolsActivePort in its profile."""
        path = os.path.join(cls.profile, "DevToolsActivePort")

        def port():
            if cls.browser.poll() is not None:
                raise AssertionError("Chromium ended with status %s" % cls.browser.returncode)
            try:
                with open(path) as f:
                    port = f.readline().strip()
            except OSError:
                return None
            return int(port) if port.isdigit() else None
        found = wait_until(port, WAIT, 0.05)
        if not found:
            raise AssertionError("Chromium did not open its DevTools port")
        return found

    @classmethod
    def tearDownClass(cls):
        cls._stop()

    @classmethod
    def _stop(cls):
        browser = getattr(cls, "browser", None)
        if browser is not None and browser.poll() is None:
            for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, WAIT)):
                try:
                    os.killpg(browser.pid, sig)  # the group this test started: Chromium and its helpers
                except OSError:
                    pass
                try:
                    browser.wait(grace)
                    break
                except subprocess.TimeoutExpired:
                    continue
            try:  # helpers that outlive the main process
                os.killpg(browser.pid, signal.SIGKILL)
            except OSError:
                pass
        if cls.relay.poll() is None:
            cls.relay.terminate()
            try:
                cls.relay.wait(WAIT)
            except subprocess.TimeoutExpired:
                cls.relay.kill()
                cls.relay.wait(WAIT)
        cls.relay.stderr.close()
        cls.llm_server.close()
        if getattr(cls, "profile", None):
            shutil.rmtree(cls.profile, ignore_errors=True)

    def devtools(self, method, path):
        connection = http.client.HTTPConnection("127.0.0.1", self.devtools_port, timeout=WAIT)
        try:
            connection.request(method, path)
            reply = connection.getresponse()
            body = reply.read().decode("utf-8")
            self.assertEqual(reply.status, 200, body)
            return json.loads(body) if body.strip()[:1] in ("{", "[") else body
        finally:
            connection.close()

    def new_tab(self):
        tab = Tab(self.devtools("PUT", "/json/new?about:blank"))
        self.addCleanup(tab.close)
        return tab

    def close_tab(self, tab):
        tab.close()
        self.devtools("GET", "/json/close/" + tab.id)

    def screenshot(self, tab, name):
        data = base64.b64decode(tab.call("Page.captureScreenshot", format="png")["data"])
        self.assertEqual(data[:8], b"\x89PNG\r\n\x1a\n")
        path = os.path.join(self.screenshots, name)
        with open(path, "wb") as f:
            f.write(data)
        sys.stderr.write("\nscreenshot: %s\n" % path)
        return path

    def wait_for_log(self, condition, failure):
        """Wait until condition() holds, as relay.py's log grows; else fail, saying failure()."""
        with self.relay_logged:
            if not self.relay_logged.wait_for(condition, WAIT):
                self.fail(failure())

    def tearDown(self):
        self.assertNotIn("Traceback", "\n".join(self.relay_log))
        self.assertIsNone(self.relay.poll(), "relay.py ended")

    # ------------------------------------------------------------ the tests

    def test_the_reply_appears_in_the_page_in_pieces_in_order(self):
        tab = self.new_tab()
        tab.open(self.url)
        tab.record_replies()
        tab.type_and_send("Why is the sky blue?")
        tab.wait_for("window.seen.length >= 2")  # part of the reply is on the page
        self.screenshot(tab, "relay-streaming.png")
        whole = "".join(PIECES)
        tab.wait_for("!document.getElementById('send').disabled && window.seen.length"
                     " && window.seen[window.seen.length - 1].text === %s" % json.dumps(whole))
        seen = tab.evaluate("window.seen")
        texts = [snapshot["text"] for snapshot in seen]
        prefixes = ["".join(PIECES[:n]) for n in range(1, len(PIECES) + 1)]
        self.assertEqual(texts[-1], whole)
        self.assertGreaterEqual(len(texts), 4, texts)  # it grew step by step, not all at once
        for text in texts:
            self.assertIn(text, prefixes)  # whole pieces, in order
        for shorter, longer in zip(texts, texts[1:]):
            self.assertGreater(len(longer), len(shorter), texts)
        elapsed = (seen[-1]["at"] - seen[0]["at"]) / 1000
        self.assertGreater(elapsed, 0.5)  # it grew while the server paused between pieces
        self.assertEqual(tab.evaluate("document.querySelectorAll('#log p.user')[0].textContent"),
                         "Why is the sky blue?")
        self.assertEqual(tab.evaluate("document.querySelectorAll('#log p.error').length"), 0)
        self.assertEqual(tab.evaluate("document.getElementById('prompt').value"), "")

    def test_tabs_at_once_and_a_tab_closed_mid_reply_do_not_break_the_server(self):
        storyteller, other = self.new_tab(), self.new_tab()
        for tab in (storyteller, other):
            tab.open(self.url)
        storyteller.type_and_send("Tell me a story")
        storyteller.wait_for("(document.querySelector('#log p.assistant') || {textContent: ''})"
                             ".textContent.startsWith('Once upon a time and then more ')")
        other.type_and_send("Why is the sky blue?")  # while the story still streams
        other.wait_for("!document.getElementById('send').disabled"
                       " && document.querySelectorAll('#log p.assistant').length === 1", timeout=WAIT)
        self.assertEqual(other.replies(), ["".join(PIECES)])
        story = storyteller.replies()[0]
        self.assertTrue(story.startswith("Once upon a time and then more and then more"), story)
        self.assertLess(len(story), len("".join(STORY)))  # still streaming
        self.screenshot(storyteller, "relay-story-before-closing.png")
        requests_before = len(self.llm_server.requests)
        self.close_tab(storyteller)
        self.wait_for_log(lambda: any("reply ended: writing the reply failed" in line
                                      for line in self.relay_log),
                          lambda: "relay.py did not notice the closed tab")
        self.assert_a_new_tab_chats("Why is the sky blue? Again.", requests_before)
        other.type_and_send("And the sunset?")  # a tab open all along keeps its conversation
        other.wait_for("!document.getElementById('send').disabled"
                       " && document.querySelectorAll('#log p.assistant').length === 2")
        self.assertEqual([m["content"] for m in self.llm_server.requests[-1].json()["messages"]],
                         ["Why is the sky blue?", "".join(PIECES), "And the sunset?"])

    def assert_a_new_tab_chats(self, prompt, requests_before):
        """A new tab on the relay's page sends prompt and shows the whole reply: one more request."""
        tab = self.new_tab()
        tab.open(self.url)
        tab.type_and_send(prompt)
        tab.wait_for("!document.getElementById('send').disabled"
                     " && document.querySelectorAll('#log p.assistant').length === 1")
        self.assertEqual(tab.replies(), ["".join(PIECES)])
        self.assertEqual(len(self.llm_server.requests), requests_before + 1)
        return tab

    def relay_posts(self, status=""):
        return sum('"POST /chat HTTP/1.1" ' + status in line for line in self.relay_log)

    def test_a_page_on_another_origin_cannot_use_the_relay(self):
        elsewhere = Server(answer(ELSEWHERE))  # another loopback origin: another port
        self.addCleanup(elsewhere.close)
        requests_before, posts_before = len(self.llm_server.requests), self.relay_posts()
        refusals_before = self.relay_posts("403")
        tab = self.new_tab()
        tab.call("Page.navigate", url=elsewhere.url + "/")
        tab.wait_for("document.readyState === 'complete' && document.title === 'elsewhere'")
        chat = json.dumps(self.url + "chat")
        body = json.dumps(json.dumps({"messages": [{"role": "user", "content": "spend the key"}]}))
        # a "simple" request, sent without asking: the page cannot read the reply, the server must
        # refuse it. Its type is given once the whole answer has come (its resource timing entry
        # is made then): a post the relay let through would have reached the LLM server by then,
        # as relay.py ends its answer when the LLM server's reply has ended
        loaded = ("new Promise(done => new PerformanceObserver((seen, watcher) => {"
                  " if (seen.getEntriesByName(%s).length) { watcher.disconnect(); done(r.type); }"
                  " }).observe({type: 'resource', buffered: true}))" % chat)
        self.assertEqual(tab.evaluate("fetch(%s, {method: 'POST', mode: 'no-cors', body: %s,"
                                      " headers: {'Content-Type': 'text/plain'}}).then(r => %s)"
                                      % (chat, body, loaded)), "opaque")
        # JSON asks first (a CORS preflight), and the relay does not say yes
        self.assertEqual(tab.evaluate("fetch(%s, {method: 'POST', body: %s, headers: {'Content-Type':"
                                      " 'application/json'}}).then(r => 'read: ' + r.status, e => e.name)"
                                      % (chat, body)), "TypeError")
        self.assertEqual(tab.evaluate("fetch(%s).then(r => 'read: ' + r.status, e => e.name)"
                                      % json.dumps(self.url)), "TypeError")
        # a form needs no script at all; text/plain sends name=value, which can be made JSON
        tab.evaluate("""new Promise(done => {
              const form = document.forms[0], field = form.querySelector('input');
              form.action = %s;
              field.name = '{"messages": [{"role": "user", "content": "spend the key';
              field.value = '"}]}';
              document.querySelector('iframe').onload = () => done(true);  // the whole answer came
              form.submit();
            })""" % chat)
        self.wait_for_log(lambda: self.relay_posts() >= posts_before + 2,  # the fetch and the form
                          lambda: "the posts did not come: %r" % self.relay_log[-6:])
        self.assertEqual(len(self.llm_server.requests), requests_before)
        self.assertEqual(self.relay_posts("403"), refusals_before + 2)
        # DNS rebinding: a page under a name of its own that now points at the relay
        port = self.url.rstrip("/").rsplit(":", 1)[1]
        rebound = "http://rebound.test:%s/" % port
        tab.call("Page.navigate", url=rebound)
        tab.wait_for("document.readyState === 'complete' && location.href === %s" % json.dumps(rebound))
        self.assertIsNone(tab.evaluate("document.getElementById('prompt')"))
        self.assertEqual(tab.evaluate("fetch('/chat', {method: 'POST', body: %s, headers: {'Content-Type':"
                                      " 'application/json'}}).then(r => r.status)" % body), 421)
        self.assertEqual(len(self.llm_server.requests), requests_before)
        self.assert_a_new_tab_chats("Why is the sky blue?", requests_before)  # the relay's own page


if __name__ == "__main__":
    unittest.main()
