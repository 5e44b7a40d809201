"""``fieldnode diag``: the technician's CLI and the support bundle."""
