"""tcjepa_jax: Text-Conditional JEPA pretraining in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="tcjepa_jax",
    version="0.1.0",
    description="Text-Conditional JEPA (TC-JEPA) vision pretraining in JAX/Flax, CPU to TPU pods.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    # `configs` ships with the package so the default config is found after any install.
    packages=find_packages(include=["tcjepa_jax", "tcjepa_jax.*", "configs"]),
    install_requires=[
        "jax>=0.10",
        "flax>=0.12",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12",
        "grain>=0.2.18",
        "sentencepiece>=0.2",
        "ml_collections>=1.0",
        "absl-py>=2.0",
        "numpy>=1.26",
        "tensorboardX>=2.6",
        "pillow",
        "array-record",
        "tqdm",
        "msgpack",
    ],
    extras_require={
        # jax[tpu] brings the libtpu that matches the installed jax (0.10.2: libtpu 0.0.42.*, a
        # 213 MB wheel, 684 MB installed); tests/test_aot.py compiles for TPU topologies with it
        # on any CPU host (tools/aot.py).
        # torch, timm, transformers and safetensors: the PyTorch export and T5 checkpoint tests.
        "test": ["pytest>=8", "pytest-xdist", "tensorflow-cpu", "tensorflow-datasets",
                 "jax[tpu]>=0.10", "torch>=2.3", "torchvision", "timm", "transformers", "safetensors",
                 "matplotlib"],
        "plot": ["matplotlib"],  # python -m tcjepa_jax.tools.plot
        # gs:// workdirs: etils.epath (Orbax, our files) reads GCS through gcsfs, tensorboardX
        # writes event files through google-cloud-storage.
        "tpu": ["jax[tpu]>=0.10", "gcsfs", "google-cloud-storage"],
        "gpu": ["jax[cuda12]>=0.10"],
        "data": ["tensorflow-cpu", "tensorflow-datasets", "array-record", "pillow"],
        "export": ["torch>=2.3", "safetensors", "timm"],
        "t5": ["safetensors", "torch>=2.3"],  # reading Hugging Face T5 checkpoints
    },
    entry_points={
        "console_scripts": [
            "tcjepa-train=tcjepa_jax.train:run",
            "tcjepa-eval=tcjepa_jax.evaluate:run",
            "tcjepa-export=tcjepa_jax.export.cli:run",
        ],
    },
)
