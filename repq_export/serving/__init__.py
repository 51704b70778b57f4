"""Serving an artifact behind Triton Inference Server (PyTriton) and the client that talks to it."""
