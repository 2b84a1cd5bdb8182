"""Chaos tests: worker processes killed, frozen and restarted under a running batch."""
