FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY schemas ./schemas
COPY fulfilment ./fulfilment
COPY tasks ./tasks
RUN pip install --no-cache-dir . && useradd --create-home fulfilment
USER fulfilment
CMD ["celery", "-A", "tasks", "worker", "-l", "INFO"]
