#!/usr/bin/env bash
# The device check in one command (see bench/gpu_check.py for the steps):
#   bash bench/gpu_check.sh          # on the GPU machine, <= 8 minutes; summary in $OUT (./gpu_check_out)
#   bash bench/gpu_check.sh --dry    # on a CPU machine: every step that needs no CUDA
#
# The GPU machine reaches no package registry. Optional rows run when their wheels came along in
# bench/wheels/ (git-ignored; pass it as a carried path, 64 MiB per call at most). Fetch them on a
# machine that can download (sizes for these versions: 41.8 MiB in all):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --platform manylinux_2_24_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 -d bench/wheels \
#     bitsandbytes==0.50.0 hjson py-cpuinfo msgpack ninja einops
#       # bitsandbytes 39.0 MiB (QLoRA rows); hjson, py-cpuinfo, msgpack, ninja, einops 0.8 MiB (deepspeed's)
#   DS_BUILD_OPS=0 pip wheel --no-deps --no-build-isolation deepspeed==0.19.8 -w bench/wheels
#       # deepspeed 2.1 MiB (published as a source archive only: built here into a py3-none-any wheel)
# They are installed into /tmp/tokentune-site (no index, no deps) and put on PYTHONPATH.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [[ " $* " != *" --dry "* ]] && compgen -G "bench/wheels/*.whl" > /dev/null; then
  site=/tmp/tokentune-site
  python -m pip install --quiet --no-index --no-deps --target "$site" bench/wheels/*.whl
  export PYTHONPATH="$PYTHONPATH:$site"
fi
exec python bench/gpu_check.py "$@"
