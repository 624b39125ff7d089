#!/bin/sh
# The container's install step (the Dockerfile runs it; CI runs it into a fresh virtual
# environment): torch from TORCH_INDEX when set (the CPU or a CUDA wheel index), then the
# package with its service extra.
#   docker/install.sh PYTHON [SOURCE]     e.g. docker/install.sh /opt/ldm/bin/python .
set -eu
PYTHON="$1"
SOURCE="${2:-.}"
PIP="$PYTHON -m pip --disable-pip-version-check --quiet"
if [ -n "${TORCH_INDEX:-}" ]; then
    $PIP install --index-url "$TORCH_INDEX" "torch<=2.14.1" "torchvision<=0.29.1"
fi
$PIP install "$SOURCE[serve]"
