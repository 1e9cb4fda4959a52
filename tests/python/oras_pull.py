"""Reads one probe of a pushed support package with the `oras` Python SDK
(an OCI client this project did not write): the tagged index, its shard
manifests, and the blob whose title annotation is the probe's file name.

    python oras_pull.py HOST:PORT REPOSITORY TAG TITLE CA_FILE USER PASSWORD OUT

Exits 0 having written the blob to OUT, 1 if no layer has that title.
"""

import sys

import oras.provider

INDEX = "application/vnd.oci.image.index.v1+json"
MANIFEST = "application/vnd.oci.image.manifest.v1+json"
TITLE = "org.opencontainers.image.title"


def main() -> int:
    host, repository, tag, title, ca_file, user, password, out = sys.argv[1:]
    registry = oras.provider.Registry(hostname=host, tls_verify=ca_file, auth_backend="basic")
    registry.auth.set_basic_auth(user, password)
    index = registry.get_manifest(f"{host}/{repository}:{tag}", allowed_media_type=[INDEX])
    for entry in index["manifests"]:
        shard = registry.get_manifest(f"{host}/{repository}@{entry['digest']}", allowed_media_type=[MANIFEST])
        for layer in shard["layers"]:
            if layer.get("annotations", {}).get(TITLE) == title:
                registry.download_blob(f"{host}/{repository}:{tag}", layer["digest"], out)
                return 0
    print(f"no layer titled {title}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
