"""The durable result spool: SQLite, group commit, repair and salvage, the disk budget."""
