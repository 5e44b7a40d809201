"""The inference runtime: interpreter backends, delegates, the isolated worker and the Runtime facade."""
