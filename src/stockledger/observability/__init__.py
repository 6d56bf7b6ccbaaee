"""Metrics (prometheus-client) and structured logs. Imported by every other layer; imports none."""
