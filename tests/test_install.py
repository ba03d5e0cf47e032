"""Tests for how llm.py is installed: run with ``python -m unittest tests.test_install``.

The file works under any module name (copied into a project as ``chatlib.py``,
say); ``llm_py``, the second import name, and the ``llm-py`` command work where a
package takes ``import llm`` (as simonw's ``llm`` does); the distribution's metadata
and console script are what the README says; where flit_core is installed, the
built wheel and sdist hold what they should; and with ``LLM_TEST_PYPI=1``, simonw's
``llm`` from PyPI and this distribution share a real venv, installed in either order
and each uninstalled. Every call goes to a loopback server from tests/loopback.py;
every wait is bounded.
"""

import base64
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import unittest
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# a child's calls through {module}: one whole, one streamed into out, to sys.argv[1]
CALLS = ("client = {module}.Client(sys.argv[1], model='m')\n"
         "reply = client.chat([{module}.Message('user', 'Hi')])\n"
         "out = io.StringIO()\n"
         "streamed = client.chat_stream([{{'role': 'user', 'content': 'Hi'}}], out)\n")
if ROOT not in sys.path:  # run as a file: this checkout's llm.py and tests
    sys.path.insert(0, ROOT)

import llm
from tests.loopback import LoopbackCase, answer, delta, free_port, message, sse
from tests.test_cli import WAIT, Result, Terminal, environment, pty, run


def read(name):
    with open(os.path.join(ROOT, name), encoding="utf-8") as f:
        return f.read()


class VendoredTest(LoopbackCase):
    """llm.py copied into a project under another name: its calls and its command line."""

    def setUp(self):
        self.directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.directory, True)
        shutil.copy(os.path.join(ROOT, "llm.py"), os.path.join(self.directory, "chatlib.py"))

    def test_a_copy_named_chatlib_answers_calls(self):
        server = self.serve(answer(message("whole")), sse(delta("str"), delta("eamed", "stop")))
        code = ("import io, json, sys, chatlib\n" + CALLS.format(module="chatlib") +
                "print(json.dumps([reply.content, reply.ok, streamed.content, out.getvalue(),\n"
                "                  type(reply).__module__, 'llm' in sys.modules]))\n")
        result = run([sys.executable, "-c", code, server.url], cwd=self.directory)
        self.assertEqual((result.status, result.err), (0, ""))
        self.assertEqual(json.loads(result.out),
                         ["whole", True, "streamed", "streamed", "chatlib", False])

    def test_a_copy_named_chatlib_is_the_command_line(self):
        server = self.serve(sse(delta("Hi "), delta("there", "stop")))
        command = [sys.executable, os.path.join(self.directory, "chatlib.py")]
        result = run(command + ["--base-url", server.url, "Hello"])
        self.assertEqual((result.status, result.out, result.err), (0, "Hi there\n", ""))
        version = run(command + ["--version"])
        self.assertEqual((version.status, version.out.split()[0]), (0, "chatlib.py"))
        refused = run(command + ["--base-url", "http://127.0.0.1:%d" % free_port(), "Hi"])
        self.assertEqual(refused.status, 1)
        self.assertTrue(refused.err.startswith("error: "), refused.err)


def console_script():
    """The module and function of the ``llm-py`` console script, as pyproject.toml names them."""
    scripts = read("pyproject.toml").split("[project.scripts]")[1].split("\n[")[0]
    module, function = re.search(r'(?m)^llm-py = "([\w.]+):(\w+)"$', scripts).groups()
    return module, function


def console_script_code(module, function):
    """What the ``llm-py`` script that pip writes does: import the entry point and call it."""
    return ("import sys\nfrom %s import %s\nsys.argv[0] = 'llm-py'\nsys.exit(%s())\n"
            % (module, function, function))


