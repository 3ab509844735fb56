"""Benchmark harness: real Redis, real node processes, real WebSocket clients on loopback.

Run it with `presence-svc bench` (see docs/performance.md). Nothing here is imported by the
service itself; `presence_svc.cli` imports it lazily for the `bench` subcommand only.
"""
