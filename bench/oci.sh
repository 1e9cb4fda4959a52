#!/usr/bin/env bash
# Support packages through an OCI registry (issue 38), in one run against
# one registry on loopback (Debian's docker-registry, TLS, htpasswd):
#   - package push of the package into an empty repository, against
#     skopeo copy --all of the same artifact from an OCI layout on disk
#     (written by package push --oci-layout) into another empty repository,
#     and curl uploading the zip as one blob (the floor);
#   - the re-push of the unchanged package, as a fraction of the first;
#   - package pull back into a zip;
#   - peak RSS of push and pull (/usr/bin/time -v);
#   - a cold GetProbe at one client through --upstream-oci against one
#     through --upstream (another Central holding the package).
# Prints a Markdown section on stdout (bench/run.sh appends it to its
# results); progress goes to stderr. Standalone:
#   bash bench/oci.sh                 (PACKAGE=zip to use another package)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/common.sh
BIN=${CARGO_TARGET_DIR:-target}/release
WORK=${OCI_BENCH_DIR:-/tmp/kprobes-bench-oci}
COLD_PROBES=${COLD_PROBES:-20}
for tool in docker-registry skopeo htpasswd curl /usr/bin/time; do
  command -v "$tool" >/dev/null || need_install=1
done
if [ -n "${need_install:-}" ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-registry skopeo apache2-utils curl time >/dev/null
fi
if [ -z "${SKIP_BUILD:-}" ]; then
  cargo build --release --quiet -p central-probes -p collector-client --features testing >&2
fi
rm -rf "$WORK"; mkdir -p "$WORK"
trap 'kill $(jobs -p) 2>/dev/null; wait 2>/dev/null || true' EXIT

"$BIN/central-probes" pki init --out "$WORK/pki" >/dev/null
PKI=$WORK/pki
if [ -z "${PACKAGE:-}" ]; then
  PACKAGE=$WORK/support-pkg-2.5.0-bench.zip
  kernel_list "$WORK/kernels.txt"
  "$BIN/make-package" --out "$PACKAGE" --kernels "$WORK/kernels.txt" --kernel-modules >&2
fi
SIZE=$(stat -c %s "$PACKAGE")
PROBES=$(unzip -Z1 "$PACKAGE" | grep -c '\.gz$')

# The registry: TLS from the bench PKI, one htpasswd user, storage in WORK.
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
REGISTRY=127.0.0.1:$PORT
htpasswd -Bbn bench bench-pw >"$WORK/htpasswd"
cat >"$WORK/registry.yml" <<YAML
version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $WORK/registry
http:
  addr: $REGISTRY
  secret: bench
  tls:
    certificate: $PKI/server.pem
    key: $PKI/server-key.pem
auth:
  htpasswd:
    realm: bench
    path: $WORK/htpasswd
YAML
docker-registry serve "$WORK/registry.yml" >"$WORK/registry.log" 2>&1 &
until curl -s -o /dev/null --cacert "$PKI/ca.pem" "https://$REGISTRY/v2/"; do sleep 0.1; done
mkdir -p "$WORK/certs"; cp "$PKI/ca.pem" "$WORK/certs/ca.crt"
printf '{"auths": {"%s": {"auth": "%s"}}}\n' "$REGISTRY" "$(printf bench:bench-pw | base64)" >"$WORK/auth.json"
REG=(--registry-ca "$PKI/ca.pem" --registry-auth-file "$WORK/auth.json")
echo '{"default": [{"type": "insecureAcceptAnything"}]}' >"$WORK/policy.json"

# timed OUT COMMAND...: runs COMMAND under /usr/bin/time -v; OUT gets "seconds peak_rss_mib".
timed() {
  local out=$1
  shift
  /usr/bin/time -v -o "$WORK/time.txt" "$@" >"$WORK/last.out" 2>"$WORK/last.err" || { cat "$WORK/last.err" >&2; return 1; }
  awk -F': ' '/Elapsed \(wall clock\)/ { n = split($2, p, ":"); s = 0; for (i = 1; i <= n; i++) s = s * 60 + p[i] }
              /Maximum resident/ { rss = $2 / 1024 } END { printf "%.2f %.0f\n", s, rss }' "$WORK/time.txt" >"$out"
}

echo "push" >&2
timed "$WORK/push.t" "$BIN/central-probes" package push "$PACKAGE" --repository "$REGISTRY/bench/push" "${REG[@]}"
echo "re-push" >&2
timed "$WORK/repush.t" "$BIN/central-probes" package push "$PACKAGE" --repository "$REGISTRY/bench/push" "${REG[@]}"
echo "OCI layout, then skopeo copy --all into an empty repository" >&2
"$BIN/central-probes" package push "$PACKAGE" --oci-layout "$WORK/layout" >/dev/null 2>&1
timed "$WORK/skopeo.t" skopeo copy --all --policy "$WORK/policy.json" --dest-cert-dir "$WORK/certs" \
  --dest-creds bench:bench-pw "oci:$WORK/layout:2.5.0" "docker://$REGISTRY/bench/skopeo:2.5.0"
echo "curl, the zip as one blob" >&2
DIGEST=sha256:$(sha256sum "$PACKAGE" | cut -d' ' -f1)
LOCATION=$(curl -s -D - -o /dev/null --cacert "$PKI/ca.pem" -u bench:bench-pw -X POST \
  "https://$REGISTRY/v2/bench/curl/blobs/uploads/" | tr -d '\r' | awk -F': ' 'tolower($1) == "location" { print $2 }')
case $LOCATION in http*) ;; *) LOCATION=https://$REGISTRY$LOCATION ;; esac
timed "$WORK/curl.t" curl -sf --cacert "$PKI/ca.pem" -u bench:bench-pw -X PUT -H 'Content-Type: application/octet-stream' \
  -T "$PACKAGE" "$LOCATION&digest=$DIGEST"
