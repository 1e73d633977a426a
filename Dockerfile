# trm with its CUDA kernels compiled by the image's nvcc (CUDA 13.0, sm_90a).
#
#   docker build -t trm .
#   docker run --gpus all --rm trm --help
#   docker build --target torchrun -t trm:torchrun .   # with torchrun (deploy/k8s)
#
# Build stage: CUDA 13.0 toolkit + Rust; the runtime stage keeps only the
# binary (the cubins are embedded in it) on the CUDA runtime image.
FROM nvidia/cuda:13.0.0-devel-ubuntu24.04 AS build

RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential ca-certificates curl \
 && rm -rf /var/lib/apt/lists/*

ARG RUST_VERSION=1.95.0
ENV RUSTUP_HOME=/usr/local/rustup \
    CARGO_HOME=/usr/local/cargo \
    PATH=/usr/local/cargo/bin:$PATH
RUN curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs \
    | sh -s -- -y --no-modify-path --profile minimal --default-toolchain "${RUST_VERSION}"

WORKDIR /src
COPY . .
# build.rs compiles kernels/*.cu with this nvcc and fails on any error,
# warning or register spill.
ENV NVCC=/usr/local/cuda/bin/nvcc
RUN cargo build --release --locked \
 && install -m 755 target/release/trm /usr/local/bin/trm

# The same binary plus torchrun (a CPU-only PyTorch, used only as the
# launcher: `torchrun --no-python trm train ...`), for deploy/k8s:
#   docker build --target torchrun -t trm:torchrun .
FROM nvidia/cuda:13.0.0-runtime-ubuntu24.04 AS torchrun
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/torchrun \
 && /opt/torchrun/bin/pip install --no-cache-dir \
      --index-url https://download.pytorch.org/whl/cpu "torch==2.9.*"
ENV PATH=/opt/torchrun/bin:$PATH
COPY --from=build /usr/local/bin/trm /usr/local/bin/trm
WORKDIR /work
ENTRYPOINT ["/usr/local/bin/trm"]

# The default image: the binary on the CUDA runtime.
FROM nvidia/cuda:13.0.0-runtime-ubuntu24.04
COPY --from=build /usr/local/bin/trm /usr/local/bin/trm
WORKDIR /work
ENTRYPOINT ["/usr/local/bin/trm"]
