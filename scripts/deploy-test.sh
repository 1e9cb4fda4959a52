#!/usr/bin/env bash
# Runs the Kubernetes manifests of deploy/k8s/ in real containers with
# `podman kube play` (Debian's podman 4.3 with runc), with signatures on, and
# checks what an operator relies on:
#   1. the Collector pod's init container fetches a signed probe from the
#      Central pod, and the Collector container reads that probe;
#   2. a new Collector pod started while Central is stopped gets the probe
#      from the node cache (the hostPath);
#   3. a probe that is not signed is refused (the init container exits 1);
# and, before anything is played, that the kubelet would start every
# container of central.yaml and of collector.yaml as to runAsNonRoot, which
# podman 4.3 ignores (a container with runAsNonRoot and runAsUser 0 runs as
# root under podman, and is never started by the kubelet).
# One line per check, and after a failed one the last lines the pod wrote,
# which say why; exits non-zero when any fails. Needs root (podman as root,
# apt-get for what is missing).
#
# What is played: central.yaml as it is (its PersistentVolumeClaim and
# Deployment; podman ignores the Service, which a forwarder container plays:
# the name central-probes, port 443 to the Central pod's 8443), and a Pod
# made of collector.yaml's DaemonSet pod template, unchanged but for two
# things the kubelet does and podman 4.3 does not (see collector_pod): the
# downward-API value spec.nodeName (NODE_HOSTNAME) is filled in, and an init
# container is not run again once it succeeded. Secrets become podman
# secrets, ConfigMaps are given with --configmap.
#
# The images: the Dockerfiles' bases cannot be pulled here, so each image is
# built from the release binaries (`cargo build --release --bins`) on a root
# file system of their own shared libraries (ldd) and distroless' users
# (root, nonroot 65532). With deploy/Dockerfile.* they share the binaries,
# the user (nonroot, 65532), the entrypoint and the read-only root file
# system; they differ in the libraries' origin (this machine's, not
# distroless' Debian 12) and lack its CA bundle and tzdata, which neither
# binary reads here. `collector:latest`, the product's Collector, is a
# stand-in: a busybox shell that prints the SHA-256 of /module/probe.o.
#
# The manifest's hostPath /var/cache/kprobes is redirected without editing
# it: the script runs in a mount namespace of its own where a scratch
# directory is mounted over /var/cache, so the kubelet's part (podman)
# creates the cache directory as on a node (DirectoryOrCreate: root, 0755).
# All podman state (storage, network, secrets) stays in the scratch
# directory, which is removed at the end unless DEPLOY_TEST_KEEP=1.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
  echo "deploy-test.sh runs containers with podman as root: run it as root" >&2
  exit 2
fi

if [ -z "${DEPLOY_TEST_NAMESPACE:-}" ]; then
  echo "== packages: podman, runc, socat, busybox-static, python3-yaml"
  missing=()
  for package in podman runc socat busybox-static python3-yaml; do
    dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
  echo "== release binaries"
  cargo build --quiet --release --bins
  cargo build --quiet -p central-probes --features testing --bin make-package
  exec env DEPLOY_TEST_NAMESPACE=1 unshare --mount --propagation private -- bash "$PWD/scripts/deploy-test.sh" "$@"
fi

RELEASE=${CARGO_TARGET_DIR:-target}/release
DEBUG=${CARGO_TARGET_DIR:-target}/debug
WORK=$(mktemp -d /tmp/deploy-test.XXXXXX)
chmod 755 "$WORK"
# A subnet of its own for the test's network, with fixed addresses: Central's
# certificate names its address, and the Service forwarder points at it.
NET=${DEPLOY_TEST_SUBNET:-10.213.77}
CENTRAL_IP=$NET.10
CENTRAL_POD=central-probes-pod-0
FAILED=0

export CONTAINERS_CONF=$WORK/containers.conf CONTAINERS_STORAGE_CONF=$WORK/storage.conf \
  CONTAINERS_REGISTRIES_CONF=$WORK/registries.conf
