"""Config-driven GPT pretraining through Megatron's own training loop.

``scripts/pretrain_gpt.py`` calls :func:`entry.main`; :mod:`megatron_args` translates the
validated config into Megatron's command line and environment; :mod:`gpt` holds the model
provider, dataset provider and forward step Megatron's ``pretrain`` takes.
"""
