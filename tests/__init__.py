"""The test suites beside the library's own (test_llm.py at the root), with their data."""
