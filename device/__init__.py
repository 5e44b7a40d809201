"""fieldnode's agent core: the base modules (config, errors, clock, state files, logs), the agent, its inference
runtime, MQTT link, model updates and diagnosis. See docs/architecture.md."""

__version__ = "0.1.0"
