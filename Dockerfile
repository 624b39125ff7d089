# The generation service (docs/serving.md). CPU by default; for NVIDIA GPUs build with a
# CUDA wheel index and run with --gpus all:
#   docker build -t ldm-serve .
#   docker build -t ldm-serve:cuda --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .
ARG PYTHON_VERSION=3.11
FROM python:${PYTHON_VERSION}-slim

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 PATH=/opt/ldm/bin:$PATH

WORKDIR /src
COPY pyproject.toml README.md ./
COPY conf conf
COPY ldm ldm
COPY docker docker
RUN python -m venv /opt/ldm \
    && TORCH_INDEX="$TORCH_INDEX" sh docker/install.sh /opt/ldm/bin/python /src \
    && install -m 755 docker/start.sh /usr/local/bin/ldm-start \
    && rm -rf /src \
    && useradd --create-home --uid 10001 ldm

USER ldm
WORKDIR /home/ldm
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=4)"]
ENTRYPOINT ["ldm-start"]
