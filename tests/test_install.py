"""Tests for how llm.py is installed: run with ``python -m unittest tests.test_install``.

The file works under any module name (copied into a project as ``chatlib.py``,
say), the distribution's metadata and console script are what the README says,
and, where flit_core is installed, the built wheel and sdist hold what they
should. Every call goes to a loopback server from test_llm; every wait is bounded.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import unittest
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as a file: this checkout's llm.py and test_llm.py
    sys.path.insert(0, ROOT)

from test_llm import LoopbackCase, answer, delta, free_port, message, sse
from tests.test_cli import WAIT, environment, run


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
        code = ("import io, json, sys, chatlib\n"
                "client = chatlib.Client(sys.argv[1], model='m')\n"
                "reply = client.chat([chatlib.Message('user', 'Hi')])\n"
                "out = io.StringIO()\n"
                "streamed = client.chat_stream([{'role': 'user', 'content': 'Hi'}], out)\n"
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


class MetadataTest(unittest.TestCase):
    def test_the_console_script_is_llm_py_never_llm(self):
        scripts = read("pyproject.toml").split("[project.scripts]")[1].split("\n[")[0]
        entries = re.findall(r'^\s*"?([\w.-]+)"?\s*=\s*"([^"]+)"', scripts, re.M)
        self.assertEqual(entries, [("llm-py", "llm:_main")])

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


@unittest.skipUnless((flit_core_version() or (0,)) >= (3, 12), "needs flit_core 3.12 or later")
class BuildTest(unittest.TestCase):
    """The wheel and sdist that flit_core builds from this checkout."""

    def build(self, kind):
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory, True)
        code = "import sys, flit_core.buildapi as b; print(b.build_%s(sys.argv[1]))" % kind
        output = subprocess.check_output([sys.executable, "-c", code, directory], cwd=ROOT,
                                         stderr=subprocess.STDOUT, timeout=WAIT)
        return os.path.join(directory, output.decode().strip().splitlines()[-1])

    def test_the_wheel_holds_llm_py_the_licence_and_the_llm_py_script(self):
        with zipfile.ZipFile(self.build("wheel")) as wheel:
            names = wheel.namelist()
            info = [name for name in names if ".dist-info/" in name]
            self.assertEqual(sorted(set(names) - set(info)), ["llm.py"])
            read_info = lambda tail: wheel.read([n for n in info if n.endswith(tail)][0]).decode()
            self.assertEqual(read_info("entry_points.txt").split(),
                             ["[console_scripts]", "llm-py=llm:_main"])
            metadata = read_info("METADATA")
            self.assertIn("\nLicense-Expression: MIT\n", metadata)
            self.assertIn("\nLicense-File: LICENSE\n", metadata)
            self.assertNotIn("Typing :: Typed", metadata)
            self.assertTrue(read_info("licenses/LICENSE").startswith("MIT License"))

    def test_the_sdist_holds_the_tests_examples_and_licence(self):
        import tarfile

        with tarfile.open(self.build("sdist")) as sdist:
            names = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
        for name in ("llm.py", "LICENSE", "README.md", "pyproject.toml", "test_llm.py",
                     "tests/__init__.py", "tests/test_install.py", "tests/record.py",
                     "tests/testdata/ca.pem", "tests/testdata/vllm/chat.bin",
                     "examples/json_reply.py", "examples/greeting.schema.json"):
            self.assertIn(name, names)


if __name__ == "__main__":
    unittest.main()
