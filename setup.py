# The embeddable kernels live in ./kernels but install as `fastrlhf.kernels`: never as a
# top-level `kernels` module (a different, popular package of that name is imported by
# transformers). Everything else is declared in pyproject.toml.
from setuptools import setup

setup(
    packages=["fastrlhf", "fastrlhf.algos", "fastrlhf.rollout", "fastrlhf.tasks", "fastrlhf.kernels"],
    package_dir={"fastrlhf": "fastrlhf", "fastrlhf.kernels": "kernels"},
)
