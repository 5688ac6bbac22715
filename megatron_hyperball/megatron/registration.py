"""Registration of the hyperball optimizers with megatron-core (filled in by the adapter)."""


def register() -> None:
    pass
