"""Phalanx's built-in tasks (see :mod:`client.task` for the interface and the names)."""
