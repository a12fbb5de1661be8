# syntax=docker/dockerfile:1
# bulkcall in a container: built in one stage, and only the release binary
# copied into a small non-root image (glibc and CA certificates, no shell).
#   docker build -t registry.example.com/bulkcall:0.1.0 .
# deploy/kubernetes/ runs it as an Indexed Job.

FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin bulkcall \
    && cp target/release/bulkcall /usr/local/bin/bulkcall

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /usr/local/bin/bulkcall /usr/local/bin/bulkcall
# 65532: the image's `nonroot` user; run directories are created 0700 for it.
USER 65532:65532
WORKDIR /data
ENTRYPOINT ["/usr/local/bin/bulkcall"]
CMD ["--help"]
