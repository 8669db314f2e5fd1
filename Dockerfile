# The GPU worker image: CUDA torch + the project with its worker extras.
FROM pytorch/pytorch:2.8.0-cuda12.8-cudnn9-runtime
WORKDIR /app
# g++: small-VRAM mode compiles its CPU attention kernel with inductor's C++ backend at start-up
RUN apt-get update && apt-get install -y --no-install-recommends g++ && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml README.md ./
COPY jobs ./jobs
COPY producer ./producer
COPY worker ./worker
RUN pip install --no-cache-dir ".[worker]" pynvml
ENV HF_HOME=/models/hf
ENTRYPOINT ["batchgen"]
CMD ["worker"]