# runc: crun refuses cgroups in hybrid mode; ulimits within the hard limits
# of a CI machine; cgroupfs and a file for events: no systemd here.
cat >"$CONTAINERS_CONF" <<EOF
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=4096:4096"]
log_driver = "k8s-file"
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "$WORK/podman/events.log"
tmp_dir = "$WORK/podman/tmp"
[network]
network_config_dir = "$WORK/podman/networks"
EOF
cat >"$CONTAINERS_STORAGE_CONF" <<EOF
[storage]
driver = "overlay"
graphroot = "$WORK/podman/storage"
runroot = "$WORK/podman/run"
EOF
# Images are never pulled: a short name means the local image or nothing.
echo 'unqualified-search-registries = []' >"$CONTAINERS_REGISTRIES_CONF"

cleanup() {
  local status=$?
  [ -n "${PLAY_PID:-}" ] && kill "$PLAY_PID" 2>/dev/null
  podman pod rm --all --force >/dev/null 2>&1 || true
  podman rm --all --force >/dev/null 2>&1 || true
  podman network rm --force deploytest >/dev/null 2>&1 || true
  podman volume rm --all --force >/dev/null 2>&1 || true
  umount /var/cache 2>/dev/null || true
  if [ "$status" = 0 ] && [ -z "${DEPLOY_TEST_KEEP:-}" ]; then
    umount "$WORK/podman/storage/overlay" 2>/dev/null || true
    rm -rf "$WORK" 2>/dev/null || true
  else
    echo "deploy-test: files and logs in $WORK" >&2
  fi
}
trap cleanup EXIT

# The node: its /var/cache is a scratch directory (see the header).
mkdir -p "$WORK/node-var-cache"
mount --bind "$WORK/node-var-cache" /var/cache
NODE_CACHE=$WORK/node-var-cache/kprobes

check() { # check WHAT CONDITION-COMMAND...: one line, counted when it fails
  local what=$1
  shift
  if "$@"; then
    echo "ok: $what"
  else
    echo "FAILED: $what" >&2
    FAILED=1
  fi
}
# check_run RUN WHAT CONDITION-COMMAND...: check; when it fails, also what
# the pod of run RUN said (see said), so that a CI log shows why.
check_run() {
  local run=$1 failed_before=$FAILED
  shift
  FAILED=0
  check "$@"
  if [ "$FAILED" != 0 ]; then said "$run" >&2 || true; fi
  FAILED=$((FAILED | failed_before))
}

# make_rootfs DIR FILE...: each FILE at /usr/local/bin, the shared libraries
# ldd lists for it at their own paths, and distroless' users.
make_rootfs() {
  local dir=$1 file library
  shift
  mkdir -p "$dir/etc" "$dir/tmp" "$dir/usr/local/bin" "$dir/home/nonroot"
  chmod 1777 "$dir/tmp"
  for file in "$@"; do
    cp "$file" "$dir/usr/local/bin/"
    for library in $(ldd "$file" | grep -o '/[^ ]*'); do
      mkdir -p "$dir$(dirname "$library")"
      cp -L "$library" "$dir$library"
    done
  done
  printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' \
    >"$dir/etc/passwd"
  printf 'root:x:0:\nnonroot:x:65532:\n' >"$dir/etc/group"
  chown 65532:65532 "$dir/home/nonroot"
}

DISTROLESS_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
# import_image NAME DIR CHANGE...: DIR as a one-layer image, with Dockerfile
# instructions (ENTRYPOINT, USER, CMD).
import_image() {
  local name=$1 dir=$2 change args=()
  shift 2
  for change in "$@"; do args+=(--change "$change"); done
  # distroless' PATH, which `kubectl exec central-probes ...` relies on.
  tar -C "$dir" -cf - . | podman import --quiet --change "ENV PATH=$DISTROLESS_PATH" "${args[@]}" - "$name" >/dev/null
}

echo "== images from the release binaries: central-probes, collector-client, the Collector stand-in"
make_rootfs "$WORK/rootfs/central-probes" "$RELEASE/central-probes"
import_image central-probes:latest "$WORK/rootfs/central-probes" \
  'ENTRYPOINT ["/usr/local/bin/central-probes"]' 'CMD ["serve", "--help"]' 'USER nonroot'
