"""peftlab: parameter-efficient fine-tuning from scratch, in PyTorch and Triton.

`pip install -e .` for the library and the `peftlab` command; `pip install -e ".[dev]"` adds the
test suite's tools and the reference implementations the tests compare against (transformers,
peft, bitsandbytes), which the library itself never imports.
"""
from pathlib import Path

from setuptools import setup

PACKAGES = [
    "peftlab",
    "peftlab.models",
    "peftlab.data",
    "peftlab.tuners",
    "peftlab.quant",
    "peftlab.optim",
    "peftlab.train",
    "peftlab.kernels",
]

setup(
    name="peftlab",
    version="0.1.0",
    description="A readable, tested and fast research codebase for parameter-efficient fine-tuning",
    long_description=(Path(__file__).parent / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=PACKAGES,
    package_dir={"peftlab": "peftlab", "peftlab.kernels": "kernels"},
    package_data={"peftlab": ["assets/*/*", "assets/*/*/*"]},
    include_package_data=True,
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        "numpy>=1.24",
        "safetensors>=0.4",
        "sentencepiece>=0.2",
        "PyYAML>=6.0",
        "tqdm>=4.60",
        "matplotlib>=3.7",
    ],
    extras_require={
        "dev": [
            "pytest>=8",
            "pytest-timeout>=2.2",
            "hypothesis>=6.100",
            "transformers>=4.51",
            "peft>=0.15",
            "bitsandbytes>=0.45",
        ],
    },
    entry_points={"console_scripts": ["peftlab = peftlab.cli:main"]},
)
