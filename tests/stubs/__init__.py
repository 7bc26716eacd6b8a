"""Stub servers that speak each hosted provider's real wire protocol, on 127.0.0.1 only."""
