# One image for api, worker, psp and migrate (docker-compose.yml picks the command).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DATA_DIR=/data

WORKDIR /app
# dependencies first, so a code change does not reinstall them
COPY pyproject.toml ./
RUN mkdir -p api workflows activities domain core psp \
    && touch cli.py worker.py \
    && pip install . \
    && pip uninstall -y paysaga
COPY cli.py worker.py ./
COPY api ./api
COPY workflows ./workflows
COPY activities ./activities
COPY domain ./domain
COPY core ./core
COPY psp ./psp
RUN pip install --no-deps . \
    && useradd --system --uid 10001 --home-dir /app paysaga \
    && mkdir -p /data && chown paysaga /data

USER paysaga
EXPOSE 8000 8100
CMD ["paysaga", "api"]
