# charlstm: the text-generation service on the bundled model. One uvicorn process, non-root.
#
#   docker build -t charlstm .                                   # the full install: every backend, CUDA
#   docker build --build-arg EXTRAS= -t charlstm:serve .         # the serving install: no torch (README)
#   docker run --rm -p 8000:8000 charlstm            # then: curl localhost:8000/health
#
# torch comes from the PyTorch CPU wheel index (TORCH_INDEX_URL), or from a wheel placed in
# .docker-wheels/ (then build with --build-arg TORCH_INDEX_URL= to skip the index).
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS build
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# "torch": the full install; empty: the serving install (ONNX Runtime and numpy, no torch)
ARG EXTRAS=torch
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY .docker-wheels/ /wheels/
RUN python3 -m venv /opt/venv
COPY pyproject.toml constraints.txt README.md ./
RUN if [ -n "$EXTRAS" ]; then extra=""; if [ -n "$TORCH_INDEX_URL" ]; then extra="--extra-index-url $TORCH_INDEX_URL"; fi; \
    /opt/venv/bin/pip install --find-links /wheels $extra -c constraints.txt "torch==2.13.0"; fi
COPY service/ service/
RUN /opt/venv/bin/pip install --find-links /wheels -c constraints.txt ".${EXTRAS:+[$EXTRAS]}" \
 && /opt/venv/bin/pip uninstall -q -y pip setuptools \
 && find /opt/venv -name '__pycache__' -prune -exec rm -rf {} + \
 && rm -rf /opt/venv/lib/python3*/site-packages/torch/include /opt/venv/lib/python3*/site-packages/torch/share/cmake \
          /opt/venv/lib/python3*/site-packages/torch/test

FROM ${BASE_IMAGE}
RUN (getent passwd charlstm >/dev/null || useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin charlstm) \
 && mkdir -p /app && chown charlstm /app
COPY --from=build /opt/venv /opt/venv
COPY model_store/ /app/model_store/
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    CHARLSTM_HOST=0.0.0.0 \
    CHARLSTM_PORT=8000 \
    CHARLSTM_MODEL_STORE=/app/model_store \
    CHARLSTM_SESSION_DB=/app/data/sessions.sqlite3
WORKDIR /app
USER charlstm
EXPOSE 8000
HEALTHCHECK --interval=5s --timeout=3s --start-period=30s --retries=3 \
  CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('CHARLSTM_PORT', '8000'), timeout=2)"]
CMD ["charlstm", "serve"]
