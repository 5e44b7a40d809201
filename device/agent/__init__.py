"""The agent: its parts wired together, its loops, commands, control socket and daemon."""
