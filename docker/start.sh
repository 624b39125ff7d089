#!/bin/sh
# The container's start step: serve LDM_CHECKPOINT on 0.0.0.0:LDM_PORT, LoRA files from
# LDM_ADAPTERS, a bearer token from LDM_TOKEN_FILE when set. Further arguments are
# python -m ldm.serve overrides (e.g. max_batch=16 device=cuda).
set -eu
exec "${PYTHON:-python}" -m ldm.serve \
    checkpoint="${LDM_CHECKPOINT:-/models/model.ckpt}" \
    adapters_dir="${LDM_ADAPTERS:-/adapters}" \
    host="${LDM_HOST:-0.0.0.0}" port="${LDM_PORT:-8000}" \
    ${LDM_TOKEN_FILE:+token_file="$LDM_TOKEN_FILE"} \
    "$@"
