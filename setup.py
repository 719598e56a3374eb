"""mpidl: parallel and decentralized training of neural networks over MPI."""
import re
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).parent
VERSION = re.search(r'__version__ = "([^"]+)"', (HERE / "mpidl" / "__init__.py").read_text()).group(1)

setup(
    name="mpidl",
    version=VERSION,
    description="Parallel and decentralized training of neural networks on HPC clusters (MPI)",
    long_description=(HERE / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["mpidl", "mpidl.comm", "mpidl.commands", "mpidl.algorithms", "mpidl.kernels"],
    package_dir={"mpidl.kernels": "kernels"},
    install_requires=[
        "numpy>=1.24",
        "numba>=0.59",
        "mpi4py>=4",
        "h5py>=3.8",
        # 2.13.0 is the CPU wheel this project is developed with; install it first
        # (scripts/setup.sh does) so pip does not fetch a CUDA build.
        "torch>=2.1,<3",
    ],
    extras_require={
        "mpich": ["mpich"],          # self-contained MPI for laptops and CI; clusters use the system MPI
        "test": ["pytest>=7", "hypothesis", "scipy", "scikit-learn"],
        "plot": ["matplotlib"],
        "data": ["scikit-learn"],    # the bundled `digits` dataset
        "mutation": ["cosmic-ray>=8.7"],   # scripts/mutation.sh (not in CI); see docs/testing.md
    },
    entry_points={"console_scripts": ["mpidl=mpidl.__main__:main"]},
)
