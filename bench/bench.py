"""Benchmark llm.py against a raw http.client floor and the clients people use instead.

    python bench/bench.py             # the full run, a few minutes
    python bench/bench.py --quick     # a smoke run under a minute; peers optional

One run measures every client side by side: a loopback server in its own
process answers from pre-rendered replies, each client runs in its own worker
process, and the clients take turns in a shuffled order, round after round, so
that the noise of a shared machine falls on all of them alike. Each measure
prints a markdown table with medians, spreads, and ratios against the floor
(``http.client`` written for speed) and against the official ``openai`` SDK;
the figures go to ``bench/results.json``. See bench/README.md.

Peers (openai, requests, httpx) that are not installed are skipped, and the
tables say so. Standard library only; the ``--quick`` path runs on Python 3.6.
"""

import argparse
import json
import os
import platform
import random
import select
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import clients  # noqa: E402  (after the path is set)

FULL = {
    "import_rounds": 30,
    "nonstream_rounds": 12, "nonstream_calls": 300, "nonstream_warmup": 30,
    "stream_rounds": 7, "stream_repeat": 3, "stream_events": 20000,
    "tick_rounds": 9, "tick_events": 50, "tick_interval_ms": 20,
    "rss_rounds": 3,
    "threads_rounds": 5, "threads": 8, "threads_calls": 250,
}
QUICK = {
    "import_rounds": 3,
    "nonstream_rounds": 3, "nonstream_calls": 100, "nonstream_warmup": 10,
    "stream_rounds": 3, "stream_repeat": 1, "stream_events": 2000,
    "tick_rounds": 1, "tick_events": 10, "tick_interval_ms": 20,
    "rss_rounds": 1,
    "threads_rounds": 1, "threads": 8, "threads_calls": 25,
}
IMPORTS = {  # what each client's process imports, for the import measure
    "floor": "json, http.client", "llm": "llm", "openai": "openai",
    "requests": "requests", "httpx": "httpx",
}
LIMITS = {  # what each llm.py column is held to (report() applies them): the floor's figure times
    "import": 1.15, "nonstream": 1.25, "stream": 1.15,  # (a streamed event: its time)
    "tick": 1.0, "rss": 1.1, "threads": 0.8}  # (tick: milliseconds over the floor's p99)
TARGETS = {
    "import": "<= %.2fx importing json and http.client" % LIMITS["import"],
    "nonstream": "median and p99 <= %.2fx the floor" % LIMITS["nonstream"],
    "stream": "events/s >= %.2fx the floor (an event within %.2fx its time)" % (
        1 / LIMITS["stream"], LIMITS["stream"]),
    "tick": "p99 <= floor's p99 + %g ms, both framings" % LIMITS["tick"],
    "rss": "<= %gx the floor's process" % LIMITS["rss"],
    "threads": "every answer right; calls/s >= %gx the floor" % LIMITS["threads"],
}
MEASURES = ("import", "nonstream", "stream", "tick", "rss", "threads")
_REPLY_TIMEOUT = 600.0  # seconds a worker may take for one command


# ---------------------------------------------------------------- statistics


def median(values):
    ordered = sorted(values)
    middle = len(ordered) // 2
    if not ordered:
        return float("nan")
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2.0


