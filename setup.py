"""landscape-tools: loss-landscape geometry and feature-map stability of neural networks."""
import re
from pathlib import Path

from setuptools import setup

here = Path(__file__).parent
version = re.search(r'__version__ = "([^"]+)"', (here / "landscape_tools" / "__init__.py").read_text()).group(1)

setup(
    name="landscape-tools",
    version=version,
    description="Hessian spectra, loss surfaces and feature-map variance of neural networks (the `lt` command)",
    long_description=(here / "README.md").read_text() if (here / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["landscape_tools", "landscape_tools.models", "landscape_tools.plotting", "landscape_tools.cli"],
    package_dir={"landscape_tools.cli": "cli"},
    install_requires=[
        "torch>=2.1",
        "torchvision>=0.16",
        "numpy>=1.24",
        "scipy>=1.10",
        "matplotlib>=3.7",
        "click>=8.1",
        "h5py>=3.8",
        "scikit-learn>=1.2",
    ],
    extras_require={"test": ["pytest>=7", "hypothesis>=6", "pytest-xdist>=3.8"]},
    entry_points={"console_scripts": ["lt = landscape_tools.cli.main:main"]},
)
