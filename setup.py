from setuptools import find_packages, setup

setup(
    name="megatron-hyperball",
    version="0.1.0",
    description="Hypersphere optimizers (AdamH, MuonH) for Megatron-LM / megatron-core pretraining",
    packages=find_packages(include=["megatron_hyperball", "megatron_hyperball.*"]),
    python_requires=">=3.12",
    install_requires=[
        "torch>=2.6",
        "megatron-core>=0.19,<0.20",
        "emerging-optimizers>=0.3,<0.4",
        "wandb",
        "pydantic>=2",
        "pyyaml",
        "tensorboard",
        "psutil",  # megatron-core's torch_dist checkpoint writer needs it
    ],
    extras_require={
        "test": ["pytest"],
        "bench": ["matplotlib"],  # benchmarks/compare_optimizers.py plots
        # Transformer Engine is optional: used when importable (GPU machines), never required.
        "te": ["transformer-engine[pytorch]"],
    },
)
