# The GPU worker image: CUDA torch + the project with its worker extras.
FROM pytorch/pytorch:2.8.0-cuda12.8-cudnn9-runtime
WORKDIR /app
COPY pyproject.toml README.md ./
COPY jobs ./jobs
COPY producer ./producer
COPY worker ./worker
RUN pip install --no-cache-dir ".[worker]" pynvml
ENV HF_HOME=/models/hf
ENTRYPOINT ["batchgen"]
CMD ["worker"]
