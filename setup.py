"""Packaging for elastic-run: one distribution, five packages, extras per framework."""
from setuptools import find_packages, setup

EXTRAS = {
    # torch is pinned by `make setup` (.ci/constraints.txt) to the CPU wheel on disk.
    "torch": ["torch>=2.2"],
    # tf-keras: Keras 2, for Horovod's Keras elastic state (run with TF_USE_LEGACY_KERAS=1)
    "tf": ["tensorflow-cpu>=2.16", "tf-keras>=2.16"],
    # Horovod ships only as a source package; `make setup` builds it with Gloo (see README).
    "horovod": ["horovod==0.28.1"],
    "etcd": ["etcd-sdk-python>=0.0.7"],
    # the embedded rendezvous server runs on uvloop when it is installed (asyncio otherwise)
    "rendezvous": ["uvloop>=0.19; sys_platform != 'win32'"],
    "s3": ["s3fs>=2024.2"],
    # a vectorised CRC-32 (same values as zlib's) for checkpoint saves, loads and verification
    "checkpoint": ["zlib-ng>=0.5"],
    "gpu": ["nvidia-ml-py>=12"],
    "parquet": ["pyarrow>=14"],
    "profiler": ["prometheus_client>=0.19", "matplotlib>=3.7", "tensorboard>=2.16"],
    # launchers.ray: one agent per Ray node as an actor (large: not part of "all")
    "ray": ["ray>=2.60"],
    # `make lint`: the linter and the type checker CI runs before the tests
    "lint": ["ruff>=0.6", "mypy>=1.10"],
    "test": [
        "pytest>=8",
        "pytest-xdist>=3.5",
        "pytest-timeout>=2.2",
        "moto[server]>=5",
        "scikit-learn>=1.3",
        # test certificates for the TLS tests (embedded store, etcd): tests/tls_certs.py
        "cryptography>=41",
        # tests/test_kubernetes.py loads the example manifests with the official client's models
        "kubernetes>=30",
        # tests/test_ray.py: launchers.ray on a ray.cluster_utils.Cluster
        "ray>=2.60",
    ],
}
# One console script per tool; each maps errors to exit codes through elastic.commands.
CONSOLE_SCRIPTS = [
    "elastic-run=launchers.cli:main",  # the launcher, a drop-in for torchrun
    "elastic-rendezvous=elastic.rendezvous_cli:main",  # the embedded rendezvous server alone
    "elastic-ckpt=checkpoint.cli:main",  # inspect and verify checkpoints
    "elastic-shards=dataload.cli:main",  # write, describe and pre-cache data shards
    "elastic-prof=profiler.cli:main",  # reports and plots from profiler records
]

EXTRAS["all"] = sorted({dep for name, deps in EXTRAS.items() if name not in ("test", "lint", "ray") for dep in deps})

setup(
    name="elastic-run",
    version="0.1.0",
    description="Elastic distributed training runtime: rendezvous, agent, launcher, "
    "in-process recovery, checkpointing, cached data loading and profiling.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["elastic*", "launchers*", "checkpoint*", "dataload*", "profiler*"]),
    install_requires=["numpy>=1.24", "fsspec>=2024.2", "psutil>=5.9", "safetensors>=0.4"],
    extras_require=EXTRAS,
    entry_points={"console_scripts": CONSOLE_SCRIPTS},
)
