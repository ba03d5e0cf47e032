"""A tool-calling loop with two local tools: the time, and a safe calculator.

Usage:
    python tools.py "What time is it, and what is 17.5% of 2 hours in minutes?"
    python tools.py --model qwen2.5 "How many seconds are there in a leap year?"

The model may call ``current_time`` and ``calculate``; each call runs here,
its result goes back as a ``tool`` message, and the loop goes on until the
model answers in text (at most --rounds requests). The calculator parses the
expression with ``ast`` and evaluates numbers, + - * / // % ** and a few
``math`` functions only: no ``eval``. Each call is shown on stderr.

The server is --base-url and --model, or LLM_BASE_URL and LLM_MODEL (an API
key: LLM_API_KEY or OPENAI_API_KEY). The model must support tools (Ollama's
llama3.1+ and qwen2.5, vLLM with tool parsing, llama.cpp with --jinja, and
the hosted APIs do).
"""

import argparse
import ast
import datetime
import json
import math
import operator
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
for folder in (HERE, os.path.join(HERE, os.pardir)):  # a copy beside this file, else the
    if os.path.isfile(os.path.join(folder, "llm.py")):  # checkout's: before any installed llm
        sys.path.insert(0, folder)
        break
import llm  # noqa: E402

TOOLS = [
    {"type": "function", "function": {
        "name": "current_time",
        "description": "The current date and time, with the weekday.",
        "parameters": {"type": "object", "properties": {
            "utc_offset": {"type": "string", "description": "a UTC offset such as +02:00"
                                                            " or -05:30; default: local time"}}}}},
    {"type": "function", "function": {
        "name": "calculate",
        "description": "Evaluate an arithmetic expression: numbers, + - * / // % ** and"
                       " parentheses, sqrt, sin, cos, tan, log, exp, abs, round, floor, ceil,"
                       " pi and e.",
        "parameters": {"type": "object", "properties": {
            "expression": {"type": "string", "description": "for example (3 + 4.5) * 2 ** 3"}},
            "required": ["expression"]}}},
]

# ---------------------------------------------------------------- the tools

OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
             ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
             ast.Pow: operator.pow, ast.USub: operator.neg, ast.UAdd: operator.pos}
FUNCTIONS = {"sqrt": math.sqrt, "sin": math.sin, "cos": math.cos, "tan": math.tan,
             "log": math.log, "exp": math.exp, "abs": abs, "round": round,
             "floor": math.floor, "ceil": math.ceil}
CONSTANTS = {"pi": math.pi, "e": math.e}
MAX_BITS = 10000  # about 3000 digits


def calculate(expression):
    """The value of an arithmetic expression; ValueError for anything else."""
    if len(expression) > 500:
        raise ValueError("the expression is too long")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError:
        raise ValueError("not an arithmetic expression: %r" % expression)
    return evaluate(tree.body)


def evaluate(node):
    value = node.value if hasattr(node, "value") else getattr(node, "n", None)  # ast.Num before 3.8
    if type(node).__name__ in ("Constant", "Num"):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return value
    elif isinstance(node, ast.BinOp) and type(node.op) in OPERATORS:
        left, right = evaluate(node.left), evaluate(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) * max(bits(left), 1) > MAX_BITS:
            raise ValueError("the power is too large")
        return checked(OPERATORS[type(node.op)](left, right))
    elif isinstance(node, ast.UnaryOp) and type(node.op) in OPERATORS:
        return OPERATORS[type(node.op)](evaluate(node.operand))
    elif isinstance(node, ast.Name) and node.id in CONSTANTS:
        return CONSTANTS[node.id]
    elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
          and node.func.id in FUNCTIONS and not node.keywords):
        return checked(FUNCTIONS[node.func.id](*[evaluate(argument) for argument in node.args]))
    raise ValueError("not allowed in a calculation: %s" % type(node).__name__)


def bits(number):
    return number.bit_length() if isinstance(number, int) else 64


def checked(number):
    """Keep whole numbers small enough that the next step stays quick."""
    if bits(number) > MAX_BITS:
        raise ValueError("the number is too large")
    return number


def current_time(utc_offset=None):
    now = datetime.datetime.now(datetime.timezone.utc)
    if utc_offset:
        match = re.match(r"^(?:UTC)?([+-])(\d{1,2}):?(\d{2})?$", utc_offset.strip())
        if not match:
            raise ValueError("a UTC offset looks like +02:00, got %r" % utc_offset)
        sign = -1 if match.group(1) == "-" else 1
        delta = datetime.timedelta(hours=int(match.group(2)), minutes=int(match.group(3) or 0))
        now = now.astimezone(datetime.timezone(sign * delta))
    else:
        now = now.astimezone()  # the local time zone
    return now.strftime("%A %Y-%m-%d %H:%M:%S UTC%z")


def run_tool(call):
    """Run one tool call; the result (or the error) as JSON text for the model."""
    try:
        if call.args is None or not isinstance(call.args, dict):
            raise ValueError("the arguments are not a JSON object: %r" % call.arguments)
        if call.name == "calculate":
            result = calculate(str(call.args.get("expression", "")))
        elif call.name == "current_time":
            result = current_time(call.args.get("utc_offset"))
        else:
            raise ValueError("there is no tool called %r" % call.name)
    except (ValueError, TypeError, ArithmeticError) as error:  # the model can read and retry
        return json.dumps({"error": str(error)})
    return json.dumps({"result": result})


# ---------------------------------------------------------------- the loop


def main():
    parser = argparse.ArgumentParser(description="Answer with the help of two local tools.")
    parser.add_argument("prompt")
    parser.add_argument("--rounds", type=int, default=8, help="the most requests (default 8)")
    parser.add_argument("--base-url", help="the server (default: LLM_BASE_URL)")
    parser.add_argument("--model", help="the model (default: LLM_MODEL)")
    options = parser.parse_args()
    client = llm.Client(options.base_url, model=options.model)
    messages = [{"role": "system", "content": "Use the tools for the time and for arithmetic."},
                {"role": "user", "content": options.prompt}]
    for _ in range(options.rounds):
        reply = client.chat_stream(messages, sys.stdout, tools=TOOLS, temperature=0)
        if reply.content:
            print()
        if not reply.ok:
            print("error: %s" % reply.error, file=sys.stderr)
            return 1
        if not reply.tool_calls:
            return 0
        messages.append(reply.to_message())  # the calls, as the model made them
        for call in reply.tool_calls:
            result = run_tool(call)
            print("[%s %s -> %s]" % (call.name, call.arguments, result), file=sys.stderr)
            messages.append({"role": "tool", "tool_call_id": call.id, "content": result})
    print("error: no answer after %d requests" % options.rounds, file=sys.stderr)
    return 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl-C: no traceback
        sys.exit(130)
