# One image for every service of docker-compose.yml except PostgreSQL: the study workers, the MLflow tracking
# server and optuna-dashboard, so that the server and its clients run the same MLflow and Optuna versions.
#
#   docker build -t optstudy .                                             # CPU-only torch (the default, ~1 GB)
#   docker build -t optstudy:cuda --build-arg TORCH_INDEX_URL= .           # CUDA torch from the default index
#   docker build -t optstudy:cu126 --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 .
#   docker run --rm optstudy optstudy study run studies/lr_sensitivity.yaml --n-trials 1 trainer.max_epochs=1
#
# torch: a plain `pip install torch` on Linux pulls the CUDA build (several GB of nvidia-* wheels) even where no GPU
# will ever be seen. TORCH_INDEX_URL picks the wheel index torch comes from: PyTorch's CPU index by default (small,
# enough for the CPU workers, MLflow and the dashboard), empty for the default index (its Linux wheels are CUDA
# builds), or a PyTorch CUDA index (.../whl/cu126, .../whl/cu128, ...) to match the hosts' driver. TORCH_VERSION is
# the version scripts/setup.sh pins. docker-compose.yml builds a CPU image for most services and a CUDA one for the
# `gpu` profile's worker.
FROM python:3.11-slim

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG APP_UID=1000

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# a non-root user; /mlartifacts is MLflow's artifact store (a named volume in docker-compose.yml: a fresh volume takes
# the ownership of the image's directory, so the server, running as this user, can write to it)
RUN useradd --create-home --uid "${APP_UID}" --shell /bin/bash optstudy \
 && mkdir -p /app /mlartifacts /data \
 && chown optstudy:optstudy /app /mlartifacts /data
WORKDIR /app

# torch first, from the chosen index, so that resolving the project below keeps it (as scripts/setup.sh does)
RUN pip install "torch==${TORCH_VERSION}" ${TORCH_INDEX_URL:+--index-url "${TORCH_INDEX_URL}"}

# the dependencies in a layer of their own (rebuilt only when pyproject.toml changes), from a stub package
COPY --chown=optstudy:optstudy pyproject.toml README.md ./
RUN mkdir -p src/optstudy && touch src/optstudy/__init__.py && pip install -e . && rm -rf src

# then the project itself, installed editable as the README does: the worker finds conf/ and train.py relative to its
# sources (ROOT = the repository root), which a non-editable install into site-packages would lose
COPY --chown=optstudy:optstudy . .
RUN pip install --no-deps -e . && optstudy --help >/dev/null && mlflow --version && optuna-dashboard --version

USER optstudy
ENV OPTSTUDY_DATA=/data
# a worker by default; docker-compose.yml gives each service its own command
CMD ["optstudy", "study", "run", "studies/lr_sensitivity.yaml"]
