#!/usr/bin/env bash
# Fetches, on a machine with a package index, the wheels that benchmarks/gpu_check.sh installs
# on the GPU machine: its image (Python 3.12, jax, flax, optax, orbax, torch, timm) lacks these
# and reaches no index. Versions are those of our own environment; what the image already
# holds (absl-py, etils, numpy, protobuf, PyYAML, torch, torchvision, timm, regex, tqdm,
# huggingface_hub, safetensors, attrs, wrapt, ...) is left out.
#
#   bash benchmarks/gpu_wheels.sh [DEST]      # default build/gpu_wheels (git-ignored)
#
# Then copy DEST to the GPU machine with the checkout.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST="${1:-build/gpu_wheels}"
PYTHON="${PYTHON:-python3}"
LIMIT_MIB=48  # the wheels travel with the checkout: more than this is refused

WHEELS=(
  ml_collections==1.1.0                                    # configs
  open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4        # the reference
  grain==0.2.18 array_record==0.8.6 portpicker==1.6.0      # data loading
  tensorflow-datasets==4.9.10 dm-tree==0.1.10 immutabledict==4.3.1 simple-parsing==0.1.9
  docstring-parser==0.18.0 tensorflow-metadata==1.21.0 googleapis-common-protos==1.76.0
  termcolor==3.3.0 toml==0.10.2                            # TFDS evaluation sources
)
SOURCE_ONLY=(promise==2.3)  # pure Python, published as a source archive only: built into a wheel here

mkdir -p "$DEST"
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DEST" "${WHEELS[@]}"
"$PYTHON" -m pip wheel --quiet --no-deps -w "$DEST" "${SOURCE_ONLY[@]}"

size_mib=$(( $(du -sk "$DEST" | cut -f1) / 1024 ))
ls -1 "$DEST"
echo "$DEST: $(ls "$DEST"/*.whl | wc -l) wheels, ${size_mib} MiB"
if (( size_mib > LIMIT_MIB )); then
  echo "$DEST holds ${size_mib} MiB, over the ${LIMIT_MIB} MiB allowed for wheels that travel with the checkout" >&2
  exit 1
fi
