"""A Python client written from proto/ alone, run by scripts/python-check.sh.

It calls GetExistingProbes with a view token over TLS, then GetProbe over
mutual TLS with the Collector identity, checks the probe against the
header's size and SHA-256, and checks that GetProbe without a client
certificate is refused with UNAUTHENTICATED.
"""

import argparse
import hashlib
import sys

import grpc

from kprobes.v1 import probe_service_pb2, probe_service_pb2_grpc
from kprobes.v1 import probe_upload_service_pb2, probe_upload_service_pb2_grpc


def read(path):
    with open(path, "rb") as f:
        return f.read()


def main():
    parser = argparse.ArgumentParser()
    for flag in ("--address", "--pki", "--token", "--module-version", "--kernel"):
        parser.add_argument(flag, required=True)
    args = parser.parse_args()
    ca = read(f"{args.pki}/ca.pem")
    path = f"{args.module_version}/collector-ebpf-{args.kernel}.o.gz"
    # The server certificate is for localhost and 127.0.0.1.
    target = args.address

    admin_channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=ca))
    uploads = probe_upload_service_pb2_grpc.ProbeUploadServiceStub(admin_channel)
    existing = uploads.GetExistingProbes(
        probe_upload_service_pb2.GetExistingProbesRequest(paths=[path, f"{args.module_version}/collector-ebpf-0.0.o.gz"]),
        metadata=[("authorization", f"Bearer {args.token}")],
    )
    assert [p.path for p in existing.probes] == [path], existing
    expected = existing.probes[0]
    assert len(expected.sha256) == 64

    collector_credentials = grpc.ssl_channel_credentials(
        root_certificates=ca,
        private_key=read(f"{args.pki}/collector-key.pem"),
        certificate_chain=read(f"{args.pki}/collector.pem"),
    )
    probes = probe_service_pb2_grpc.ProbeServiceStub(grpc.secure_channel(target, collector_credentials))
    request = probe_service_pb2.GetProbeRequest(
        module_version=args.module_version, file_name=f"collector-ebpf-{args.kernel}.o.gz"
    )
    replies = iter(probes.GetProbe(request))
    header = next(replies).header
    data = b"".join(reply.chunk for reply in replies)
    assert header.size == len(data) == expected.size, (header.size, len(data))
    assert header.sha256 == hashlib.sha256(data).hexdigest() == expected.sha256
    assert header.source == probe_service_pb2.PROBE_SOURCE_UPLOADED_PACKAGE

    anonymous = probe_service_pb2_grpc.ProbeServiceStub(admin_channel)
    try:
        list(anonymous.GetProbe(request))
        raise AssertionError("GetProbe without a client certificate was served")
    except grpc.RpcError as error:
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED, error

    print(f"python client: GetExistingProbes and GetProbe ok ({path}, {len(data)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
