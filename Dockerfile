FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY schemas ./schemas
COPY fulfilment ./fulfilment
COPY tasks ./tasks
# run-service: exit 78 (a configuration error) is not restarted in a loop (docs/deploy).
COPY docs/deploy/run-service.sh /usr/local/bin/run-service
# The ops extra is Flower, which compose runs from this image (it needs our transport).
RUN pip install --no-cache-dir '.[ops]' && useradd --create-home fulfilment \
    && install -d -o fulfilment /results
USER fulfilment
# Each worker's Prometheus metrics (FULFILMENT_METRICS_PORT, /metrics).
EXPOSE 9650
# As the Procfile and compose run it: the threads pool, 16 slots, one process per core.
CMD ["run-service", "celery", "-A", "tasks", "worker", "-l", "INFO", "-P", "threads", "--concurrency", "16"]
