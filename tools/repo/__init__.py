"""``fieldnode repo``: the operator's TUF repository."""
