"""fieldnode agent core: configuration, inference runtime, and (later) link, updates and daemon."""

__version__ = "0.1.0"