def quantile(values, q):
    """The q-quantile with linear interpolation (q=0.99 for p99)."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    position = (len(ordered) - 1) * q
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def iqr(values):
    return quantile(values, 0.25), quantile(values, 0.75)


# ---------------------------------------------------------------- processes


class Server(object):
    """The loopback server, in its own process."""

    def __init__(self):
        self.process = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "loopback.py")], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, universal_newlines=True)
        line = _read_line(self.process.stdout, 30.0)
        if not line.startswith("port "):
            self.close()
            raise RuntimeError("the loopback server did not start: %r" % line)
        self.base = "http://127.0.0.1:%d" % int(line.split()[1])

    def close(self):
        _end(self.process)


class Worker(object):
    """One client in its own process, answering one command at a time."""

    def __init__(self, label, kind, base, llm_path=None):
        self.label, self.kind, self.llm_path = label, kind, llm_path
        command = [sys.executable, "-E", "-B", os.path.join(HERE, "clients.py"), "--worker",
                   kind, base]
        if llm_path:
            command += ["--llm-path", llm_path]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        universal_newlines=True)
        hello = self._answer(60.0)
        self.error = hello.get("error", "")
        self.version = hello.get("version", "")

    def ask(self, op, **command):
        command["op"] = op
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()
        answer = self._answer(_REPLY_TIMEOUT)
        if answer.get("error"):
            raise RuntimeError("%s, %s: %s" % (self.label, op, answer["error"]))
        return answer

    def _answer(self, timeout):
        line = _read_line(self.process.stdout, timeout)
        if not line:
            raise RuntimeError("the %s worker ended (exit status %s)"
                               % (self.label, self.process.poll()))
        return json.loads(line)

    def close(self):
        _end(self.process)


def _read_line(stream, timeout):
    if os.name == "posix":  # a worker that hangs must not hang the benchmark
        ready, _, _ = select.select([stream], [], [], timeout)
        if not ready:
            raise RuntimeError("no answer within %gs" % timeout)
    return stream.readline()


def _end(process):
    try:
        process.stdin.close()
    except OSError:
        pass
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)


def _snapshot(paths, where):
    """Copy each llm.py into its own folder under ``where``, with its bytecode cache.

    The run measures these copies: a file edited meanwhile does not change
    the figures halfway, and nothing is written next to the originals.
    Without a bytecode cache (PYTHONDONTWRITEBYTECODE, or a file just edited)
    every fresh process would compile llm.py, and the import and memory
    figures would count the compiler; the children run with -E for the same
    reason: the environment's PYTHON* settings are not the client's cost.
    """
    import hashlib
    import py_compile
    import shutil

    copies = []
    for number, path in enumerate(paths):
        folder = os.path.join(where, str(number))
        os.mkdir(folder)
        copy = os.path.join(folder, "llm.py")
        shutil.copyfile(path, copy)
        py_compile.compile(copy, doraise=True)
        with open(copy, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()[:16]
        copies.append((copy, digest))
    return copies


def _installed(module):
    """Whether a peer is importable here, without importing it."""
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


# ---------------------------------------------------------------- the measures
#
# Every measure runs in rounds; in each round every client takes one turn, in a
# shuffled order. A ratio against another client is the median, over the
# rounds, of the ratio of the two clients' figures in that round: figures taken
# seconds apart are compared with each other, so that a slow spell of a shared
# machine falls on both sides of a ratio, and a few disturbed rounds do not
# move the median.


class Run(object):
    """What the measures share: the clients, the settings, the turn order, the log."""

    def __init__(self, columns, settings, seed, base):
        self.columns, self.settings, self.base = columns, settings, base
        self.rng = random.Random(seed)
        self.failed = {}  # label: why; a peer that fails is dropped, with a note
        self.started = time.time()

    def log(self, measure, round_number):
        sys.stderr.write("  %s: round %d done, %.0fs\n" % (measure, round_number + 1,
                                                         time.time() - self.started))
        sys.stderr.flush()

    def shuffled(self, items):
        order = list(items)
        self.rng.shuffle(order)
        return order

    def turns(self, measure, rounds, columns, op, **command):
        """Give every client its turn, round after round: (round, column, answer).

        A peer that fails is reported and skipped from then on; a failure of
        the floor or of llm.py ends the run, since its figures would be wrong.
        """
        for round_number in range(rounds):
            for column in self.shuffled(columns):
                if column.label in self.failed:
                    continue
                try:
                    answer = column.ask(op, **command)
                except RuntimeError as exc:
                    if column.kind not in clients.PEERS:
                        raise
                    self.failed[column.label] = str(exc)
                    continue
                yield round_number, column, answer
            self.log(measure, round_number)

    def kept(self, per_label):
        return {label: value for label, value in per_label.items() if label not in self.failed}


def _child_cpu():
    """CPU seconds (user + system) of the children that ended so far; None if unknown."""
    try:
        import resource
    except ImportError:
        return None
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measure_import(run, columns):
    """Fresh interpreters running ``import X``, minus an empty program: CPU and wall time.

    The CPU time of the child (user + system) is what the import costs; the
    wall time adds whatever else the machine was doing meanwhile, so on a
    shared machine the verdict is taken on CPU time, and the wall time is
    printed beside it.
    """
    code = ("import time; t = time.process_time(); %s; t = time.process_time() - t; "
            "import sys; sys.stdout.write(repr(t))")
    targets = [("pass", "pass", ROOT)]
    for column in columns:
        if column.kind in IMPORTS:
            where = os.path.dirname(column.llm_path) if column.kind == "llm" else ROOT
            targets.append((column.label, "import " + IMPORTS[column.kind], where))
    for _, statement, where in targets:  # warm the file cache, and write the bytecode that
        # an install compiles (-E: even under PYTHONDONTWRITEBYTECODE); the runs read it
        subprocess.check_output([sys.executable, "-E", "-c", statement], cwd=where)
    wall = {label: [] for label, _, _ in targets}
    cpu = {label: [] for label, _, _ in targets}
    inside = {label: [] for label, _, _ in targets}
    for round_number in range(run.settings["import_rounds"]):
        for label, statement, where in run.shuffled(targets):
            start, start_cpu = time.perf_counter(), _child_cpu()
            seconds = subprocess.check_output([sys.executable, "-E", "-B", "-c", code % statement],
                                              cwd=where, universal_newlines=True)
            wall[label].append(time.perf_counter() - start)
            if start_cpu is not None:
                cpu[label].append(_child_cpu() - start_cpu)
            inside[label].append(float(seconds) * 1000.0)
        run.log("import", round_number)
    results = {"_pass_ms": median(wall["pass"]) * 1000.0,
               "_pass_cpu_ms": median(cpu["pass"]) * 1000.0 if cpu["pass"] else None,
               "_startup_modules": int(subprocess.check_output(
                   [sys.executable, "-E", "-B", "-c", "import sys; print(len(sys.modules))"],
                   cwd=ROOT))}
    for label, _, _ in targets[1:]:
        costs = [(mine - bare) * 1000.0 for mine, bare in zip(wall[label], wall["pass"])]
        cpu_costs = [(mine - bare) * 1000.0 for mine, bare in zip(cpu[label], cpu["pass"])]
        results[label] = {"ms": median(costs), "iqr": iqr(costs), "rounds": costs,
                          "cpu_ms": median(cpu_costs) if cpu_costs else None,
                          "cpu_iqr": iqr(cpu_costs) if cpu_costs else None,
                          "cpu_rounds": cpu_costs or costs,
                          "inside_ms": median(inside[label]), "inside_rounds": inside[label]}
    return results


def measure_nonstream(run, columns):
    settings = run.settings
    pooled, medians, p99s, wrong = {}, {}, {}, {}
    for _, column, answer in run.turns("non-stream", settings["nonstream_rounds"], columns,
                                       "nonstream", calls=settings["nonstream_calls"],
                                       warmup=settings["nonstream_warmup"]):
        micros = [seconds * 1e6 for seconds in answer["latencies"]]
        pooled.setdefault(column.label, []).extend(micros)
        medians.setdefault(column.label, []).append(median(micros))
        p99s.setdefault(column.label, []).append(quantile(micros, 0.99))
        wrong[column.label] = wrong.get(column.label, 0) + answer["wrong"]
    return run.kept({
        label: {"median_us": median(pooled[label]), "iqr": iqr(medians[label]),
                "p99_us": median(p99s[label]), "pooled_p99_us": quantile(pooled[label], 0.99),
                "rounds": medians[label], "p99_rounds": p99s[label],
                "calls": len(pooled[label]), "wrong": wrong[label]}
        for label in pooled})


def measure_stream(run, columns):
    rates, wrong = {}, {}
    for _, column, answer in run.turns("stream", run.settings["stream_rounds"], columns,
                                       "stream", events=run.settings["stream_events"],
                                       repeat=run.settings["stream_repeat"]):
        rates.setdefault(column.label, []).append(answer["events"] / answer["seconds"])
        wrong[column.label] = wrong.get(column.label, 0) + answer["wrong"]
    return run.kept({
        label: {"events_per_s": median(values), "iqr": iqr(values),
                "us_per_event": 1e6 / median(values), "rounds": values, "wrong": wrong[label]}
        for label, values in rates.items()})


def measure_tick(run, columns):
    settings = run.settings
    results = {}
    for framing in ("chunked", "close"):
        delays, p99s, wrong = {}, {}, {}
        for _, column, answer in run.turns(
                "pass-through (%s)" % framing, settings["tick_rounds"], columns, "tick",
                events=settings["tick_events"], framing=framing,
                interval_ms=settings["tick_interval_ms"]):
            delays.setdefault(column.label, []).extend(answer["delays_ms"])
            p99s.setdefault(column.label, []).append(quantile(answer["delays_ms"], 0.99))
            wrong[column.label] = wrong.get(column.label, 0) + answer["wrong"]
        results[framing] = run.kept({
            label: {"median_ms": median(values), "p99_ms": median(p99s[label]),
                    "pooled_p99_ms": quantile(values, 0.99), "rounds": p99s[label],
                    "max_ms": max(values) if values else float("nan"), "events": len(values),
                    "wrong": wrong[label], "samples_ms": values}
            for label, values in delays.items()})
    return results


def measure_rss(run, columns):
    targets = [("none", "none", None)] + [
        (column.label, column.kind, column.llm_path) for column in columns
        if column.label not in run.failed]
    peaks = {label: [] for label, _, _ in targets}
    source = "nothing"
    for round_number in range(run.settings["rss_rounds"]):
        for label, kind, llm_path in run.shuffled(targets):
            command = [sys.executable, "-E", "-B", os.path.join(HERE, "clients.py"), "--rss", kind,
                       run.base]
            if llm_path:
                command += ["--llm-path", llm_path]
            output = subprocess.check_output(command, universal_newlines=True).split()
            peaks[label].append(int(output[0]) / 1024.0)
            source = output[1] if len(output) > 1 else "ru_maxrss"
        run.log("memory", round_number)
    bare = median(peaks["none"])
    results = {label: {"mib": median(values), "over_bare_mib": median(values) - bare,
                       "rounds": values}
               for label, values in peaks.items() if label != "none"}
    results["_bare_mib"] = bare
    results["_source"] = source
    return results


def measure_threads(run, columns):
    settings = run.settings
    rates, faults = {}, {}
    for _, column, answer in run.turns("threads", settings["threads_rounds"], columns, "threads",
                                       threads=settings["threads"],
                                       calls=settings["threads_calls"]):
        rates.setdefault(column.label, []).append(answer["calls"] / answer["seconds"])
        fault = faults.setdefault(column.label, {"wrong": 0, "errors": 0, "first_error": ""})
        fault["wrong"] += answer["wrong"]
        fault["errors"] += answer["errors"]
        fault["first_error"] = fault["first_error"] or answer["first_error"]
    return run.kept({
        label: dict(faults[label], calls_per_s=median(values), iqr=iqr(values), rounds=values)
        for label, values in rates.items()})


# ---------------------------------------------------------------- tables


def per_round(data, label, reference, key="rounds", difference=False):
    """Label's figure over (or minus) the reference's, round by round."""
    if reference not in data or label not in data:
        return []
    pairs = list(zip(data[label][key], data[reference][key]))
    if difference:
        return [mine - theirs for mine, theirs in pairs]
    return [mine / theirs for mine, theirs in pairs if theirs]


def paired(data, label, reference, key="rounds", difference=False):
    """Median over the rounds of label's figure over (or minus) the reference's."""
    return median(per_round(data, label, reference, key, difference))


def _x(value):
    return "-" if value != value else "%.2fx" % value


def _table(headers, rows):
    lines = ["| " + " | ".join(headers) + " |",
             "|" + "|".join("---" if i == 0 else "---:" for i in range(len(headers))) + "|"]
    lines.extend("| " + " | ".join(row) + " |" for row in rows)
    return "\n".join(lines)


def _labels(results, columns):
    return [column.label for column in columns if column.label in results]


def report(results, columns):
    """The markdown tables, and the verdicts on llm.py's targets."""
    out = []
    verdicts = []
    llm_labels = [column.label for column in columns if column.kind == "llm"]
    settings = results["settings"]
    notes = []
    if results["skipped"]:
        notes.append("not installed, skipped: %s" % ", ".join(results["skipped"]))
    notes.extend("%s failed and was dropped: %s" % item
                 for item in sorted(results["failed"].items()))
    missing = "\n_%s._" % "; ".join(notes) if notes else ""

    data = results.get("import")
    if data:
        has_cpu = data["_pass_cpu_ms"] is not None
        out.append("\n### Import time (fresh interpreter, minus `python -c pass`: %s%.1f ms "
                   "wall; %d rounds)\n" % ("%.1f ms CPU, " % data["_pass_cpu_ms"] if has_cpu
                                           else "", data["_pass_ms"], settings["import_rounds"]))
        rows = []
        for label in _labels(data, columns):
            entry = data[label]
            row = [label]
            if has_cpu:
                row += ["%.2f ms" % entry["cpu_ms"], "%.2f-%.2f" % tuple(entry["cpu_iqr"]),
                        _x(paired(data, label, "floor", "cpu_rounds")),
                        _x(paired(data, label, "openai", "cpu_rounds"))]
            row += ["%.2f ms" % entry["ms"], _x(paired(data, label, "floor")),
                    "%.2f ms" % entry["inside_ms"],
                    _x(paired(data, label, "floor", "inside_rounds"))]
            rows.append(row)
        out.append(_table((["client", "CPU", "IQR (ms)", "CPU x floor (json + http.client)",
                            "CPU x openai"] if has_cpu else ["client"]) + [
            "wall", "wall x floor", "statement", "statement x floor"], rows))
        out.append("\nCPU: user + system time of the whole child process; wall: its elapsed "
                   "time, which also counts the machine's other work; statement: "
                   "`time.process_time()` around the import statement alone. `python -c pass` "
                   "loads %d modules here; a module that `site` already imports costs nothing "
                   "in this table.%s" % (data["_startup_modules"], missing))
        for label in llm_labels:
            ratio = paired(data, label, "floor", "cpu_rounds")
            verdicts.append(("import", label, "%s%.2fx (wall %.2fx, statement %.2fx)" % (
                "CPU " if has_cpu else "wall ", ratio, paired(data, label, "floor"),
                paired(data, label, "floor", "inside_rounds")), ratio <= LIMITS["import"]))

    data = results.get("nonstream")
    if data:
        out.append("\n### Non-stream call, connection reused (%d rounds of %d calls)\n"
                   % (settings["nonstream_rounds"], settings["nonstream_calls"]))
        out.append(_table(
            ["client", "median", "p99", "IQR of round medians (us)", "median x floor",
             "p99 x floor", "median x openai", "p99 of all calls", "wrong"],
            [[label, "%.1f us" % data[label]["median_us"], "%.1f us" % data[label]["p99_us"],
              "%.1f-%.1f" % tuple(data[label]["iqr"]), _x(paired(data, label, "floor")),
              _x(paired(data, label, "floor", "p99_rounds")), _x(paired(data, label, "openai")),
              "%.1f us" % data[label]["pooled_p99_us"], "%d" % data[label]["wrong"]]
             for label in _labels(data, columns)]))
        if "wire" in data:
            out.append("\nOf the floor's %.0f us per call, the server and the loopback alone "
                       "(`wire`) take %.0f us; the rest is the client's." % (
                           data["floor"]["median_us"], data["wire"]["median_us"]))
        out.append("p99: the median of each round's p99 (one disturbed round does not make "
                   "it); the pooled p99 of all calls is beside it.%s" % missing)
        for label in llm_labels:
            ratios = paired(data, label, "floor"), paired(data, label, "floor", "p99_rounds")
            verdicts.append(("non-stream", label, "median %.2fx, p99 %.2fx" % ratios,
                             max(ratios) <= LIMITS["nonstream"] and not data[label]["wrong"]))

    data = results.get("stream")
    if data:
        out.append("\n### Streaming parse (%d events in one response, one chunk each; "
                   "%d rounds, the fastest of %d streams per turn)\n" % (
                       settings["stream_events"], settings["stream_rounds"],
                       settings["stream_repeat"]))
        out.append(_table(
            ["client", "events/s", "per event", "IQR (events/s)", "events/s x floor",
             "events/s x openai", "wrong"],
            [[label, "%.0f" % data[label]["events_per_s"], "%.2f us" % data[label]["us_per_event"],
              "%.0f-%.0f" % tuple(data[label]["iqr"]), _x(paired(data, label, "floor")),
              _x(paired(data, label, "openai")), "%d" % data[label]["wrong"]]
             for label in _labels(data, columns)]))
        if "wire" in data:
            out.append("\nThe server and the loopback alone (`wire`) deliver %.1f million "
                       "events/s, %.0fx what the floor parses: the figures measure the clients."
                       % (data["wire"]["events_per_s"] / 1e6, paired(data, "wire", "floor")))
        out.append(missing)
        for label in llm_labels:
            ratio = paired(data, label, "floor")
            verdicts.append(("stream", label, "%.2fx" % ratio,
                             ratio >= 1 / LIMITS["stream"] and not data[label]["wrong"]))

    data = results.get("tick")
    if data:
        for framing, title in (("chunked", "chunked"),
                               ("close", "body ends when the server closes")):
            table = data[framing]
            out.append("\n### Pass-through delay, %s (%d events %d ms apart, %d rounds; from "
                       "the server's send to `out.write`)\n" % (
                           title, settings["tick_events"], settings["tick_interval_ms"],
                           settings["tick_rounds"]))
            out.append(_table(
                ["client", "median", "p99", "p99 - floor's", "p99 - openai's", "p99 of all",
                 "max", "wrong"],
                [[label, "%.3f ms" % table[label]["median_ms"], "%.3f ms" % table[label]["p99_ms"],
                  "%+.3f ms" % paired(table, label, "floor", difference=True),
                  "-" if "openai" not in table else
                  "%+.3f ms" % paired(table, label, "openai", difference=True),
                  "%.3f ms" % table[label]["pooled_p99_ms"], "%.3f ms" % table[label]["max_ms"],
                  "%d" % table[label]["wrong"]]
                 for label in _labels(table, columns)]))
        out.append("\np99: the median of each round's p99; differences are taken round by "
                   "round.%s" % missing)
        for label in llm_labels:
            extra = [paired(data[f], label, "floor", difference=True)
                     for f in ("chunked", "close")]
            ok = max(extra) <= LIMITS["tick"]
            if not ok and all(max(data[f]["floor"]["rounds"]) >= data[f][label]["p99_ms"]
                              for f in ("chunked", "close")):
                ok = None  # the floor itself had rounds as slow: the machine, not the client
            if any(data[f][label]["wrong"] for f in ("chunked", "close")):
                ok = False
            verdicts.append(("pass-through", label,
                             "chunked %+.3f ms, close %+.3f ms" % tuple(extra), ok))

    data = results.get("rss")
    if data:
        out.append("\n### Peak RSS after import and one call (a bare interpreter: %.1f MiB)\n"
                   % data["_bare_mib"])
        out.append(_table(
            ["client", "peak RSS", "over a bare interpreter", "x floor", "x openai"],
            [[label, "%.1f MiB" % data[label]["mib"], "%.1f MiB" % data[label]["over_bare_mib"],
              _x(paired(data, label, "floor")), _x(paired(data, label, "openai"))]
             for label in _labels(data, columns)]))
        out.append("\nRead from %s.%s" % (data["_source"], missing))
        for label in llm_labels:
            ratio = paired(data, label, "floor")
            verdicts.append(("memory", label, "%.2fx" % ratio, ratio <= LIMITS["rss"]))

    data = results.get("threads")
    if data:
        out.append("\n### %d threads sharing one client, %d calls each (%d rounds)\n"
                   % (settings["threads"], settings["threads_calls"], settings["threads_rounds"]))
        out.append(_table(
            ["client", "calls/s", "IQR", "x floor", "x openai", "wrong", "errors"],
            [[label, "%.0f" % data[label]["calls_per_s"], "%.0f-%.0f" % tuple(data[label]["iqr"]),
              _x(paired(data, label, "floor")), _x(paired(data, label, "openai")),
              "%d" % data[label]["wrong"], "%d" % data[label]["errors"]]
             for label in _labels(data, columns)]))
        out.append(missing)
        for label in llm_labels:
            entry = data[label]
            ratio = paired(data, label, "floor")
            verdicts.append(("threads", label, "%.2fx, %d wrong, %d errors" % (
                ratio, entry["wrong"], entry["errors"]),
                ratio >= LIMITS["threads"] and not entry["wrong"] and not entry["errors"]))

    summary = side_by_side(results, columns)
    if summary:
        results["side_by_side"] = summary
        out.append(_side_by_side_tables(summary, columns))

    if verdicts:
        keys = {"import": "import", "non-stream": "nonstream", "stream": "stream",
                "pass-through": "tick", "memory": "rss", "threads": "threads"}
        out.append("\n### llm.py against its targets\n")
        out.append(_table(["measure", "client", "target", "figure", "verdict"], [
            [measure, label, TARGETS[keys[measure]], figure,
             "**meets**" if ok else "**misses**" if ok is not None else
             "inconclusive: the floor had rounds as slow (a busy machine); run again"]
            for measure, label, figure, ok in verdicts]))
    return "\n".join(out), verdicts


