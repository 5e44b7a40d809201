"""``fieldnode install``: the service onto a board or into an image root."""
