"""Calling OpenAI-compatible endpoints: request identity, the ledger, the request engine."""