# the rows of the side-by-side tables: (name, words, measure, the figures, key, difference)
SIDE_BY_SIDE = (
    ("import", "import time (CPU)", "import", None, "cpu_rounds", False),
    ("nonstream", "non-stream call, median", "nonstream", None, "rounds", False),
    ("nonstream_p99", "non-stream call, p99", "nonstream", None, "p99_rounds", False),
    ("stream", "streamed events/s", "stream", None, "rounds", False),
    ("tick_chunked", "pass-through p99, chunked (ms more)", "tick", "chunked", "rounds", True),
    ("tick_close", "pass-through p99, close-delimited (ms more)", "tick", "close", "rounds",
     True),
    ("rss", "peak RSS", "rss", None, "rounds", False),
    ("threads", "threads sharing a client, calls/s", "threads", None, "rounds", False),
)
REFERENCES = ("floor", "requests")  # what the side-by-side tables divide by


def side_by_side(results, columns):
    """Every client against the floor and against requests, round by round.

    {reference: {row: {label: {"median", "iqr", "min", "max", "rounds"}}}}: the
    median of the per-round ratios (or, for the pass-through delays,
    differences in ms), their interquartile range and their extremes.
    """
    summary = {}
    for reference in REFERENCES:
        rows = {}
        for name, _, measure, part, key, difference in SIDE_BY_SIDE:
            data = results.get(measure)
            if data and part:
                data = data.get(part)
            if not data or reference not in data:
                continue
            cells = {}
            for column in columns:
                values = per_round(data, column.label, reference, key, difference)
                if column.label != reference and column.kind != "wire" and values:
                    cells[column.label] = {"median": median(values), "iqr": iqr(values),
                                           "min": min(values), "max": max(values),
                                           "rounds": len(values)}
            if cells:
                rows[name] = cells
        if rows:
            summary[reference] = rows
    return summary


