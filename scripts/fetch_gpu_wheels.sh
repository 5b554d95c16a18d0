#!/usr/bin/env bash
# Download, here, the wheels the GPU machine's image lacks (Python 3.12, x86-64) into .whl/, for
# benchmarks/gpu_check.sh to install there (nothing can be fetched on that machine). The image
# already has torch, lightning, numpy, scipy, h5py, matplotlib, safetensors, tensorboard, tqdm,
# pyyaml, cloudpickle and pytest; these are the rest, each pinned to what the tests run here.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
PLAT=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
ver() { python3 -c "import importlib.metadata as m; print(m.version('$1'))"; }
# astropy is left out (13 MB with its data; only hpcvae.generate's FITS writer needs it): galsim's
# 56 MB already fills most of the 64 MiB a device call may carry.
for pkg in submitit fitsio webdataset wids braceexpand zuko galsim LSSTDESC.Coord tomli-w; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${PLAT[@]}" -d .whl "$pkg==$(ver "$pkg")"
done
ls -la .whl && du -sh .whl
