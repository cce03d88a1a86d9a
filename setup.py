"""cm3leon_jax: retrieval-augmented, token-based multimodal models (CM3Leon family) in JAX."""
from setuptools import find_packages, setup

setup(
    name="cm3leon_jax",
    version="0.1.0",
    description="Retrieval-augmented token-based multimodal models (CM3Leon, RA-CM3, Chameleon) in JAX.",
    packages=find_packages(include=["cm3leon_jax", "cm3leon_jax.*", "data_pipeline", "data_pipeline.*", "experiments"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.5",
        "flax>=0.10",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "etils[epath]",  # workdir_io: local paths and gs:// / s3:// through fsspec
        "fsspec",
        "grain>=0.2.10",
        "array-record>=0.7",
        "tensorflow-datasets>=4.9.8",
        "importlib_resources",  # tfds imports it on the array_record path without declaring it
        "scann>=1.3",
        "sentencepiece>=0.2",
        "einops>=0.8",
        "absl-py>=2.1",
        "ml-collections>=0.1.1",
        "tensorboardX>=2.6",
        "numpy>=1.26",
        "pillow>=10",
        "safetensors>=0.4",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-xdist>=3", "filelock>=3"],
        "bench": ["scikit-image>=0.22"],
        # object-store workdirs (cm3leon_jax.workdir_io: etils.epath through fsspec)
        "gcs": ["gcsfs"],   # gs://
        "s3": ["s3fs"],     # s3://
        "az": ["adlfs"],    # az://
        # cm3leon_jax.hf_interop (tests/test_interop.py): Hugging Face OPT/Chameleon export and import.
        # The core never imports them; torch is pinned to the CPU wheel the CI uses.
        # tokenizers (a transformers dependency, named since hf_text_tokenizer uses it directly).
        # peft: LoRA adapters to and from Hugging Face PEFT (export --adapters_only, import_hf of an adapter).
        "interop": ["torch==2.13.0", "transformers>=4.44", "tokenizers", "peft>=0.13"],
    },
)