def _side_by_side_tables(summary, columns):
    out = []
    for reference, rows in sorted(summary.items(), key=lambda item: REFERENCES.index(item[0])):
        labels = [column.label for column in columns
                  if any(column.label in cells for cells in rows.values())]
        out.append("\n### Side by side: each client against %s (median of the per-round "
                   "figures; in brackets, their interquartile range)\n" % (
                       "the floor" if reference == "floor" else reference))
        table = []
        for name, words, _, _, _, difference in SIDE_BY_SIDE:
            if name not in rows:
                continue
            cells = rows[name]
            rounds = max(cell["rounds"] for cell in cells.values())
            row = [words, "%d" % rounds]
            for label in labels:
                cell = cells.get(label)
                if cell is None:
                    row.append("-")
                elif difference:
                    row.append("%+.3f [%+.3f, %+.3f]" % ((cell["median"],) + tuple(cell["iqr"])))
                else:
                    row.append("%.2fx [%.2f, %.2f]" % ((cell["median"],) + tuple(cell["iqr"])))
            table.append(row)
        out.append(_table(["measure", "rounds"] + labels, table))
    out.append("\nA ratio is the client's figure over the reference's in the same round: "
               "above 1 is slower for times, more memory for RSS, faster for events/s and "
               "calls/s. The pass-through rows are milliseconds added to the reference's p99. "
               "`side_by_side` in the JSON also has each spread's extremes.")
    if "requests" not in summary:
        out.append("_requests is not in this run: no table against it._")
    return "\n".join(out)


