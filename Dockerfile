# QLoRA Studio on a CUDA GPU server or as a Hugging Face Docker Space.
# The image pip-installs the package (pyproject.toml) with requirements.txt's pins, the versions CI tests;
# tests/test_docker_steps.py runs these same steps (user, paths, environment) outside a container.
# torch==2.13.0 from PyPI is the CUDA build on Linux and brings its own CUDA runtime; the host needs
# the NVIDIA driver and the container toolkit (`docker run --gpus all ...`).
FROM python:3.11-slim

RUN useradd --create-home --uid 1000 user \
    && mkdir -p /data \
    && chown user:user /data

USER 1000
WORKDIR /home/user/app
ENV PATH=/home/user/venv/bin:$PATH \
    STUDIO_TINY_MODEL_DIR=/home/user/models/tiny-mistral
COPY --chown=user:user . .
# The offline demo's tiny model is built into the image, so the demo starts at once and without a network.
RUN python -m venv /home/user/venv \
    && pip install --no-cache-dir -r requirements.txt . \
    && qlora-studio build-tiny

# Runs, uploads and presets live on the volume; the model cache is configurable (HF_HOME).
ENV STUDIO_HOME=/data/qlora-studio \
    HF_HOME=/data/hf-cache \
    STUDIO_HOST=0.0.0.0 \
    PORT=7860 \
    PYTHONUNBUFFERED=1
VOLUME ["/data"]
EXPOSE 7860

# Serving on 0.0.0.0 needs a password: set STUDIO_PASSWORD (a Space secret, or `docker run -e`).
CMD ["qlora-studio"]
