# dongne: one process, one SQLite file in /data.
#   docker build -t dongne .
#   docker run -p 8765:8765 -p 8766:8766 -v dongne-data:/data -e DONGNE_JWT_SECRET=... dongne
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    DONGNE_SERVER_HOST=0.0.0.0 \
    DONGNE_SERVER_OPS_HOST=0.0.0.0 \
    DONGNE_STORE_PATH=/data/dongne.sqlite3

RUN useradd --system --create-home --home-dir /home/dongne --uid 10001 dongne \
    && mkdir -p /data && chown dongne:dongne /data

WORKDIR /app
COPY pyproject.toml README.md LICENSE ./
COPY dongne ./dongne
RUN pip install . && rm -rf /root/.cache

USER dongne
VOLUME ["/data"]
EXPOSE 8765 8766

HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8766/health', timeout=2).status == 200 else 1)"

# SIGTERM (docker stop) shuts down gracefully within [server] shutdown_timeout_s.
STOPSIGNAL SIGTERM
CMD ["dongne", "serve"]