# ---------------------------------------------------------------- main


def _arguments(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: few rounds, small sizes, under a minute")
    parser.add_argument("--llm-path", default=os.path.join(ROOT, "llm.py"),
                        help="the llm.py to measure (default: the repository's)")
    parser.add_argument("--compare", action="append", default=[], metavar="LABEL=PATH",
                        help="also measure another llm.py, as column LABEL (repeatable)")
    parser.add_argument("--only", default="",
                        help="comma-separated measures: import,nonstream,stream,tick,rss,threads")
    parser.add_argument("--no-peers", action="store_true", help="skip openai, requests, httpx")
    parser.add_argument("--out", help="where the JSON figures go (default: bench/results.json, "
                                      "or bench/results-quick.json with --quick)")
    parser.add_argument("--seed", type=int, default=12345, help="seed of the turn order")
    parser.add_argument("--bytecodes", action="store_true",
                        help="instead of benchmarking, count the Python bytecode each client "
                             "runs per non-stream call and per streamed event: no noise")
    parser.add_argument("--check", action="store_true",
                        help="with --bytecodes: compare llm.py's counts with the budget in "
                             "bench/budget.json; exit 1 when one is over (CPython 3.11 only; "
                             "elsewhere it says so and exits 0)")
    parser.add_argument("--budget", default=os.path.join(HERE, "budget.json"),
                        help="the budget file (default: bench/budget.json)")
    parser.add_argument("--write-budget", type=float, metavar="PERCENT",
                        help="with --bytecodes: set the budget file to llm.py's counts plus "
                             "PERCENT, on the budget's CPython")
    parser.add_argument("--profile", metavar="MEASURE",
                        help="instead of benchmarking, print a cProfile of the llm.py worker "
                             "running MEASURE (nonstream, stream, tick, threads)")
    return parser.parse_args(argv)


def _llm_files(arguments):
    """(label, path) of every llm.py to measure."""
    files = [("llm.py", os.path.abspath(arguments.llm_path))]
    for item in arguments.compare:
        label, _, path = item.partition("=")
        if not label or not path:
            raise SystemExit("--compare wants LABEL=PATH, got %r" % item)
        files.append(("llm.py:" + label, os.path.abspath(path)))
    for label, path in files:
        if os.path.basename(path) != "llm.py" or not os.path.isfile(path):
            raise SystemExit("%s: %s is not a file named llm.py" % (label, path))
    return files


def _columns(arguments, base, skipped, llm_files):
    """Start the workers: floor, wire, llm.py (and comparisons), then the installed peers."""
    wanted = [("floor", "floor", None), ("wire", "wire", None)]
    wanted.extend((label, "llm", path) for label, path in llm_files)
    for peer in clients.PEERS:
        if arguments.no_peers or not _installed(peer):
            skipped.append(peer)
        else:
            wanted.append((peer, peer, None))
    columns = []
    for label, kind, llm_path in wanted:
        worker = Worker(label, kind, base, llm_path)
        if worker.error:
            worker.close()
            if kind in clients.PEERS:
                skipped.append("%s (%s)" % (label, worker.error))
                continue
            raise RuntimeError("%s cannot start: %s" % (label, worker.error))
        columns.append(worker)
    return columns


def _environment(columns):
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"python": sys.version.split()[0], "implementation": platform.python_implementation(),
            "platform": platform.platform(), "cpus": os.cpu_count(), "load_average": load,
            "clients": {column.label: column.version for column in columns},
            "started": time.strftime("%Y-%m-%d %H:%M:%S")}


