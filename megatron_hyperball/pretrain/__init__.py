"""Config-driven GPT pretraining through Megatron's own training loop.

``scripts/pretrain_gpt.py`` calls :func:`entry.main`; :mod:`gpt` holds the model provider,
dataset provider and forward step Megatron's ``pretrain`` takes; :mod:`metrics` logs per-matrix
weight norms and relative updates through Megatron's W&B / TensorBoard writers.
"""
