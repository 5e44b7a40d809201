"""Secure model updates: TUF-verified, age-encrypted releases installed into an A/B store behind a health gate.

Only the update path imports this package (and python-tuf), so a board that never updates never pays for it.
See docs/updates.md.
"""
