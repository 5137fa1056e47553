"""Serving: one frozen backbone, an LRU of registry adapters, mixed-adapter batched generation."""
