"""The shipped configs: installed as the package data folder ``megatron_hyperball/configs`` (setup.py
maps this folder there), run by name (``--config quickstart``) or by path from a checkout
(``--config configs/quickstart.yaml``); ``megatron-hyperball configs`` lists them and
``megatron-hyperball show NAME`` prints one. Names resolve in ``megatron_hyperball.config.load``."""
