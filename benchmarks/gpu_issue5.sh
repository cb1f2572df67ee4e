#!/usr/bin/env bash
# The GPU half of issue 5 as one prepared command for a lent GPU (the `device` tool's `run`), written while no GPU was
# lent: it has not run yet. It writes everything under $OUT (or ./gpu_out when OUT is unset).
#
# Before the call, here: copy the Omniglot zips into an ignored folder that travels, and fetch the peers as wheels
# for the device's Python 3.12 (the device image has torch 2.11, no higher/TorchOpt/learn2learn, and no network):
#   echo /.gpu/ >> .git/info/exclude && mkdir -p .gpu/data/omniglot && cp ../shared/data/omniglot/*.zip .gpu/data/omniglot/
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .gpu/whl higher torchopt optree
# then: run(command="bash benchmarks/gpu_issue5.sh", carry=[".gpu"], timeout_s=540)
set -uo pipefail
out=${OUT:-gpu_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 METAFUNC_DATA=$PWD/.gpu/data
if ls .gpu/whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/device.txt"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee -a "$out/device.txt"
# 1. correctness on the GPU: the CUDA-graph test, and the float64 gradient checks with CUDA tensors where they apply
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_compiled.py tests/test_fast_paths.py 2>&1 \
  | tee "$out/tests.log" | tail -3
# 2. the peer table at 32 tasks (and 4, 16), second-order MAML, one inner step, with peak memory
timeout 240 python3 benchmarks/peers.py --device cuda --configs maml2-1 --meta-batch 4 16 32 --rounds 5 --memory \
  --impls metafunc metafunc:vmap metafunc:compiled metafunc:compiled-cudagraphs plain higher torchopt \
  --json "$out/peers_cuda.json" --markdown 2>"$out/peers.err" | tee "$out/peers_cuda.md"
# 3. where the time goes and the FLOP floor against this GPU's float32 peak; throughput on real Omniglot episodes
timeout 60 python3 benchmarks/profile_meta_step.py --device cuda --meta-batch 32 2>&1 | tee "$out/profile_cuda.txt"
timeout 60 python3 benchmarks/omniglot_throughput.py --device cuda --steps 20 --meta-batch 32 2>&1 \
  | grep '^device' | tee "$out/omniglot_cuda.txt"
