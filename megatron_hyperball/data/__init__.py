"""Embedded default data: the Python standard library as a byte-level Megatron corpus (``prepare``)."""