echo "pull" >&2
timed "$WORK/pull.t" "$BIN/central-probes" package pull --repository "$REGISTRY/bench/push:2.5.0" --out "$WORK/pulled.zip" "${REG[@]}"
rm -f "$WORK/pulled.zip"

echo "cold GetProbe: --upstream-oci against --upstream" >&2
export ROX_API_TOKEN
ROX_API_TOKEN=$("$BIN/central-probes" token create --data-dir "$WORK/origin" --role admin --name bench 2>/dev/null)
start_central "$WORK/origin" "$PKI" --allow-anonymous-reads
ORIGIN=$CENTRAL_ADDR
"$BIN/central-probes" upload "$PACKAGE" -e "$ORIGIN" --ca "$PKI/ca.pem" >/dev/null 2>&1
start_central "$WORK/via-grpc" "$PKI" --upstream "https://$ORIGIN" --upstream-ca "$PKI/ca.pem"
VIA_GRPC=$CENTRAL_ADDR
start_central "$WORK/via-oci" "$PKI" --upstream-oci "$REGISTRY/bench/push" --upstream-ca "$PKI/ca.pem" \
  --registry-auth-file "$WORK/auth.json"
VIA_OCI=$CENTRAL_ADDR
# Kernels spread over the package, each asked once of each Central: every
# request a miss that goes to the upstream. Alternating, so that both see
# the same machine.
unzip -Z1 "$PACKAGE" | sed -n 's#.*/collector-ebpf-\(.*\)\.o\.gz$#\1#p' >"$WORK/kernels-in-package.txt"
awk -v n="$COLD_PROBES" -v total="$(wc -l <"$WORK/kernels-in-package.txt")" \
  'BEGIN { step = int(total / n); if (step < 1) step = 1 } (NR - 1) % step == 0 && c < n { print; c++ }' \
  "$WORK/kernels-in-package.txt" >"$WORK/cold.txt"
: >"$WORK/cold-grpc.ms"; : >"$WORK/cold-oci.ms"
while read -r kernel; do
  for via in grpc oci; do
    address=$VIA_GRPC; [ "$via" = oci ] && address=$VIA_OCI
    t0=$(now)
    collector_get_probe "$kernel" "$address" "$WORK/probe.o" >/dev/null 2>&1
    awk -v a="$t0" -v b="$(now)" 'BEGIN { printf "%.1f\n", (b - a) * 1000 }' >>"$WORK/cold-$via.ms"
  done
done <"$WORK/cold.txt"
median() { sort -n "$1" | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }

read -r push_s push_rss <"$WORK/push.t"
read -r repush_s _ <"$WORK/repush.t"
read -r skopeo_s skopeo_rss <"$WORK/skopeo.t"
read -r curl_s _ <"$WORK/curl.t"
read -r pull_s pull_rss <"$WORK/pull.t"
cold_grpc=$(median "$WORK/cold-grpc.ms"); cold_oci=$(median "$WORK/cold-oci.ms")
echo
echo "## 10. Support packages through an OCI registry"
echo
echo "One docker-registry $(docker-registry --version 2>/dev/null | awk '{ print $3 }') on loopback (TLS, htpasswd: it checks"
echo "the bcrypt password on every request), package $((SIZE / 1048576)) MiB with $PROBES probes, release build."
echo
echo "| what | seconds | MB/s | peak RSS MiB | against |"
echo "|---|---|---|---|---|"
echo "| package push, empty repository | $push_s | $(mbps "$SIZE" "$push_s") | $push_rss | skopeo $(ratio "$push_s" "$skopeo_s") |"
echo "| skopeo copy --all oci:DIR:TAG, empty repository | $skopeo_s | $(mbps "$SIZE" "$skopeo_s") | $skopeo_rss | |"
echo "| curl PUT of the zip as one blob (the floor) | $curl_s | $(mbps "$SIZE" "$curl_s") | | push $(ratio "$push_s" "$curl_s") |"
echo "| package push again, unchanged | $repush_s | | | first push $(ratio "$repush_s" "$push_s") |"
echo "| package pull | $pull_s | $(mbps "$SIZE" "$pull_s") | $pull_rss | |"
echo
echo "Cold GetProbe at one client (collector-client get-probe, process start to probe written, median of"
echo "$(wc -l <"$WORK/cold.txt") kernels): through --upstream-oci $cold_oci ms, through --upstream (another Central)"
echo "$cold_grpc ms: $(ratio "$cold_oci" "$cold_grpc")."