class SecondNameTest(LoopbackCase):
    """``llm_py`` and the command where a package takes ``import llm``.

    The directory is laid out as site-packages is when simonw's ``llm`` is installed
    beside this distribution: a package ``llm/`` next to ``llm.py`` and ``llm_py.py``,
    and Python's import gives the package for ``import llm``.
    """

    def setUp(self):
        self.directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.directory, True)
        for name in ("llm.py", "llm_py.py"):
            shutil.copy(os.path.join(ROOT, name), self.directory)

    def shadow(self):
        """A package named llm beside llm.py, as simonw's is in site-packages."""
        os.mkdir(os.path.join(self.directory, "llm"))
        with open(os.path.join(self.directory, "llm", "__init__.py"), "w") as f:
            f.write("WHOSE = 'the other llm'\n")

    def python(self, *args):
        return run([sys.executable] + list(args), cwd=self.directory)

    def test_the_console_script_runs_where_a_package_takes_import_llm(self):
        self.shadow()
        server = self.serve(sse(delta("Hi "), delta("there", "stop")))
        code = console_script_code(*console_script())
        result = self.python("-c", code, "--base-url", server.url, "Hello")
        self.assertEqual((result.status, result.out, result.err), (0, "Hi there\n", ""))
        version = self.python("-c", code, "--version")
        self.assertEqual((version.status, version.out), (0, "llm-py %s\n" % llm.__version__))
        other = self.python("-c", "import llm; print(llm.WHOSE)")
        self.assertEqual(other.out, "the other llm\n")

    def test_import_llm_py_as_llm_answers_calls_where_a_package_takes_import_llm(self):
        self.shadow()
        server = self.serve(answer(message("whole")), sse(delta("str"), delta("eamed", "stop")))
        code = ("import io, json, os, sys\n"
                "import llm as other\n"
                "import llm_py as llm\n" + CALLS.format(module="llm") +
                "print(json.dumps([reply.content, streamed.content, out.getvalue(), other.WHOSE,\n"
                "                  llm.__name__, os.path.basename(llm.__file__),\n"
                "                  sys.modules['llm_py'] is llm, llm.__version__]))\n")
        result = self.python("-c", code, server.url)
        self.assertEqual((result.status, result.err), (0, ""))
        self.assertEqual(json.loads(result.out), ["whole", "streamed", "streamed", "the other llm",
                                                  "llm_py", "llm.py", True, llm.__version__])

    def test_python_m_llm_py_is_the_command(self):
        self.shadow()
        server = self.serve(sse(delta("Hi "), delta("there", "stop")))
        result = self.python("-m", "llm_py", "--base-url", server.url, "Hello")
        self.assertEqual((result.status, result.out, result.err), (0, "Hi there\n", ""))

    def test_where_llm_is_this_library_llm_py_is_the_same_module(self):
        for code in ("import llm_py, llm; print(llm_py is llm, llm.__name__)",
                     "import llm, llm_py; print(llm_py is llm, llm_py.__name__)"):
            result = self.python("-c", code)
            self.assertEqual((result.status, result.out, result.err), (0, "True llm\n", ""), code)


class MetadataTest(unittest.TestCase):
    def test_the_console_script_is_llm_py_never_llm(self):
        scripts = read("pyproject.toml").split("[project.scripts]")[1].split("\n[")[0]
        entries = re.findall(r'^\s*"?([\w.-]+)"?\s*=\s*"([^"]+)"', scripts, re.M)
        self.assertEqual(entries, [("llm-py", "llm_py:_main")])

    def test_the_licence_is_a_file_and_in_the_metadata(self):
        licence = read("LICENSE")
        self.assertTrue(licence.startswith("MIT License"))
        self.assertIn("THE SOFTWARE IS PROVIDED \"AS IS\"", licence)
        project = read("pyproject.toml")
        self.assertRegex(project, r'(?m)^license = "MIT"$')
        self.assertRegex(project, r'(?m)^license-files = \["LICENSE"\]$')
        self.assertIn("License: MIT", read("llm.py").split('"""')[1])

    def test_no_typed_classifier_for_a_module_that_pep_561_cannot_mark(self):
        classifiers = read("pyproject.toml").split("classifiers = [")[1].split("]")[0]
        self.assertIn("Programming Language :: Python :: 3.6", classifiers)
        self.assertIn("Programming Language :: Python :: 3.15", classifiers)
        self.assertNotIn("Typing :: Typed", classifiers)

    def test_the_readme_install_commands_name_what_exists(self):
        readme = read("README.md")
        published = "pip install llm-py" in readme  # nothing is published under that name
        self.assertFalse(published, "the README says pip install llm-py")
        self.assertIn("pip install dist/llm_py-", readme)


def flit_core_version():
    try:
        import flit_core
    except ImportError:
        return None
    return tuple(int(part) for part in flit_core.__version__.split(".")[:2])


def declared_backend():
    """The build backend pyproject.toml names, and the folders it is imported from."""
    system = read("pyproject.toml").split("[build-system]")[1].split("\n[")[0]
    backend = re.search(r'(?m)^build-backend = "([\w.]+)"$', system).group(1)
    path = re.search(r'(?m)^backend-path = \[(.*)\]$', system)
    return backend, re.findall(r'"([^"]+)"', path.group(1)) if path else []


