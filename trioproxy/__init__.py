"""trioproxy: a local gateway for LLM traffic, on Trio."""

__version__ = "0.1.0"
