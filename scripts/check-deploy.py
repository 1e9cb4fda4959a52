"""Checks deploy/ as far as a machine without a cluster or Docker can: every
Kubernetes manifest parses, and every flag and environment variable a
manifest passes to central-probes or collector-client appears in that
binary's --help (for the subcommand it runs); every Dockerfile is
multi-stage and runs its binary as a non-root user.

    python3 scripts/check-deploy.py BIN_DIR      # e.g. target/debug
"""

import pathlib
import re
import subprocess
import sys

import yaml

BINARIES = ("central-probes", "collector-client")
# Read by the logging library, not by the command line parser.
NOT_FLAGS = {"RUST_LOG"}


def main() -> None:
    bin_dir = pathlib.Path(sys.argv[1])
    deploy = pathlib.Path(__file__).resolve().parent.parent / "deploy"
    problems = []
    helps = {}

    def help_of(binary: str, subcommand: str) -> str:
        key = (binary, subcommand)
        if key not in helps:
            run = subprocess.run([str(bin_dir / binary), subcommand, "--help"], capture_output=True, text=True)
            if run.returncode != 0:
                problems.append(f"{binary} {subcommand} --help failed: {run.stderr.strip()}")
            helps[key] = run.stdout
        return helps[key]

    checked = 0
    for manifest in sorted((deploy / "k8s").glob("*.yaml")):
        for document in yaml.safe_load_all(manifest.read_text()):
            if not document.get("apiVersion") or not document.get("kind"):
                problems.append(f"{manifest.name}: a document without apiVersion and kind")
                continue
            pod = document.get("spec", {}).get("template", {}).get("spec", {})
            for container in pod.get("initContainers", []) + pod.get("containers", []):
                binary = container["image"].split(":")[0].rsplit("/", 1)[-1]
                if binary not in BINARIES:
                    continue
                args = container.get("args", [])
                text = help_of(binary, args[0])
                where = f"{manifest.name}: {container['name']}"
                for arg in args[1:]:
                    if arg.startswith("--"):
                        flag = arg.split("=", 1)[0]
                        if not re.search(r"(^|[\s,])" + re.escape(flag) + r"([\s=,]|$)", text, re.M):
                            problems.append(f"{where}: {binary} {args[0]} has no flag {flag}")
                        checked += 1
                for variable in container.get("env", []):
                    name = variable["name"]
                    if name not in NOT_FLAGS and f"[env: {name}=" not in text:
                        problems.append(f"{where}: {binary} {args[0]} reads no environment variable {name}")
                    checked += 1
    for dockerfile in sorted(deploy.glob("Dockerfile.*")):
        text = dockerfile.read_text()
        binary = dockerfile.suffix.lstrip(".")
        if len(re.findall(r"^FROM ", text, re.M)) < 2:
            problems.append(f"{dockerfile.name}: not multi-stage")
        if not re.search(r"^USER (nonroot|\d*[1-9]\d*)\s*$", text, re.M):
            problems.append(f"{dockerfile.name}: no non-root USER")
        if f'ENTRYPOINT ["/usr/local/bin/{binary}"]' not in text:
            problems.append(f"{dockerfile.name}: does not run {binary}")
    if checked == 0:
        problems.append("no flag or variable was checked: are the manifests there?")
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        sys.exit(1)
    print(f"deploy/: {checked} flags and variables found in the binaries' --help")


if __name__ == "__main__":
    main()