def build(test, kind, source=ROOT):
    """Build a wheel or an sdist from ``source`` with the declared backend, as pip would."""
    directory = tempfile.mkdtemp()
    test.addCleanup(shutil.rmtree, directory, True)
    backend, path = declared_backend()
    code = ("import sys; sys.path[:0] = sys.argv[2:]; import %s as backend; "
            "print(backend.build_%s(sys.argv[1]))" % (backend, kind))
    output = subprocess.check_output([sys.executable, "-c", code, directory] + path, cwd=source,
                                     stderr=subprocess.STDOUT, timeout=WAIT)
    return os.path.join(directory, output.decode().strip().splitlines()[-1])


@unittest.skipUnless((flit_core_version() or (0,)) >= (3, 12), "needs flit_core 3.12 or later")
class BuildTest(LoopbackCase):
    """The wheel and sdist that the build backend (flit_core's, see tools/) makes of this checkout."""

    def test_the_wheel_holds_llm_py_both_names_the_licence_and_the_llm_py_script(self):
        with zipfile.ZipFile(build(self, "wheel")) as wheel:
            names = wheel.namelist()
            info = [name for name in names if ".dist-info/" in name]
            self.assertEqual(sorted(set(names) - set(info)), ["llm.py", "llm_py.py"])
            for name in ("llm.py", "llm_py.py"):
                self.assertEqual(wheel.read(name).decode("utf-8"), read(name))
            read_info = lambda tail: wheel.read([n for n in info if n.endswith(tail)][0]).decode()
            self.assertEqual(read_info("entry_points.txt").split(),
                             ["[console_scripts]", "llm-py=llm_py:_main"])
            metadata = read_info("METADATA")
            self.assertIn("\nLicense-Expression: MIT\n", metadata)
            self.assertIn("\nLicense-File: LICENSE\n", metadata)
            self.assertNotIn("Typing :: Typed", metadata)
            self.assertTrue(read_info("licenses/LICENSE").startswith("MIT License"))
            self.assertTrue(wheel.filename.endswith("-py3-none-any.whl"))
            record = [line.split(",") for line in read_info("RECORD").splitlines()]
            self.assertEqual(sorted(row[0] for row in record), sorted(names))
            for name, digest, size in record:  # pip refuses a file whose hash is wrong
                if not name.endswith("/RECORD"):
                    data = wheel.read(name)
                    wanted = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
                    self.assertEqual((digest, int(size)), ("sha256=" + wanted.decode(), len(data)))

    def test_the_wheel_command_runs_where_a_package_takes_import_llm(self):
        directory = tempfile.mkdtemp()  # laid out as site-packages with simonw's llm beside
        self.addCleanup(shutil.rmtree, directory, True)
        with zipfile.ZipFile(build(self, "wheel")) as wheel:
            wheel.extractall(directory)
            entry = [n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt")][0]
            module, function = wheel.read(entry).decode().split("llm-py=")[1].split()[0].split(":")
        os.mkdir(os.path.join(directory, "llm"))
        with open(os.path.join(directory, "llm", "__init__.py"), "w") as f:
            f.write("WHOSE = 'the other llm'\n")
        server = self.serve(sse(delta("Hi "), delta("there", "stop")))
        result = run([sys.executable, "-c", console_script_code(module, function),
                      "--base-url", server.url, "Hello"], cwd=directory)
        self.assertEqual((result.status, result.out, result.err), (0, "Hi there\n", ""))

    def test_the_sdist_holds_the_tests_examples_licence_and_backend_and_builds_the_wheel(self):
        import tarfile

        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory, True)
        with tarfile.open(build(self, "sdist")) as sdist:
            names = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
            safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # 3.12 on
            sdist.extractall(directory, **safe)
        for name in ("llm.py", "llm_py.py", "tools/build_backend.py", "LICENSE", "README.md",
                     "pyproject.toml", "test_llm.py",
                     "tests/__init__.py", "tests/test_install.py", "tests/record.py",
                     "tests/testdata/ca.pem", "tests/testdata/vllm/chat.bin",
                     "examples/json_reply.py", "examples/greeting.schema.json"):
            self.assertIn(name, names)
        # pip installs an sdist by building a wheel from it
        source = os.path.join(directory, os.listdir(directory)[0])
        with zipfile.ZipFile(build(self, "wheel", source)) as wheel:
            self.assertIn("llm_py.py", wheel.namelist())


