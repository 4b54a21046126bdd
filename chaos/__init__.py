"""Chaos runner: real worker processes and a real PostgreSQL, crashed, restarted, paused and fed bad input.

`python -m chaos [--short] [--only NAME,...]`; see docs/reliability.md.
"""
