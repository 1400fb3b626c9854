"""Radix-tree prefix cache of KV blocks."""
