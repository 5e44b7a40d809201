"""The checks behind ``fieldnode diag`` and the MQTT ``diag`` command."""
