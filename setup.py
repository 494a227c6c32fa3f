# The embeddable kernels live in ./kernels but install as `fastrlhf.kernels`: never as a
# top-level `kernels` module (a different, popular package of that name is imported by
# transformers). Everything else is declared in pyproject.toml.
from setuptools import setup

# The example configs (./examples/*.yaml) install as package data of `fastrlhf.examples`: the
# demo runs its stages from the same files a user passes with --config.
setup(
    packages=["fastrlhf", "fastrlhf.algos", "fastrlhf.rollout", "fastrlhf.tasks", "fastrlhf.kernels",
              "fastrlhf.integrations", "fastrlhf.examples"],
    package_dir={"fastrlhf": "fastrlhf", "fastrlhf.kernels": "kernels", "fastrlhf.examples": "examples"},
    package_data={"fastrlhf.examples": ["*.yaml"]},
)
