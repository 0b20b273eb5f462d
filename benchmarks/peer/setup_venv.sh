#!/usr/bin/env bash
# Builds the venv that `tools/bench.py --compare-peer` runs the peer (DALLE-pytorch 1.6.6) in. The peer
# is never a dependency of this package: it lives in its own venv, outside the repository.
#
#   bash benchmarks/peer/setup_venv.sh [VENV]          # default VENV: ~/.cache/dalle-peer-venv
#
# `pip install dalle-pytorch==1.6.6` fails as published (its tokenizer dependency youtokentome needs Cython
# to build, and nothing the benchmark uses imports it), so the package goes in without dependencies plus
# what its import needs, with setuptools < 81 (it imports pkg_resources) and pytorch-lightning 1.9.5 (its
# taming import uses an API that lightning 2.x removed). The venv sees this interpreter's torch
# (--system-site-packages), so both sides run the same torch build.
set -euo pipefail
case "${1:-}" in  # one optional argument, a path: an option is a question or a mistake, never a venv's name
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "setup_venv.sh takes one optional argument, the venv's path (got: $1)" >&2; exit 2 ;;
esac
VENV=${1:-$HOME/.cache/dalle-peer-venv}
python3 -m venv --system-site-packages "$VENV"
"$VENV/bin/pip" install -q --no-deps dalle-pytorch==1.6.6
"$VENV/bin/pip" install -q axial-positional-embedding 'einops>=0.3.2' rotary-embedding-torch \
    taming-transformers-rom1504 requests pyyaml tqdm packaging 'setuptools<81' 'pytorch-lightning==1.9.5'
"$VENV/bin/python" -c "import dalle_pytorch, torch; print('peer venv ready:', torch.__version__)" 2>/dev/null
echo "run: python tools/bench.py --compare-peer --peer-python $VENV/bin/python"
