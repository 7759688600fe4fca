# CPU image of the triage daemon. State lives in the /data volume.
FROM python:3.11-slim

# 0.0.0.0 is beyond loopback: `serve` needs server.ssl_certfile/ssl_keyfile, or
# TRIAGE__SERVER__ALLOW_PLAIN_HTTP=true where the port is published on loopback only
# (as service/docker-compose.yml does).
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    TRIAGE_HOME=/data TRIAGE__SERVER__HOST=0.0.0.0

WORKDIR /opt/triage
# torch first, from the CPU index, pinned: nothing after it may pull a CUDA build.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md ./
COPY triage ./triage
RUN pip install . && useradd --system --uid 10001 --home /data triage \
    && mkdir -p /data /shared && chown triage /data /shared
COPY config.yaml /etc/triage/config.yaml

USER triage
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s \
    CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4).status != 200)"
CMD ["triage", "serve", "--config", "/etc/triage/config.yaml"]
