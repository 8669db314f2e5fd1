# The GPU worker image: CUDA torch + the project with its worker extras.
FROM pytorch/pytorch:2.8.0-cuda12.8-cudnn9-runtime
WORKDIR /app
# g++ (and ninja, a worker extra): small-VRAM mode builds its CPU attention kernel at start-up (cpp_extension;
# inductor's C++ backend where that fails)
RUN apt-get update && apt-get install -y --no-install-recommends g++ && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml README.md ./
COPY jobs ./jobs
COPY producer ./producer
COPY worker ./worker
RUN pip install --no-cache-dir ".[worker,serve]" pynvml
ENV HF_HOME=/models/hf
ENTRYPOINT ["batchgen"]
CMD ["worker"]