make_rootfs "$WORK/rootfs/collector-client" "$RELEASE/collector-client"
import_image collector-client:latest "$WORK/rootfs/collector-client" \
  'ENTRYPOINT ["/usr/local/bin/collector-client"]' 'CMD ["get-probe", "--help"]' 'USER nonroot'
make_rootfs "$WORK/rootfs/collector"
mkdir -p "$WORK/rootfs/collector/bin"
cp /bin/busybox "$WORK/rootfs/collector/bin/busybox"
cat >"$WORK/rootfs/collector/usr/local/bin/collector" <<'EOF'
#!/bin/busybox sh
# Stands in for the product's Collector, which loads /module/probe.o: proves
# it can read the probe by printing its SHA-256, then stays up as a Collector.
set -e
sum=$(/bin/busybox sha256sum /module/probe.o)
echo "collector: /module/probe.o sha256 ${sum%% *}"
trap 'exit 0' TERM
/bin/busybox sleep 2147483647 &
wait
EOF
chmod 755 "$WORK/rootfs/collector/usr/local/bin/collector"
import_image collector:latest "$WORK/rootfs/collector" 'USER nonroot' 'ENTRYPOINT ["/usr/local/bin/collector"]'
make_rootfs "$WORK/rootfs/service" "$(command -v socat)"
import_image service-forwarder:latest "$WORK/rootfs/service" 'ENTRYPOINT ["/usr/local/bin/socat"]'

echo "== certificates (Central's names central-probes and $CENTRAL_IP), a site signing key"
"$RELEASE/central-probes" pki init --out "$WORK/pki" --san central-probes --san "$CENTRAL_IP" >/dev/null
"$RELEASE/central-probes" package keygen --public-key "$WORK/site.pub" --secret-key "$WORK/site.key" >/dev/null

