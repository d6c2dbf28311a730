# The GPU runner image with loragate's released CUDA binary: the actions runner on the CUDA 13.0
# runtime with cuDNN 9, and `loragate` on the PATH, so the action's jobs need no build and no
# toolkit. .github/workflows/release.yml builds it with the release's binary
# (docker build --build-arg LORAGATE_ASSET=dist/loragate-cuda-x86_64-linux.tar.gz) and pushes it
# to ghcr.io/<owner>/loragate-gpu-runner:<version>; name it in deploy/arc/values-gpu.yaml.
# (runner.Dockerfile beside it has the whole toolkit, for building loragate on the runner.)
FROM nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04

ARG RUNNER_VERSION=2.330.0
ARG LORAGATE_ASSET=dist/loragate-cuda-x86_64-linux.tar.gz
RUN apt-get update && apt-get install -y --no-install-recommends \
        ca-certificates curl git git-lfs jq \
    && rm -rf /var/lib/apt/lists/*
RUN useradd -m -u 1001 runner
WORKDIR /home/runner
RUN curl -fsSL -o runner.tar.gz \
        "https://github.com/actions/runner/releases/download/v${RUNNER_VERSION}/actions-runner-linux-x64-${RUNNER_VERSION}.tar.gz" \
    && tar xzf runner.tar.gz && rm runner.tar.gz && ./bin/installdependencies.sh \
    && chown -R runner:runner /home/runner
COPY ${LORAGATE_ASSET} /tmp/loragate.tar.gz
RUN tar -xzf /tmp/loragate.tar.gz -C /usr/local/bin loragate && rm /tmp/loragate.tar.gz && loragate --version
USER runner
ENV LD_LIBRARY_PATH=/usr/local/cuda/lib64
