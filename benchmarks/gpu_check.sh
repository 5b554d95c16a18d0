#!/usr/bin/env bash
# The one prepared device check: every GPU figure in a single run, sized for a 15-minute H100/H200 budget
# (timing about 6 minutes, the science about 5: rendering 20,000 galaxies on the CPU cores dominates it).
#
#   bash benchmarks/gpu_check.sh [--out DIR]                  on the GPU machine, from a bare image
#   bash benchmarks/gpu_check.sh --cpu-rehearsal [--out DIR]  the same steps on CPU at tiny sizes
#
# (0) installs what the GPU image lacks from carried wheels in .whl/ (scripts/fetch_gpu_wheels.sh
#     downloads them: submitit, fitsio, webdataset, zuko, galsim, ... for Python 3.12);
# (a) runs tests/test_gpu.py on the device: CUDA + NCCL at world size 1, bf16 + channels_last,
#     fp16 with loss scaling and a forced overflow, compile, the GPU-resident loader's mid-epoch resume;
# (b) times cvae2 at 158² (the seed's sizes) at batch 64 and 256: the seed's loop, Lightning, ours
#     fp32, bf16 + channels_last, + compile, + GPU-resident; s/epoch for 81,499 galaxies, img/s, MFU
#     against 989 TFLOP/s and against a matmul measured in the same run;
# (c) writes benchmarks/results/epoch_time-<device>-<date>-b64/-b256.{md,json} and the test log;
# (d) the science at a size no CPU run reaches: the recommended recipe (galaxy_film, default width) on
#     20,000 COSMOS-like galaxies at 128² (about 5 minutes), judged like benchmarks.generalize on CPU;
# (e) catalog-to-stamp generation speed and fidelity (benchmarks.generate) with that model.
# The rehearsal runs in CI (tests/test_benchmarks.py), so the script is known to work before a GPU is.
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=gpu
OUT=benchmarks/results
while [ $# -gt 0 ]; do
    case "$1" in
        --cpu-rehearsal) MODE=cpu ;;
        --out) OUT=$2; shift ;;
        *) echo "gpu_check.sh: error: unknown argument $1 (use --cpu-rehearsal, --out DIR)" >&2; exit 2 ;;
    esac
    shift
done
T0=$(date +%s)
if [ "$MODE" = gpu ] && compgen -G ".whl/*.whl" >/dev/null; then
    echo "[gpu_check] installing $(ls .whl/*.whl | wc -l) carried wheels"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -c "import hpcvae, submitit, fitsio, zuko, galsim, lightning" 2>/dev/null || {
    echo "gpu_check.sh: error: a dependency is missing; run scripts/fetch_gpu_wheels.sh here and carry .whl" >&2
    exit 2
}
if [ "$MODE" = gpu ]; then
    python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || {
        echo "gpu_check.sh: error: no CUDA device visible (use --cpu-rehearsal on a CPU machine)" >&2
        exit 2
    }
    DEVICE=cuda
else
    DEVICE=cpu
    export DS_ACCELERATOR=cpu
fi
export HPCVAE_TEST_DEVICE=$DEVICE
mkdir -p "$OUT"
STAMP=$(date +%F)

echo "[gpu_check] (a) GPU tests on $DEVICE"
python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/test_gpu.py 2>&1 | tee "$OUT/gpu_tests-$DEVICE-$STAMP.txt"

echo "[gpu_check] (b) epoch timing"
VARIANTS=(--archs cvae2 --precisions auto --options auto
          --extra cvae2:ddp:fp32:none
          --extra cvae2:ddp:bf16:channels_last
          --extra cvae2:ddp:bf16:channels_last+compile
          --extra cvae2:ddp:bf16:channels_last+compile+resident)
if [ "$MODE" = gpu ]; then
    for B in 64 256; do
        python3 -m benchmarks.epoch_time "${VARIANTS[@]}" --batch-size $B --steps 40 --warmup 5 \
            --num-workers 4 --rounds 2 --tag "b$B" --out "$OUT"
    done
else
    # tiny: debug widths at 158² so the seed's fixed modules run beside ours; no compile (minutes on CPU)
    python3 -m benchmarks.epoch_time --smoke --profile --extra cvae2:ddp:fp32:none --extra cvae2:ddp:auto:auto \
        --extra cvae2:ddp:bf16:channels_last+resident --tag rehearsal --out "$OUT"
fi
echo "[gpu_check] (d) science: galaxy_film on COSMOS-like galaxies"
SCI=$(mktemp -d "${TMPDIR:-/tmp}/hpcvae-gpu-science.XXXXXX")
if [ "$MODE" = gpu ]; then
    python3 -m benchmarks.generalize --sets cosmos --recipes galaxy_film --n 20000 --size 128 --epochs 12 \
        --batch-size 64 --flavour default --device cuda --prior-epochs 30 --jobs 1 --work "$SCI" --out "$OUT"
else
    python3 -m benchmarks.generalize --sets cosmos --recipes galaxy_film --n 48 --size 32 --epochs 1 \
        --prior-epochs 2 --jobs 1 --work "$SCI" --tag rehearsal --out "$OUT" \
        --eval-extra "--morph-n 4 --n-boot 20 --response-latents 2 --grid-size 2 --sweep-rows 1"
fi
echo "[gpu_check] (e) generation from a catalog"
python3 -m benchmarks.generate --model "$SCI/runs/cosmos-galaxy_film" --n $([ "$MODE" = gpu ] && echo 1000 || echo 8) \
    --truth "$SCI/cosmos$([ "$MODE" = gpu ] && echo 128 || echo 32)/real_galaxy_catalog_synth_fits.fits" \
    --n-fidelity $([ "$MODE" = gpu ] && echo 1000 || echo 16) --tag "$MODE" --out "$OUT"
echo "[gpu_check] done in $(( $(date +%s) - T0 )) s; results in $OUT"
