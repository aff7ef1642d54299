# syntax=docker/dockerfile:1
#
# Mosaic device gateway: one image holding both services,
#   /usr/local/bin/websocket-service  (listens on 0.0.0.0:8080)
#   /usr/local/bin/device-service     (listens on 0.0.0.0:8081)
# The Kubernetes manifests pick the binary with `command:`; the default CMD
# runs websocket-service. Every setting comes from the environment at run
# time (see k8s/settings.txt and docs/deployment.md); nothing secret is
# built into the image.
#
#   docker build -t mosaic-gateway:dev .        (BuildKit)
#   podman build -t mosaic-gateway:dev .        (or: buildah bud)
#
# Base images are build arguments so that a mirror or a digest-pinned
# reference can be used: --build-arg RUNTIME_IMAGE=...@sha256:...

ARG RUST_IMAGE=docker.io/library/rust:1.95-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot

# ---------------------------------------------------------------- build stage
FROM ${RUST_IMAGE} AS build
WORKDIR /src
COPY . .
# The cache mounts keep the crate registry and target/ between builds; the
# binaries are copied out of the cached target/ in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked -p websocket-service -p device-service \
 && mkdir -p /out \
 && cp target/release/websocket-service target/release/device-service /out/

# -------------------------------------------------------------- runtime stage
# distroless "cc": glibc, libgcc, CA certificates and tzdata from Debian 12,
# the same glibc as the bookworm builder; no shell, no package manager.
FROM ${RUNTIME_IMAGE}
LABEL org.opencontainers.image.title="mosaic-gateway" \
      org.opencontainers.image.description="Mosaic device gateway: websocket-service and device-service" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /out/websocket-service /out/device-service /usr/local/bin/
# Numeric non-root user (distroless "nonroot"), so runAsNonRoot can verify it.
USER 65532:65532
EXPOSE 8080 8081
CMD ["/usr/local/bin/websocket-service"]
