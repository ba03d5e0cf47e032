"""The test suites beside the library's own (test_llm.py at the root), with their data, and
the loopback servers they all share (loopback.py)."""
