"""megatron-hyperball's build: the package, its shipped configs, the ``megatron-hyperball`` command.

The shipped configs live in ``configs/`` at the repository root (where a clone uses them:
``--config configs/quickstart.yaml``) and are installed as the package data folder
``megatron_hyperball/configs`` (``--config quickstart`` by name): one copy of each file, mapped by
``package_dir``, so the two can never differ. An editable install maps the same folder.
"""

from setuptools import find_packages, setup

CONFIGS = "megatron_hyperball.configs"

setup(
    name="megatron-hyperball",
    version="0.1.0",
    description="Hypersphere optimizers (AdamH, MuonH) for Megatron-LM / megatron-core pretraining",
    packages=find_packages(include=["megatron_hyperball", "megatron_hyperball.*"]) + [CONFIGS],
    package_dir={CONFIGS: "configs"},
    package_data={CONFIGS: ["*.yaml"]},
    # not a console_scripts entry point: its wrapper would import megatron_hyperball (torch and
    # megatron-core, ~5 s) before main(); this script lists configs and checks them without either
    scripts=["scripts/megatron-hyperball"],
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
        "dashboard": ["matplotlib"],  # megatron-hyperball dashboard RUN_DIR (TensorBoard files -> PNG)
        # Transformer Engine is optional: used when importable (GPU machines), never required.
        "te": ["transformer-engine[pytorch]"],
    },
)
