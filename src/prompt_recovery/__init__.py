"""prompt-recovery: predict the rewrite prompt an LLM was given, from the original and rewritten text."""

__version__ = "0.1.0"
