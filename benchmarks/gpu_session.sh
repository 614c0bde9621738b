#!/usr/bin/env bash
# The GPU measurements the performance issue still needs, as one prepared script for a session that is
# lent a GPU machine (the `device` tool: no network there, about 15 minutes of device time in all).
#
#   device run:  bash benchmarks/gpu_session.sh          (results land in $OUT, or benchmarks/results/)
#   dry run on a CPU, tiny sizes, 4 to 9 minutes on 2 cores:  QUICK=1 OUT=/tmp/gpu_dry bash benchmarks/gpu_session.sh
#
# It needs only what the GPU image already has (python3 with torch, transformers, peft, pandas): the
# models are built from benchmarks/configs with random weights (round_time.py --weights random), so no
# model wheel has to travel; time and memory per step do not depend on the weights' values.
# The image's transformers (5.17 when last read) and peft are older than constraints.txt's, so the
# pinned ones travel as wheels: before the device call, once, here in the repository's root
# (.whl/ is ignored by git),
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl transformers==5.23.0 peft==0.21.2
# and name .whl in the call's carry; this script installs them (--target /tmp/site) when .whl exists.
# Checked on CPU against the image's versions (torch 2.11.0, huggingface_hub 1.33.0, tokenizers
# 0.23.2, safetensors 0.8.0, accelerate 1.15.0, no datasets) with QUICK=1.
# Measured on the way (each writes JSON with its provenance):
#   1. the engine against the sequential loop at K = 4, 16, 64, 256, batch 16 x 64 tokens, with the
#      equivalence check on this device: the target is >= 10x at K = 64, and K = 256 must run (the
#      engine halves its pass on out-of-memory; the JSON's batched_clients_per_pass says what ran);
#   2. the same at the gpu profile's 32 x 128 tokens and 10 local steps;
#   3. the embedded decoder's architecture (SmolLM2-135M) at K = 4, 16, 64;
#   4. the factored SVD against the dense one.
# Copy the JSON files into benchmarks/results/ and record them in README's benchmark table.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
out=${OUT:-benchmarks/results}
mkdir -p "$out"
python=${PYTHON:-python3}
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    site=${WHEEL_SITE:-/tmp/site}
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl \
        || { echo "== FAILED: installing the carried wheels in .whl"; exit 1; }
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
if [ "${QUICK:-0}" = 1 ]; then
    ks=(2 4); decoder_ks=(2); steps=1; gpu_steps=1; repeats=1; svd=(--quick --repeats 1)
else
    ks=(4 16 64 256); decoder_ks=(4 16 64); steps=5; gpu_steps=10; repeats=3; svd=()
fi
status=0
step() {  # run one measurement; a failure is reported and the others still run
    echo "== $*"
    "$@" || { echo "== FAILED ($?): $*"; status=1; }
}
"$python" -c "from fedlora_edu import describe_environment; print(describe_environment())"
step "$python" benchmarks/round_time.py --weights random --check --k "${ks[@]}" --steps "$steps" \
    --batch-size 16 --max-length 64 --repeats "$repeats" --output "$out/round_time_gpu_b16_l64.json"
step "$python" benchmarks/round_time.py --weights random --check --k "${ks[@]}" --steps "$gpu_steps" \
    --batch-size 32 --max-length 128 --repeats "$repeats" --output "$out/round_time_gpu_profile.json"
step "$python" benchmarks/round_time.py --weights random --model decoder --check --k "${decoder_ks[@]}" \
    --steps "$steps" --batch-size 16 --max-length 64 --repeats "$repeats" --output "$out/round_time_gpu_decoder.json"
step "$python" benchmarks/svd.py "${svd[@]}" --output "$out/svd_gpu.json"
exit $status