# simonw's llm: the newest release that installs on each Python (each line needs a newer one)
SIMONW_LLM = [((3, 10), "0.36"), ((3, 9), "0.27.1"), ((3, 8), "0.13.1")]
PIP = 600  # seconds: the longest one pip command may take (it may download dozens of packages)
CLEAN = {"PYTHONPATH": None, "PYTHONHOME": None, "PIP_REQUIRE_VIRTUALENV": None}


def simonw_llm_release():
    return next((release for version, release in SIMONW_LLM if sys.version_info >= version), None)


@unittest.skipUnless(os.environ.get("LLM_TEST_PYPI") == "1", "set LLM_TEST_PYPI=1 to install"
                     " simonw's llm from PyPI beside this distribution in a venv (needs the network)")
@unittest.skipUnless(simonw_llm_release(), "simonw's llm needs Python 3.8 or later")
@unittest.skipIf(os.name == "nt", "the venv's layout is the POSIX one here")
class NextToSimonwTest(LoopbackCase):
    """simonw's llm, from PyPI, and this distribution, a wheel built from the checkout, in one
    real venv: installed in either order, and each uninstalled in turn.

    One venv serves both orders: simonw's goes in, then this one, then this one comes out;
    this one goes in again and simonw's comes out; simonw's goes in again (its dependencies
    are still there, so it is quick) and this one comes out. After each step, what is
    installed works and what is not is gone.
    """

    def setUp(self):
        self.place = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.place, True)
        self.venv = os.path.join(self.place, "venv")
        self.bin = os.path.join(self.venv, "bin")
        self.elsewhere = os.path.join(self.place, "elsewhere")  # a working directory with no llm
        os.mkdir(self.elsewhere)
        # the venv's own Python and packages only, none of the checkout's
        self.env = environment(**CLEAN)
        self.server = self.serve(self.answer)

    def answer(self, request):
        if request.path.endswith("/models"):
            return answer({"data": [{"id": "m"}, {"id": "n"}]})
        usage = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
        if request.json().get("stream"):
            return sse(delta(None, reasoning_content="Thinking."), delta("Hi "),
                       delta("there", "stop"), {"choices": [], "usage": usage})
        return answer(message("Hi there", usage=usage))

    def execute(self, *command, **options):
        """Run a command of the venv (``python``, ``pip``, ``llm``, ``llm-py``) to its end."""
        process = subprocess.Popen([os.path.join(self.bin, command[0])] + list(command[1:]),
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, cwd=self.elsewhere, env=self.env)
        try:
            out, err = process.communicate(options.get("stdin", b""), options.get("timeout", WAIT))
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(WAIT)
        return Result(process.returncode, out, err)

    def pip(self, *args):
        result = self.execute("python", "-m", "pip", "--disable-pip-version-check", *args,
                              timeout=PIP)
        self.assertEqual(result.status, 0, result.out[-2000:] + result.err[-2000:])

    def test_both_orders_and_each_uninstalled(self):
        started = time.monotonic()
        made = subprocess.run([sys.executable, "-m", "venv", self.venv], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, env=self.env, timeout=PIP)
        if made.returncode != 0:  # Debian's Python without python3-venv, say
            self.skipTest("python -m venv fails here: %s" % made.stdout.decode().strip()[-300:])
        simonw = "llm==" + simonw_llm_release()
        probe = self.execute("python", "-m", "pip", "--disable-pip-version-check", "download",
                             "--no-deps", "--timeout", "15", "--retries", "1", "-d",
                             os.path.join(self.place, "probe"), simonw, timeout=PIP)
        if probe.status != 0:
            lines = probe.err.strip().splitlines() or ["no output"]
            self.skipTest("PyPI is unreachable: pip download %s: %s" % (simonw, lines[-1]))
        wheels = os.path.join(self.place, "wheels")
        self.pip("wheel", "--no-deps", "-w", wheels, ROOT)  # pip builds it as users would
        ours = os.path.join(wheels, [n for n in os.listdir(wheels) if n.endswith(".whl")][0])

        self.pip("install", simonw)
        self.check_simonw_alone()
        self.pip("install", ours)  # simonw's first, then this one
        self.check_both()
        self.pip("uninstall", "-y", "llm-py")
        self.check_simonw_alone()
        self.pip("install", ours)
        self.pip("uninstall", "-y", "llm")
        self.check_ours_alone()
        self.pip("install", simonw)  # this one first, then simonw's
        self.check_both()
        self.pip("uninstall", "-y", "llm-py")
        self.check_simonw_alone()
        print("\n  NextToSimonwTest: %s and this distribution in a venv: %.0f s"
              % (simonw, time.monotonic() - started), file=sys.stderr)

    # ------------------------------------------------------------ what each state must show

    def check_both(self):
        self.check_llm_py()
        self.check_simonw_command()
        self.assertEqual(self.imports(), {"llm": "the other llm", "llm_py": "llm.py as llm_py"})

    def check_simonw_alone(self):
        self.check_simonw_command()
        self.assertFalse(os.path.exists(os.path.join(self.bin, "llm-py")))
        self.assertEqual(self.imports(), {"llm": "the other llm", "llm_py": None})

    def check_ours_alone(self):
        self.check_llm_py()
        self.assertFalse(os.path.exists(os.path.join(self.bin, "llm")))
        self.assertEqual(self.imports(), {"llm": "llm.py as llm", "llm_py": "llm.py as llm"})

    def check_simonw_command(self):
        result = self.execute("llm", "--version")
        self.assertEqual((result.status, result.out),
                         (0, "llm, version %s\n" % simonw_llm_release()), result.err)

    def imports(self):
        """What ``import llm`` and ``import llm_py`` give, and that the library answers."""
        code = ("import json, os, sys\n"
                "def which(name):\n"
                "    try:\n"
                "        module = __import__(name)\n"
                "    except ImportError:\n"
                "        return None\n"
                "    if os.path.basename(module.__file__) != 'llm.py':\n"
                "        return 'the other llm'\n"
                "    reply = module.Client(sys.argv[1], model='m').chat([{'role': 'user',\n"
                "                                                        'content': 'Hi'}])\n"
                "    assert reply.content == 'Hi there', reply\n"
                "    return 'llm.py as ' + module.__name__\n"
                "print(json.dumps({'llm': which('llm'), 'llm_py': which('llm_py')}))\n")
        result = self.execute("python", "-c", code, self.server.url)
        self.assertEqual((result.status, result.err), (0, ""))
        return json.loads(result.out)

    def check_llm_py(self):
        """The ``llm-py`` command, every option of it, the chat on a terminal included."""
        url, seen = self.server.url, len(self.server.requests)
        version = self.execute("llm-py", "--version")
        self.assertEqual((version.status, version.out), (0, "llm-py %s\n" % llm.__version__))
        helped = self.execute("llm-py", "--help")
        self.assertEqual(helped.status, 0)
        self.assertTrue(helped.out.startswith("usage: llm-py"), helped.out)
        result = self.execute("llm-py", "--base-url", url, "-m", "m", "-s", "Be brief.",
                              "--key", "sk-test-key", "-t", "0", "--max-tokens", "5",
                              "-o", "seed", "7", "--timeout", "5", "--show-reasoning",
                              "--stats", "Hello", stdin=b"piped text")
        self.assertEqual((result.status, result.out), (0, "Hi there\n"), result.err)
        self.assertIn("Thinking.", result.err)
        self.assertIn("2 tokens, first token after ", result.err)
        request = self.server.requests[seen]
        body = request.json()
        self.assertEqual(body["messages"], [{"role": "system", "content": "Be brief."},
                                            {"role": "user", "content": "Hello\n\npiped text"}])
        self.assertEqual((body["model"], body["temperature"], body["max_tokens"], body["seed"]),
                         ("m", 0, 5, 7))
        self.assertEqual(request.headers["authorization"], "Bearer sk-test-key")
        whole = self.execute("llm-py", "--base-url", url, "--json", "--no-stream", "Hello")
        self.assertEqual(whole.status, 0, whole.err)
        self.assertEqual(json.loads(whole.out)["content"], "Hi there")
        self.assertFalse(self.server.requests[-1].json().get("stream"))
        models = self.execute("llm-py", "--base-url", url, "--models")
        self.assertEqual((models.status, models.out), (0, "m\nn\n"), models.err)
        refused = self.execute("llm-py", "--base-url", "http://127.0.0.1:%d" % free_port(), "Hi")
        self.assertEqual(refused.status, 1)
        self.assertTrue(refused.err.startswith("error: "), refused.err)
        if pty is not None:
            terminal = Terminal(["--base-url", url], command=[os.path.join(self.bin, "llm-py")],
                                env=CLEAN, cwd=self.elsewhere)
            self.addCleanup(terminal.close)
            terminal.expect("> ")
            terminal.type("Hello\n")
            self.assertIn("Hi there", terminal.expect("> "))
            terminal.type("/exit\n")
            self.assertEqual(terminal.wait(), 0)
            self.assertNotIn(b"Traceback", terminal.seen)


if __name__ == "__main__":
    unittest.main()