def _profile(measure, columns, settings):
    column = [c for c in columns if c.kind == "llm"][0]
    command = {"nonstream": dict(calls=settings["nonstream_calls"] * 10, warmup=50),
               "stream": dict(events=settings["stream_events"]),
               "tick": dict(events=settings["tick_events"], framing="chunked",
                            interval_ms=settings["tick_interval_ms"]),
               "threads": dict(threads=settings["threads"], calls=settings["threads_calls"])}
    column.ask("warm")
    print(column.ask("profile", measure=measure, **command[measure])["report"])


# the bytecode counts: (key in budget.json, the worker's measure, words for the tables)
BYTECODE_COUNTS = (
    ("per_call", "nonstream", "per non-stream call"),
    ("per_event_chunked", "stream", "per streamed event, chunked"),
    ("per_event_length", "stream_length", "per streamed event, Content-Length"),
)
BYTECODE_WORK = {"calls": 20, "events": 1000}  # calls traced; events in each traced stream


def _bytecodes(columns, work):
    """Print each client's bytecode count per call and per event, and the files that run most.

    Returns {label: {measure: {file: instructions}}}.
    """
    print("## Python bytecode instructions run (traced; Python %s)\n" % sys.version.split()[0])
    print("| client | " + " | ".join("%s | the most, by file" % words
                                     for _, _, words in BYTECODE_COUNTS) + " |")
    print("|---" + "|---:|---" * len(BYTECODE_COUNTS) + "|")
    counted = {}
    for column in columns:
        if column.kind == "wire":
            continue
        counts = counted[column.label] = column.ask("bytecodes", **work)
        cells = []
        for _, measure, _ in BYTECODE_COUNTS:
            files = sorted(counts[measure].items(), key=lambda item: -item[1])
            cells.append("%s | %s" % (_count(sum(counts[measure].values())), ", ".join(
                "%s %s" % (name, _count(value)) for name, value in files[:3])))
        print("| %s | %s |" % (column.label, " | ".join(cells)))
    print("\nA streamed event is one of %d in one reply, the call's own work shared out among "
          "them; a non-stream call, the mean of %d. `client.py` is http.client's, "
          "`clients.py` the benchmark's adapter." % (work["events"], work["calls"]))
    return counted


