"""The operator's fleet tools: processes with their state in retained messages (and, optionally, one file).

* :mod:`tools.fleet.states` reads every board's retained state (``fieldnode/v1/+/state``) and knows when the
  broker's replay is complete (a marker of its own), applying the session rule of the wire contract;
* :mod:`tools.fleet.where` parses and applies ``--where`` filters;
* :mod:`tools.fleet.status` is ``fieldnode fleet status``; :mod:`tools.fleet.groupsend` is
  ``fieldnode send --group``; :mod:`tools.fleet.cli` registers ``fieldnode fleet``'s subcommands.

docs/fleet.md describes them for operators.
"""
