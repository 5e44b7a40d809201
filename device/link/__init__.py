"""The MQTT link: how a fleet sees and steers each board (topics, commands, the durable spool)."""