def _count(value):
    return "%.0f" % value if value >= 1000 or value == int(value) else "%.1f" % value


def _read_budget(path):
    with open(path) as f:
        budget = json.load(f)
    for key in ("python", "calls", "events"):
        if key not in budget:
            raise SystemExit("%s: no %r" % (path, key))
    for key, _, _ in BYTECODE_COUNTS:
        if not all(isinstance(budget.get(key, {}).get(share), (int, float))
                   for share in ("all", "llm.py")):
            raise SystemExit("%s: %s wants {\"all\": N, \"llm.py\": N}" % (path, key))
    return budget


def _budget_applies(budget):
    """Why the budget does not apply to this interpreter, or None when it does."""
    if (platform.python_implementation() != "CPython"
            or "%d.%d" % sys.version_info[:2] != budget["python"]):
        return ("the bytecode budget is for CPython %s; this is %s %s, whose compiler and "
                "standard library run other counts" % (
                    budget["python"], platform.python_implementation(),
                    sys.version.split()[0]))
    return None


def _figures(counts):
    """{(key, share): instructions} of one llm.py column's counts."""
    figures = {}
    for key, measure, _ in BYTECODE_COUNTS:
        figures[key, "all"] = sum(counts[measure].values())
        figures[key, "llm.py"] = counts[measure].get("llm.py", 0.0)
    return figures


def _shown(path):
    """A path as the output names it: relative when it is under the working directory."""
    relative = os.path.relpath(path)
    return path if relative.startswith(os.pardir) else relative


def _check_budget(counts, budget, path):
    """Compare llm.py's counts with the budget: print both; 0 within it, 1 over it."""
    figures = _figures(counts)
    print("\n## llm.py's bytecode budget (%s, CPython %s)\n"
          % (_shown(path), budget["python"]))
    print("| count | measured | budget | headroom |\n|---|---:|---:|---:|")
    over = []
    for key, _, words in BYTECODE_COUNTS:
        for share, whose in (("all", "all files"), ("llm.py", "llm.py's share")):
            measured, allowed = figures[key, share], budget[key][share]
            left = allowed - measured
            print("| %s, %s | %s | %s | %s |" % (
                words, whose, _count(measured), _count(allowed),
                "%s (%.1f%%)" % (_count(left), 100.0 * left / allowed) if left >= 0 else
                "**over by %s (%.1f%%)**" % (_count(-left), -100.0 * left / allowed)))
            if left < 0:
                over.append("%s, %s: %s instructions, budget %s, over by %s (%.1f%%)" % (
                    words, whose, _count(measured), _count(allowed), _count(-left),
                    -100.0 * left / allowed))
    chunked, length = figures["per_event_chunked", "all"], figures["per_event_length", "all"]
    print("\nA streamed event framed by Content-Length runs %s instructions %s than a chunked "
          "one." % (_count(abs(chunked - length)), "fewer" if length <= chunked else "more"))
    if sys.version.split()[0] != budget.get("measured_with", sys.version.split()[0]):
        print("The budget was measured with CPython %s; this is %s: a patch release can move "
              "the standard library's share a little." % (budget["measured_with"],
                                                         sys.version.split()[0]))
    if over:
        print("\nOver the budget in %s:\n" % _shown(path))
        for line in over:
            print("- " + line)
        print("\nA change that makes the common path dearer fails this check. If the cost is "
              "meant, raise the budget in the same commit and say why (bench/README.md).")
        return 1
    print("\nWithin the budget.")
    return 0


def _write_budget(counts, budget, path, margin):
    """Set the budget to the measured counts plus ``margin`` percent, rounded up."""
    import math

    figures = _figures(counts)
    for key, _, _ in BYTECODE_COUNTS:
        for share in ("all", "llm.py"):
            budget[key][share] = int(math.ceil(figures[key, share] * (1.0 + margin / 100.0)))
    budget["measured_with"] = sys.version.split()[0]
    with open(path, "w") as f:
        f.write(_budget_text(budget))
    print("\nWrote %s: the counts above plus %g%%." % (_shown(path), margin))


