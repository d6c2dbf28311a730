# The GPU runner image: the GitHub Actions runner on CUDA 13.0 with cuDNN 9 (the toolkit too:
# the gate builds loragate with `--features cudnn`). Build and push it, then name it in
# deploy/arc/values-gpu.yaml:
#   docker build -f deploy/arc/runner.Dockerfile -t ghcr.io/OWNER/loragate-gpu-runner:cuda13.0-cudnn9 .
FROM nvidia/cuda:13.0.2-cudnn-devel-ubuntu24.04

ARG RUNNER_VERSION=2.330.0
RUN apt-get update && apt-get install -y --no-install-recommends \
        ca-certificates curl git git-lfs jq build-essential pkg-config libssl-dev python3 python3-venv nodejs \
    && rm -rf /var/lib/apt/lists/*
RUN useradd -m -u 1001 runner
WORKDIR /home/runner
RUN curl -fsSL -o runner.tar.gz \
        "https://github.com/actions/runner/releases/download/v${RUNNER_VERSION}/actions-runner-linux-x64-${RUNNER_VERSION}.tar.gz" \
    && tar xzf runner.tar.gz && rm runner.tar.gz && ./bin/installdependencies.sh \
    && chown -R runner:runner /home/runner
USER runner
ENV PATH=/usr/local/cuda/bin:$PATH LD_LIBRARY_PATH=/usr/local/cuda/lib64
