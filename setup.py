"""moeconv: dense -> Mixture-of-Experts conversion, sub-1-bit quantization and honest evaluation."""

import importlib.util
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent


def extension_modules():
    """Native kernels this machine can build (none if torch or a compiler is missing)."""
    build = HERE / "moeconv" / "kernels" / "build.py"
    if not build.is_file():
        return [], {}
    spec = importlib.util.spec_from_file_location("moeconv_kernels_build", build)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        modules = module.extension_modules()
    except Exception as err:  # noqa: BLE001 - no torch / no compiler: the pure-PyTorch path still works
        print(f"moeconv: native kernels not built ({err}); the reference path will be used")
        return [], {}
    if not modules:
        return [], {}
    from torch.utils.cpp_extension import BuildExtension

    return modules, {"build_ext": BuildExtension.with_options(no_python_abi_suffix=True)}


ext_modules, cmdclass = extension_modules()

setup(
    name="moeconv",
    version="0.1.0",
    description="Dense -> Mixture-of-Experts conversion (DOT-MoE, DAG-MoE), QMoE sub-1-bit quantization, evaluation",
    python_requires=">=3.10",
    packages=find_packages(include=["moeconv", "moeconv.*"]) + ["moeconv.cli"],
    package_dir={"moeconv.cli": "cli"},
    include_package_data=True,
    install_requires=[
        "torch>=2.4",
        "transformers>=4.56",
        "safetensors>=0.4",
        "accelerate>=1.0",
        "typer>=0.12",
        "rich>=13",
        "pydantic>=2.6",
        "pyyaml>=6",
        "numpy>=1.26",
        "matplotlib>=3.8",
    ],
    extras_require={"gguf": ["gguf>=0.10"], "lm-eval": ["lm-eval>=0.4"], "serve": ["llama-cpp-python==0.3.36"]},
    entry_points={"console_scripts": ["moeconv=moeconv.cli.app:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
