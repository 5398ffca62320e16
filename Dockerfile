# Two images from one file: the slim API image and the worker image (adds the engine's ML stack).
FROM python:3.11-slim AS api
WORKDIR /app
COPY pyproject.toml README.md alembic.ini ./
COPY gradtune ./gradtune
COPY service ./service
COPY worker ./worker
COPY migrations ./migrations
# [api]: numpy, pyarrow and boto3 to check and store uploaded datasets (no torch).
RUN pip install --no-cache-dir ".[api]"
EXPOSE 8000
CMD ["uvicorn", "--factory", "service.main:create_app", "--host", "0.0.0.0", "--port", "8000"]

FROM api AS worker
# CPU wheel by default; for GPUs build with --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu124
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN pip install --no-cache-dir --index-url ${TORCH_INDEX} "torch==2.13.0" \
 && pip install --no-cache-dir ".[worker]"
CMD ["gradtune", "worker"]
