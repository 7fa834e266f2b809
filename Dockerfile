# shoal's container image: static binaries on distroless/static, non-root.
# Multi-arch with buildx:
#   docker buildx build --platform linux/amd64,linux/arm64 -t ghcr.io/shoal-oci/shoal:dev .
# Without a Docker daemon, test/image builds the same image as an OCI layout:
#   go run ./test/image -o shoal-image --platforms linux/amd64,linux/arm64
FROM --platform=$BUILDPLATFORM golang:1.26 AS build
ARG TARGETOS
ARG TARGETARCH
ARG VERSION=dev
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
RUN CGO_ENABLED=0 GOOS=$TARGETOS GOARCH=$TARGETARCH \
    go build -trimpath -ldflags "-s -w -X main.version=$VERSION" -o /out/shoal . && \
    CGO_ENABLED=0 GOOS=$TARGETOS GOARCH=$TARGETARCH \
    go build -trimpath -tags nocloud,nocache -ldflags "-s -w -X main.version=$VERSION" -o /out/shoal-node .

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /out/shoal /shoal
# The node DaemonSet runs /shoal-node: the same CLI without the object-storage
# SDKs (-tags nocloud) and without the cache tier (-tags nocache), which an
# idle node would otherwise carry in memory.
COPY --from=build /out/shoal-node /shoal-node
# The node DaemonSet overrides this with runAsUser 0 (containerd's socket is
# root-only); the cache and everything else run as 65532.
USER 65532:65532
EXPOSE 5000 5001 9090 9091
ENTRYPOINT ["/shoal"]
