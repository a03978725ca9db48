from setuptools import find_packages, setup

setup(
    name="minispin",
    version="0.1.0",
    description="Self-Play Fine-Tuning (SPIN) for Llama/Mistral in plain PyTorch",
    packages=find_packages(include=["minispin", "minispin.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.5", "sentencepiece", "protobuf", "safetensors", "numpy", "tqdm",
                      "tokenizers", "jinja2>=3.1.6"],
    extras_require={
        "test": ["pytest", "transformers>=4.45", "lm-eval[hf]>=0.4.5", "matplotlib"],
        "eval": ["lm-eval>=0.4.5"],
        "plot": ["matplotlib"],
        "judge": [],  # the OpenAI-compatible judge speaks HTTP with the standard library
        "parquet": ["pyarrow"],
    },
)
