"""Install the `dalle` and `dvae` packages and the command-line tools.

    pip install -e .                 # library, tools, generate.py
    pip install -e ".[test]"         # + pytest, ruff and DeepSpeed for the test suite
    pip install -e ".[deepspeed]"    # + DeepSpeed for multi-GPU training
    pip install -e ".[eval]"         # + pytorch-fid for Inception FID
"""

from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent

setup(
    name="dalle-repro",
    version="0.1.0",
    description="DALL-E (Ramesh et al. 2021) in PyTorch: dVAE, sparse transformer, reranking, learning from feedback",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=["dvae", "dalle", "dalle.data", "dalle.evaluation", "dalle.feedback", "dalle.reranker", "dalle.train",
              "dalle.train.tasks", "dalle.transformer", "dalle_tools"],
    package_dir={"dalle_tools": "tools"},
    # The default model generate.py uses with no --model (tools/train_default.sh rebuilds it).
    package_data={"dalle": ["default_model/*.json", "default_model/*.safetensors",
                            "default_model/*/*.json", "default_model/*/*.safetensors"],
                  "dalle_tools": ["*.sh"]},
    install_requires=[
        # Pinned to the versions this project is tested with; see README "Install".
        "torch>=2.5,<=2.14.1",
        "torchvision>=0.20,<=0.29.1",
        "einops>=0.7",
        "pillow>=10",
        "numpy",
        "webdataset==1.0.2",
        "tokenizers>=0.19",
        "safetensors>=0.4",
        "tqdm>=4.66",
        "pyyaml>=6",
        "tensorboard>=2.15",
    ],
    extras_require={
        "deepspeed": ["deepspeed==0.19.8"],
        "eval": ["pytorch-fid==0.3.0"],  # the Inception-v3 of published FIDs (tools/eval_fid.py)
        # the comparison web app (tools/feedback.py serve) and the accuracy-against-KL figure (tools/plot_feedback.py)
        "feedback": ["flask>=3.0,<4", "matplotlib>=3.8"],
        # selenium drives Debian's chromium in the web app's tests (apt-get install chromium chromium-driver)
        "test": ["pytest>=8", "pytest-timeout", "ruff>=0.6", "deepspeed==0.19.8", "pytorch-fid==0.3.0",
                 "flask>=3.0,<4", "matplotlib>=3.8", "selenium>=4.20,<4.52"],
    },
    # Each command runs its tool's main() under dalle.cli.run: a user's mistake prints one line, not a traceback.
    entry_points={
        "console_scripts": [
            "dalle-make-shapes=dalle_tools.console:make_shapes",
            "dalle-make-shards=dalle_tools.console:make_shards",
            "dalle-train-dvae=dalle_tools.console:train_dvae",
            "dalle-eval-dvae=dalle_tools.console:eval_dvae",
            "dalle-train-bpe=dalle_tools.console:train_bpe",
            "dalle-pretokenize=dalle_tools.console:pretokenize",
            "dalle-train=dalle_tools.console:train_dalle",
            "dalle-estimate=dalle_tools.console:estimate",
            "dalle-train-reranker=dalle_tools.console:train_reranker",
            "dalle-bundle=dalle_tools.console:bundle",
            "dalle-eval-shapes=dalle_tools.console:eval_shapes",
            "dalle-eval-captions=dalle_tools.console:eval_captions",
            "dalle-eval-fid=dalle_tools.console:eval_fid",
            "dalle-export=dalle_tools.console:export",
            "dalle-bench-train=dalle_tools.console:bench_train",
            "dalle-feedback=dalle_tools.console:feedback",
            "dalle-train-feedback=dalle_tools.console:train_feedback",
            "dalle-eval-feedback=dalle_tools.console:eval_feedback",
            "dalle-plot-feedback=dalle_tools.console:plot_feedback",
            "dalle-feedback-loop=dalle_tools.console:feedback_loop",
            "dalle-train-all=dalle_tools.console:train_all",
        ]
    },
)