# secret NAME KEY=FILE...: a Kubernetes Secret as a podman secret (kube play
# reads secret volumes from podman secrets holding Secret objects). podman 4.3
# writes the values of "data" into the files as they are, without the base64
# decoding Kubernetes does, and ignores "stringData": so the values are the
# files' text.
secret() {
  local name=$1
  shift
  python3 - "$name" "$@" >"$WORK/secret-$name.json" <<'EOF'
import json, sys
name, *pairs = sys.argv[1:]
data = {}
for pair in pairs:
    key, path = pair.split("=", 1)
    data[key] = open(path).read()
print(json.dumps({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}, "data": data}))
EOF
  podman secret create "$name" "$WORK/secret-$name.json" >/dev/null
}
# configmap FILE NAME KEY=VALUE...: a ConfigMap for --configmap.
configmap() {
  local file=$1 name=$2
  shift 2
  python3 - "$name" "$@" >"$file" <<'EOF'
import json, sys
name, *pairs = sys.argv[1:]
data = dict(pair.split("=", 1) for pair in pairs)
print(json.dumps({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": data}))
EOF
}
secret central-tls tls.crt="$WORK/pki/server.pem" tls.key="$WORK/pki/server-key.pem" ca.crt="$WORK/pki/ca.pem"
secret collector-tls ca.pem="$WORK/pki/ca.pem" cert.pem="$WORK/pki/collector.pem" key.pem="$WORK/pki/collector-key.pem"

# nonroot_admitted MANIFEST...: the kubelet's runAsNonRoot rule, which podman
# 4.3 does not apply: a container whose securityContext (its own, else the
# pod's) says runAsNonRoot must run as a known UID other than 0 (runAsUser,
# else the image's USER, which must then be numeric). Prints the kubelet's
# refusal for each container it would not start.
nonroot_admitted() {
  python3 - "$@" <<'EOF'
import subprocess, sys, yaml
refused = []
for manifest in sys.argv[1:]:
    for doc in yaml.safe_load_all(open(manifest)):
        if not doc or doc.get("kind") not in ("Pod", "Deployment", "DaemonSet", "StatefulSet"):
            continue
        spec = doc["spec"] if doc["kind"] == "Pod" else doc["spec"]["template"]["spec"]
        pod = {k: v for k, v in (spec.get("securityContext") or {}).items() if k in ("runAsNonRoot", "runAsUser")}
        for container in spec.get("initContainers", []) + spec["containers"]:
            context = {**pod, **(container.get("securityContext") or {})}
            if not context.get("runAsNonRoot"):
                continue
            where = f"{manifest}, {doc['kind']} {doc['metadata']['name']}, container {container['name']}"
            if "runAsUser" in context:
                if context["runAsUser"] == 0:
                    refused.append(f"{where}: container's runAsUser breaks non-root policy")
                continue
            inspect = subprocess.run(["podman", "image", "inspect", "--format", "{{.Config.User}}", container["image"]],
                                     capture_output=True, text=True)
            if inspect.returncode != 0:
                refused.append(f"{where}: no image {container['image']} to read its USER from")
                continue
            user = inspect.stdout.strip().split(":")[0]
            if user in ("", "0"):
                refused.append(f"{where}: container has runAsNonRoot and image will run as root")
            elif not user.isdigit():
                refused.append(f"{where}: container has runAsNonRoot and image has non-numeric user ({user}), "
                               "cannot verify user is non-root")
for line in refused:
    print(f"    kubelet: {line}", file=sys.stderr)
sys.exit(1 if refused else 0)
EOF
}
echo "== the kubelet's runAsNonRoot rule, which podman 4.3 ignores"
check "runAsNonRoot holds for every container of central.yaml and collector.yaml (the kubelet would start them)" \
  nonroot_admitted deploy/k8s/central.yaml deploy/k8s/collector.yaml

echo "== Central: deploy/k8s/central.yaml on the network deploytest at $CENTRAL_IP"
podman network create --subnet "$NET.0/24" deploytest >/dev/null
podman kube play --network deploytest --ip "$CENTRAL_IP" deploy/k8s/central.yaml >"$WORK/play-central.txt" 2>&1
# (grep reads all its input, here and below: with pipefail, grep -q
# quitting early can fail the pipeline with SIGPIPE.)
central_listening() { podman logs "$CENTRAL_POD-central-probes" 2>&1 | grep "listening on" >/dev/null; }
for _ in $(seq 1 300); do
  central_listening && break
  sleep 0.2
done
central_listening || {
  echo "Central did not start; its log:" >&2
  podman logs "$CENTRAL_POD-central-probes" >&2
  exit 1
}
# The Service: the name central-probes, port 443 to Central's 8443.
podman run -d --name central-probes --network deploytest --network-alias central-probes \
  service-forwarder:latest TCP-LISTEN:443,fork,reuseaddr "TCP:$CENTRAL_IP:8443" >/dev/null

echo "== packages for kernel $(uname -r): module version 2.5.0 signed (serial 1), 2.6.0 unsigned"
uname -r >"$WORK/kernel.txt"
"$DEBUG/make-package" --out "$WORK/pkg-2.5.0.zip" --module-version 2.5.0 --kernels "$WORK/kernel.txt" \
  --size-divisor 10 >/dev/null
"$DEBUG/make-package" --out "$WORK/pkg-2.6.0.zip" --module-version 2.6.0 --kernels "$WORK/kernel.txt" \
  --size-divisor 10 >/dev/null
"$RELEASE/central-probes" package sign "$WORK/pkg-2.5.0.zip" --secret-key "$WORK/site.key" --serial 1 \
  --out "$WORK/signed-2.5.0.zip" >/dev/null
# The token as the manifest's header says: token create in Central's container.
ROX_API_TOKEN=$(podman exec "$CENTRAL_POD-central-probes" central-probes token create --data-dir /data \
  --role admin --name deploy-test 2>/dev/null)
export ROX_API_TOKEN
for package in signed-2.5.0.zip pkg-2.6.0.zip; do
  "$RELEASE/central-probes" upload "$WORK/$package" -e "$CENTRAL_IP:8443" --ca "$WORK/pki/ca.pem" \
    >>"$WORK/upload.log" 2>&1 || { cat "$WORK/upload.log" >&2; exit 1; }
done
# The probe as the Collector must load it: the package's, decompressed.
EXPECTED=$(python3 - "$WORK/pkg-2.5.0.zip" "$(uname -r)" <<'EOF'
import gzip, hashlib, sys, zipfile
package, kernel = sys.argv[1:]
with zipfile.ZipFile(package) as z:
    (name,) = [n for n in z.namelist() if n.endswith(f"/collector-ebpf-{kernel}.o.gz")]
    print(hashlib.sha256(gzip.decompress(z.read(name))).hexdigest())
EOF
)

echo "== Collector pods from deploy/k8s/collector.yaml's pod template, trusted keys on"
# collector_pod NAME: the DaemonSet's pod template as a Pod named NAME, with
# two things the kubelet does that podman 4.3 does not: NODE_HOSTNAME's
# downward-API value spec.nodeName is filled in, and an init container that
# succeeded is not run again. Under the DaemonSet's restartPolicy Always,
# podman 4.3 restarts the init container after it succeeded and then fails to
# remove it; OnFailure is what the kubelet does with init containers (rerun
# on failure only), and the Collector container here never exits.
collector_pod() {
  python3 - deploy/k8s/collector.yaml "$1" "$(uname -n)" >"$WORK/pod-$1.json" <<'EOF'
import json, sys, yaml
manifest, name, node = sys.argv[1:]
(daemonset,) = [d for d in yaml.safe_load_all(open(manifest)) if d and d.get("kind") == "DaemonSet"]
template = daemonset["spec"]["template"]
spec = template["spec"]
for container in spec.get("initContainers", []) + spec["containers"]:
    for variable in container.get("env", []):
        if variable.get("valueFrom") == {"fieldRef": {"fieldPath": "spec.nodeName"}}:
            del variable["valueFrom"]
            variable["value"] = node
assert spec.get("restartPolicy", "Always") == "Always", "a DaemonSet's pods restart always"
spec["restartPolicy"] = "OnFailure"
pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": template["metadata"]["labels"]}, "spec": spec}
print(json.dumps(pod))
EOF
}
configmap "$WORK/cm-trusted-keys.json" probe-trusted-keys "site.pub=$(cat "$WORK/site.pub")" \
  PROBE_TRUSTED_KEYS=/etc/kprobes/trusted-keys/site.pub
configmap "$WORK/cm-2.5.0.json" collector-module-version MODULE_VERSION.txt=2.5.0
configmap "$WORK/cm-2.6.0.json" collector-module-version MODULE_VERSION.txt=2.6.0
# play_collector RUN MODULE_VERSION: a new pod "collector" with that module
# version's ConfigMap, played in the background (PLAY_PID); returns once the
# Collector container has said what it read, or once the init container's
# first run has failed (podman runs it again: the log shows a second start),
# or once kube play has failed (the pod was not made: nothing will come), or
# after 6 minutes (the retry budget is 3). The pod's containers log to
# $WORK/collector-RUN.log: podman removes an init container once it
# succeeded, and its log with it.
play_collector() {
  local log=$WORK/collector-$1.log played
  remove_collector
  collector_pod collector
  : >"$log"
  podman kube play --network deploytest --log-opt "path=$log" \
    --configmap "$WORK/cm-$2.json" --configmap "$WORK/cm-trusted-keys.json" "$WORK/pod-collector.json" \
    >"$WORK/play-$1.txt" 2>&1 &
  PLAY_PID=$!
  for _ in $(seq 1 360); do
    grep -q "collector: /module/probe.o sha256" "$log" && return 0
    [ "$(grep -c "kernel candidates" "$log")" -ge 2 ] && return 0
    if ! kill -0 "$PLAY_PID" 2>/dev/null; then
      played=0
      wait "$PLAY_PID" || played=$?
      PLAY_PID=
      [ "$played" = 0 ] || return 0
    fi
    sleep 1
  done
}
# remove_collector: the pod gone, and the volumes podman 4.3 made of its
# emptyDir and ConfigMaps (named after them, and kept): each pod starts with
# a new emptyDir, as on a node.
remove_collector() {
  # kube play still waiting for a failing init container holds the pod: it
  # would wait for ever (podman runs the init container again and again).
  if [ -n "${PLAY_PID:-}" ]; then
    kill "$PLAY_PID" 2>/dev/null || true
    wait "$PLAY_PID" || true
    PLAY_PID=
  fi
  # An init container that fails at once is restarted at once (podman has no
  # back-off): removing the pod can catch it between states; try again.
  for _ in $(seq 1 10); do
    podman pod rm --force --ignore collector >/dev/null 2>&1 && break
    sleep 1
  done
  podman pod rm --force --ignore collector >/dev/null
  podman volume rm --force module collector-module-version probe-trusted-keys >/dev/null 2>&1 || true
}
probe_read_in() { # the SHA-256 the Collector container printed in run $1
  sed -n 's/.*collector: \/module\/probe.o sha256 //p' "$WORK/collector-$1.log" | sed -n 1p
}
# first_try RUN: what the init container said in its first run.
first_try() { awk '/kernel candidates/ { runs++ } runs <= 1' "$WORK/collector-$1.log"; }
# said RUN: the last lines of the init container's first run in RUN (the
# Collector container's, if it started), without the log's time stamps and
# with partial lines joined; or, when the pod was never made, kube play's.
said() {
  if [ -s "$WORK/collector-$1.log" ]; then
    first_try "$1" | awk '{ tag = $3; sub(/^[^ ]+ [^ ]+ [FP] ?/, ""); line = line $0 }
      tag == "F" { print line; line = "" }' | grep -v '^$' | tail -n 8 | sed 's/^/    /'
  else
    tail -n 4 "$WORK/play-$1.txt" | sed 's/^/    /'
  fi
}
# first_exit: the exit status of the init container's first run; none when
# there is no init container (the pod was never made: said tells why).
first_exit() {
  local id
  id=$(podman container inspect collector-get-probe --format '{{.Id}}' 2>/dev/null) || return 0
  podman events --stream=false --filter "container=$id" --filter event=died \
    --format '{{.ContainerExitCode}}' | sed -n 1p
}

play_collector signed 2.5.0
fetched() {
  [ "$(probe_read_in signed)" = "$EXPECTED" ] &&
    first_try signed | grep "from Central central-probes:443 .*signed by key" >/dev/null
}
check_run signed "signed probe fetched from the Central pod by the init container and read by the Collector (sha256 $EXPECTED)" \
  fetched
check_run signed "the node cache (hostPath) holds the probe's signature and the node's state" \
  test -n "$(find "$NODE_CACHE" -name '*.minisig' 2>/dev/null)" -a -d "$NODE_CACHE/state"

echo "== a Collector of module version 2.6.0, whose package was uploaded unsigned (its retry budget: 3 minutes)"
play_collector unsigned 2.6.0
refused() {
  [ "$(first_exit)" = 1 ] && first_try unsigned | grep "signature refused: the probe is not signed" >/dev/null
}
check_run unsigned "unsigned probe refused: the init container exits 1 and says signature refused" refused

echo "== Central stopped; a new Collector pod (the same node cache; its retry budget: 3 minutes)"
podman pod stop "$CENTRAL_POD" >/dev/null 2>&1
podman stop central-probes >/dev/null 2>&1
play_collector cached 2.5.0
from_cache() {
  [ "$(probe_read_in cached)" = "$EXPECTED" ] &&
    first_try cached | grep "from the node-local cache .*signed by key" >/dev/null
}
check_run cached "with Central stopped, the new pod's probe came from the node cache (sha256 $EXPECTED)" from_cache
remove_collector

if [ "$FAILED" != 0 ]; then
  echo "deploy-test: a check failed; the pods' logs are in $WORK/collector-*.log" >&2
  exit 1
fi
echo "deploy-test: every check passed"