def _budget_text(budget):
    """budget.json as it is kept: one count per line, keys in a fixed order."""
    lines = []
    for key in ("about", "python", "measured_with", "calls", "events"):
        if key in budget:
            lines.append("  %s: %s" % (json.dumps(key), json.dumps(budget[key])))
    for key, _, _ in BYTECODE_COUNTS:
        lines.append("  %s: {\"all\": %s, \"llm.py\": %s}" % (
            json.dumps(key), json.dumps(budget[key]["all"]), json.dumps(budget[key]["llm.py"])))
    return "{\n" + ",\n".join(lines) + "\n}\n"


def _measure(arguments, settings, measures, llm_files, copies, server, columns, skipped):
    """Run the measures; the results as bench/results.json holds them."""
    run = Run(columns, settings, arguments.seed, server.base)
    results = {"settings": dict(settings, quick=arguments.quick, seed=arguments.seed),
               "environment": _environment(columns), "skipped": skipped, "failed": run.failed,
               "llm_files": {label: {"path": path, "sha256": digest}
                             for (label, path), (_, digest) in zip(llm_files, copies)}}
    timed = [column for column in columns if column.kind != "wire"]
    for column in columns:
        column.ask("warm")
    functions = {"import": (measure_import, timed), "nonstream": (measure_nonstream, columns),
                 "stream": (measure_stream, columns), "tick": (measure_tick, timed),
                 "rss": (measure_rss, timed), "threads": (measure_threads, timed)}
    for measure in measures:
        function, which = functions[measure]
        results[measure] = function(run, which)
    results["seconds"] = time.time() - run.started
    results["environment"]["load_average_at_end"] = (
        os.getloadavg() if hasattr(os, "getloadavg") else None)
    return results


def _print(results, columns, quick, out_path):
    text, verdicts = report(results, columns)
    results["verdicts"] = [{"measure": m, "client": c, "figure": f, "meets": ok}
                           for m, c, f, ok in verdicts]
    environment = results["environment"]
    loads = ["/".join("%.2f" % x for x in environment[key] or ()) or "n/a"
             for key in ("load_average", "load_average_at_end")]
    print("## llm.py benchmark%s\n" % (" (--quick: small sizes, few rounds; not for judging "
                                       "targets)" if quick else ""))
    print("Python %s on %s, %s CPUs, load average %s at the start, %s at the end. Clients: %s."
          % (environment["python"], environment["platform"], environment["cpus"], loads[0],
             loads[1], ", ".join("%s %s" % item
                                 for item in sorted(environment["clients"].items()))))
    print("`floor` is http.client written for speed; `wire` is a raw socket that only reads "
          "the server's bytes (server and loopback cost alone). Ratios are medians of "
          "per-round ratios.")
    print(text)
    with open(out_path, "w") as f:
        json.dump(results, f, indent=1, sort_keys=True)
    print("\nFigures written to %s (%.0fs in all)." % (out_path, results["seconds"]))


def main(argv=None):
    arguments = _arguments(sys.argv[1:] if argv is None else argv)
    settings = dict(QUICK if arguments.quick else FULL)
    measures = [m for m in arguments.only.split(",") if m] or list(MEASURES)
    unknown = [m for m in measures if m not in MEASURES]
    if unknown or (arguments.profile and arguments.profile not in MEASURES[1:4] + ("threads",)):
        raise SystemExit("unknown measure: %s (known: %s)" % (
            ", ".join(unknown) or arguments.profile, ", ".join(MEASURES)))
    budget = None
    if arguments.check or arguments.write_budget is not None:
        if not arguments.bytecodes:
            raise SystemExit("--check and --write-budget go with --bytecodes")
        budget = _read_budget(arguments.budget)
        why_not = _budget_applies(budget)
        if why_not and arguments.write_budget is not None:
            raise SystemExit("%s: edit %s by hand to move it to another Python" % (
                why_not, arguments.budget))
        if why_not:
            print(why_not + ": not checked.")
            if sys.version_info < (3, 7):
                return 0
            budget = None  # the counts are still printed
    if arguments.bytecodes and sys.version_info < (3, 7):
        raise SystemExit("--bytecodes needs Python 3.7 or later (frame.f_trace_opcodes)")
    out_path = arguments.out or os.path.join(
        HERE, "results-quick.json" if arguments.quick else "results.json")
    llm_files = _llm_files(arguments)
    where = tempfile.mkdtemp(prefix="llm-bench-")
    server = None
    columns = []
    try:
        copies = _snapshot([path for _, path in llm_files], where)
        measured = [(label, copy) for (label, _), (copy, _) in zip(llm_files, copies)]
        server = Server()
        skipped = []
        if arguments.profile:
            arguments.no_peers = True
        if arguments.bytecodes:
            columns = _columns(arguments, server.base, skipped, measured)
            work = dict(BYTECODE_WORK)
            if budget is not None:  # the budget's counts are of its own workload
                work = {key: budget[key] for key in work}
            counts = _bytecodes(columns, work)["llm.py"]
            if arguments.write_budget is not None:
                _write_budget(counts, budget, arguments.budget, arguments.write_budget)
            if budget is not None:
                return _check_budget(counts, budget, arguments.budget)
            return 0
        columns = _columns(arguments, server.base, skipped, measured)
        if arguments.profile:
            _profile(arguments.profile, columns, settings)
            return 0
        results = _measure(arguments, settings, measures, llm_files, copies, server, columns,
                           skipped)
    finally:
        for column in columns:
            column.close()
        if server is not None:
            server.close()
        shutil.rmtree(where, ignore_errors=True)
    _print(results, columns, arguments.quick, out_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
