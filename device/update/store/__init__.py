"""The A/B model store: slots, the atomic switch, trial, floors, recovery."""
