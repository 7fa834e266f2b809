#!/usr/bin/env bash
# Installs everything the test suite needs and prints nothing else but progress.
# Binaries are cached under $SHOAL_TEST_CACHE (default ~/.cache/shoal-test), keyed by version,
# so a second run costs seconds. Safe to run repeatedly.
set -euo pipefail

CACHE=${SHOAL_TEST_CACHE:-$HOME/.cache/shoal-test}
BIN=$CACHE/bin
mkdir -p "$BIN"

CONTAINERD_V2=${CONTAINERD_V2:-v2.4.2}
CONTAINERD_V1=${CONTAINERD_V1:-v1.7.29}
CRANE_V=v0.22.1
ORAS_V=v1.3.6
REGCTL_V=v0.11.7
CONFORMANCE_V=v0.0.0-20260831232431-97274622c111
HELM_V=v3.22.0
ETCD_V=v3.6.5
KUBE_V=v1.35.0
COREDNS_V=v1.15.0
# SeaweedFS: the module proxy serves this one pseudo-version (no tags).
WEED_V=v0.0.0-20261109003541-7506e5f91cd6

log() { echo "[install] $*" >&2; }

apt_pkgs=()
command -v redis-server >/dev/null || apt_pkgs+=(redis-server)
command -v redis-sentinel >/dev/null || apt_pkgs+=(redis-sentinel)
command -v prometheus >/dev/null || apt_pkgs+=(prometheus)
command -v nginx >/dev/null || apt_pkgs+=(nginx-light)
command -v ip >/dev/null || apt_pkgs+=(iproute2)
# The kubelet cluster test: runc, the CNI plugins, and iptables for kube-proxy.
command -v runc >/dev/null || apt_pkgs+=(runc)
[[ -x /usr/lib/cni/bridge ]] || apt_pkgs+=(containernetworking-plugins)
command -v iptables >/dev/null || apt_pkgs+=(iptables)
command -v conntrack >/dev/null || apt_pkgs+=(conntrack)
[[ -f /etc/ssl/certs/ca-certificates.crt ]] || apt_pkgs+=(ca-certificates)
if ((${#apt_pkgs[@]})); then
  log "apt-get install ${apt_pkgs[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null || true
  apt-get install -y -qq --no-install-recommends "${apt_pkgs[@]}" >/dev/null
  # The Debian packages start services by default on some images; tests start their own.
  systemctl stop redis-server redis-sentinel prometheus nginx >/dev/null 2>&1 || true
fi

gobin() { # name version pkg...
  local name=$1 ver=$2; shift 2
  local dir=$BIN/$name-$ver
  if [[ ! -x $dir/.done ]]; then
    log "building $name $ver"
    mkdir -p "$dir"
    GOBIN=$dir GOFLAGS= go install "$@"
    touch "$dir/.done"; chmod +x "$dir/.done"
  fi
}

gobin containerd "$CONTAINERD_V2" \
  "github.com/containerd/containerd/v2/cmd/containerd@$CONTAINERD_V2" \
  "github.com/containerd/containerd/v2/cmd/ctr@$CONTAINERD_V2"
# The kubelet cluster's containerd runs containers: it needs the runc shim.
gobin containerd-shim "$CONTAINERD_V2" \
  "github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2@$CONTAINERD_V2"

# wrapbuild name version module@version package: builds a main package of a
# module that `go install` refuses (exclude or replace directives) through a
# throwaway wrapper module, into $BIN/name-version/name.
wrapbuild() {
  local name=$1 ver=$2 mod=$3 pkg=$4 dir=$BIN/$1-$2 w
  [[ -x $dir/.done ]] && return 0
  log "building $name $ver (wrapper module)"
  w=$(mktemp -d)
  (cd "$w" && go mod init "shoal-wrap-$name" >/dev/null 2>&1 &&
    GOFLAGS=-mod=mod go get "$mod" >/dev/null 2>&1 &&
    mkdir -p "$dir" && GOFLAGS=-mod=mod go build -o "$dir/$name" "$pkg")
  rm -rf "$w"
  touch "$dir/.done"; chmod +x "$dir/.done"
}

# containerd 1.7 refuses `go install` because of exclude directives.
d1=$BIN/containerd-$CONTAINERD_V1
wrapbuild containerd "$CONTAINERD_V1" "github.com/containerd/containerd@$CONTAINERD_V1" github.com/containerd/containerd/cmd/containerd

gobin crane "$CRANE_V" "github.com/google/go-containerregistry/cmd/crane@$CRANE_V"
gobin oras "$ORAS_V" "oras.land/oras/cmd/oras@$ORAS_V"
gobin regctl "$REGCTL_V" "github.com/regclient/regclient/cmd/regctl@$REGCTL_V"

dc=$BIN/conformance-$CONFORMANCE_V
if [[ ! -x $dc/.done ]]; then
  log "building distribution-spec conformance $CONFORMANCE_V"
  src=$(GOFLAGS= go mod download -json "github.com/opencontainers/distribution-spec/conformance@$CONFORMANCE_V" | sed -n 's/.*"Dir": "\(.*\)".*/\1/p')
  mkdir -p "$dc"
  (cd "$src" && GOFLAGS=-mod=mod go test -c -o "$dc/conformance.test" .)
  touch "$dc/.done"; chmod +x "$dc/.done"
fi

# The chart tests: helm, and a real etcd + kube-apiserver (no kubelet) built
# from the module proxy through wrapper modules. kube-apiserver takes ~6 min cold.
gobin helm "$HELM_V" "helm.sh/helm/v3/cmd/helm@$HELM_V"

de=$BIN/etcd-$ETCD_V
wrapbuild etcd "$ETCD_V" "go.etcd.io/etcd/server/v3@$ETCD_V" go.etcd.io/etcd/server/v3

# kubebuild name pkg...: builds k8s.io/kubernetes commands at $KUBE_V into
# $BIN/name-$KUBE_V through a wrapper module (its go.mod pins every staging
# module, which `go install` cannot).
kubebuild() {
  local name=$1 dir=$BIN/$1-$KUBE_V w sv minor ldf m; shift
  [[ -x $dir/.done ]] && return 0
  log "building $name $KUBE_V: ${*##*/} (wrapper module)"
  w=$(mktemp -d)
  sv=v0.${KUBE_V#v1.}
  {
    echo "module shoal-wrap-kube"
    echo "go 1.25"
    echo "require k8s.io/kubernetes $KUBE_V"
    echo "replace ("
    for m in api apiextensions-apiserver apimachinery apiserver cli-runtime client-go cloud-provider \
      cluster-bootstrap code-generator component-base component-helpers controller-manager cri-api \
      cri-client csi-translation-lib dynamic-resource-allocation endpointslice externaljwt kms \
      kube-aggregator kube-controller-manager kube-proxy kube-scheduler kubectl kubelet metrics \
      mount-utils pod-security-admission sample-apiserver sample-cli-plugin sample-controller \
      streaming; do
      echo "  k8s.io/$m => k8s.io/$m $sv"
    done
    echo ")"
  } >"$w/go.mod"
  minor=${KUBE_V#v1.}; minor=${minor%%.*}
  ldf="-X k8s.io/component-base/version.gitVersion=$KUBE_V -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor"
  (cd "$w" && mkdir -p "$dir" && GOFLAGS=-mod=mod go build -ldflags "$ldf" -o "$dir/" "$@")
  rm -rf "$w"
  touch "$dir/.done"; chmod +x "$dir/.done"
}
# kube-apiserver alone takes ~6 min cold; the node and control-plane commands
# of the kubelet cluster test share most of its build.
dk=$BIN/kube-apiserver-$KUBE_V
kubebuild kube-apiserver k8s.io/kubernetes/cmd/kube-apiserver
dkn=$BIN/kube-cluster-$KUBE_V
kubebuild kube-cluster k8s.io/kubernetes/cmd/kubelet k8s.io/kubernetes/cmd/kube-controller-manager \
  k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kube-proxy k8s.io/kubernetes/cmd/kubectl
# The cluster's DNS, as kubeadm installs it.
gobin coredns "$COREDNS_V" "github.com/coredns/coredns@$COREDNS_V"

# A real S3-compatible object store for the cache tier's replicas (~6 min cold).
dw=$BIN/weed-$WEED_V
wrapbuild weed "$WEED_V" "github.com/seaweedfs/seaweedfs@$WEED_V" github.com/seaweedfs/seaweedfs/weed

# The environment the tests read (printed for `eval`).
cat <<ENV
export SHOAL_CONTAINERD_BIN=$BIN/containerd-$CONTAINERD_V2/containerd
export SHOAL_CTR_BIN=$BIN/containerd-$CONTAINERD_V2/ctr
export SHOAL_CONTAINERD17_BIN=$d1/containerd
export SHOAL_CRANE_BIN=$BIN/crane-$CRANE_V/crane
export SHOAL_ORAS_BIN=$BIN/oras-$ORAS_V/oras
export SHOAL_REGCTL_BIN=$BIN/regctl-$REGCTL_V/regctl
export SHOAL_CONFORMANCE_BIN=$dc/conformance.test
export SHOAL_HELM_BIN=$BIN/helm-$HELM_V/helm
export SHOAL_ETCD_BIN=$de/etcd
export SHOAL_KUBE_APISERVER_BIN=$dk/kube-apiserver
export SHOAL_KUBELET_BIN=$dkn/kubelet
export SHOAL_KUBE_CONTROLLER_MANAGER_BIN=$dkn/kube-controller-manager
export SHOAL_KUBE_SCHEDULER_BIN=$dkn/kube-scheduler
export SHOAL_KUBE_PROXY_BIN=$dkn/kube-proxy
export SHOAL_KUBECTL_BIN=$dkn/kubectl
export SHOAL_COREDNS_BIN=$BIN/coredns-$COREDNS_V/coredns
export SHOAL_CONTAINERD_SHIM_BIN=$BIN/containerd-shim-$CONTAINERD_V2/containerd-shim-runc-v2
export SHOAL_WEED_BIN=$dw/weed
ENV
