# QLoRA Studio on a CUDA GPU server or as a Hugging Face Docker Space.
# The install step is `make install`, the same command CI runs (through `make test`), so CI proves it.
# torch==2.13.0 from PyPI is the CUDA build on Linux and brings its own CUDA runtime; the host needs
# the NVIDIA driver and the container toolkit (`docker run --gpus all ...`).
FROM python:3.11-slim

RUN apt-get update \
    && apt-get install -y --no-install-recommends make=4.3-4.1 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 1000 user \
    && mkdir -p /data \
    && chown user:user /data

USER 1000
WORKDIR /home/user/app
COPY --chown=user:user . .
RUN make install

# Runs, uploads and presets live on the volume; the model cache is configurable (HF_HOME).
ENV STUDIO_HOME=/data/qlora-studio \
    HF_HOME=/data/hf-cache \
    STUDIO_HOST=0.0.0.0 \
    PORT=7860 \
    PYTHONUNBUFFERED=1
VOLUME ["/data"]
EXPOSE 7860

# Serving on 0.0.0.0 needs a password: set STUDIO_PASSWORD (a Space secret, or `docker run -e`).
CMD [".venv/bin/python", "app.py"]
