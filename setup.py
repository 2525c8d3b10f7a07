"""Build lsa_kernels; compiles lsa_kernels._C from csrc/ when torch and a C++ compiler are present.

Install (the Makefile does this): pin torch first or in the same command, then build without isolation
so the extension compiles against the torch that will run it:

    pip install torch==2.13.0 triton==3.8.0 && pip install --no-build-isolation -e ".[test,train]"

Set LSA_NO_EXT=1 to skip the extension (the package then uses its chunked ATen path, with one warning).
"""

import glob
import os
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
PINS = ["torch==2.13.0", "triton==3.8.0"]


def _extensions():
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not sources or os.environ.get("LSA_NO_EXT") == "1":
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except Exception as exc:  # torch missing in the build environment: pure-Python install
        print(f"lsa_kernels: building without lsa_kernels._C ({exc})", file=sys.stderr)
        return [], {}
    flags = ["-O3", "-fopenmp", "-std=c++20", "-fno-trapping-math", "-fno-math-errno"]
    if os.environ.get("LSA_NATIVE", "1") == "1":
        flags.append("-march=native")
    ext = CppExtension(
        "lsa_kernels._C", sources, extra_compile_args={"cxx": flags}, extra_link_args=["-fopenmp"]
    )
    return [ext], {"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)}


ext_modules, cmdclass = _extensions()

setup(
    name="lsa_kernels",
    version="0.1.0",
    description="Fused long-short alignment and linear cross-entropy losses for long-context LLM training",
    long_description=open(os.path.join(HERE, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["lsa_kernels", "lsa_kernels.*"]),
    package_data={"lsa_kernels": ["data/*", "data/**/*"]},
    include_package_data=True,
    install_requires=PINS + ["numpy"],
    extras_require={
        "test": [
            "pytest>=8",
            "hypothesis>=6",
            "transformers>=4.45",
            "liger-kernel==0.8.5",
            "cut-cross-entropy==25.1.1",
            "expecttest",  # torch's OpInfo sample inputs (tests/api/test_torch_parity.py)
        ],
        # peft: LoRA for `lsa train --lora` (pinned: its adapter/merge API is what checkpoints rely on);
        # trl + accelerate: hf.patch under Trainer / SFTTrainer and LongShortTrainer (pinned to the versions the
        # tests run: TRL's fused_lm_head contract and Trainer's loss kwargs are what the patch serves)
        "train": ["transformers>=4.45", "tokenizers>=0.20", "safetensors>=0.4", "tqdm>=4.66", "matplotlib>=3.8",
                  "peft==0.21.2", "trl==1.16.0", "accelerate==1.15.0"],
        "gpu": ["flash-attn"],
    },
    entry_points={"console_scripts": ["lsa=lsa_kernels.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
