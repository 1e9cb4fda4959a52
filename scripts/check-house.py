"""Checks the house rules a reviewer would otherwise check by hand:
no source file outside the tests over 400 lines, no import cycle between
files of a crate, and nothing under central-probes/src/store/ importing
from the server (the store is the lower layer).

    python3 scripts/check-house.py

An edge A -> B is a path in A (`use crate::x::y`, `super::x`, or an inline
`crate::x::f()`) that names an item of file B. `mod x;` declarations are
not edges: a parent owns its children without using them. Exits 1 and
lists every problem.
"""

import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
CRATES = {"probe_api": ROOT / "src", "central_probes": ROOT / "central-probes/src",
          "collector_client": ROOT / "collector-client/src"}
MAX_LINES = 400
# A path starting at the crate root, its parent or this module, up to the
# first item that is not a module (in braces, a glob or an identifier).
PATH = re.compile(r"\b(crate|super|self)((?:::[A-Za-z_][A-Za-z0-9_]*)+)(?![A-Za-z0-9_])(?!::)")
GROUP = re.compile(r"\b(crate|super|self)((?:::[A-Za-z_][A-Za-z0-9_]*)*)::\{([^;]*?)\}", re.S)


def module_of(src: pathlib.Path, file: pathlib.Path) -> list[str]:
    parts = list(file.relative_to(src).with_suffix("").parts)
    if parts[-1] in ("mod", "lib", "main"):
        parts = parts[:-1]
    return parts


def file_of(src: pathlib.Path, module: list[str]) -> pathlib.Path | None:
    """The file of the longest prefix of `module` that is a module file."""
    for end in range(len(module), -1, -1):
        prefix = module[:end]
        if not prefix:
            return src / "lib.rs" if (src / "lib.rs").exists() else src / "main.rs"
        for candidate in (src.joinpath(*prefix).with_suffix(".rs"), src.joinpath(*prefix, "mod.rs")):
            if candidate.exists():
                return candidate
    return None


def strip_tests(text: str) -> str:
    """The text without its `#[cfg(test)] mod tests { ... }` block (tests
    of a file use the file itself: not an edge)."""
    match = re.search(r"#\[cfg\(test\)\]\s*mod \w+ \{", text)
    return text[: match.start()] if match else text


def edges(src: pathlib.Path, file: pathlib.Path) -> set[pathlib.Path]:
    here = module_of(src, file)
    text = strip_tests(file.read_text())
    text = re.sub(r"//[^\n]*", "", text)
    paths = []
    for root, prefix, group in GROUP.findall(text):
        for item in re.split(r",", group):
            item = item.strip().split(" as ")[0]
            names = [n for n in item.split("::") if n and n not in ("{", "}")]
            names = [re.sub(r"[{}\s]", "", n) for n in names]
            paths.append((root, prefix.strip(":").split("::") if prefix else [], names))
    for root, rest in PATH.findall(text):
        paths.append((root, rest.strip(":").split("::"), []))
    # `use child::x` of a module declared here (`mod child;`) is `self::child::x`.
    children = set(re.findall(r"^\s*(?:pub(?:\([^)]*\))?\s+)?mod (\w+);", text, re.M))
    for child, rest in re.findall(r"^\s*(?:pub(?:\([^)]*\))?\s+)?use (\w+)((?:::\w+)*)", text, re.M):
        if child in children:
            paths.append(("self", [child] + rest.strip(":").split("::"), []))
    found = set()
    for root, first, more in paths:
        names = [n for n in first + more if n and n != "*"]
        if root == "crate":
            module = names
        elif root == "super":
            parent = here[:-1] if not file.name == "mod.rs" else here[:-1]
            module = parent + names
        else:
            module = here + names
        while module and module[0] == "super":
            module = module[1:]
        target = file_of(src, module)
        if target is not None and target != file:
            found.add(target)
    return found


def cycles(graph: dict) -> list[list]:
    """Strongly connected components of more than one file (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []
    counter = [0]

    def visit(node):
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for next_node in graph.get(node, ()):
            if next_node not in index:
                visit(next_node)
                low[node] = min(low[node], low[next_node])
            elif next_node in on_stack:
                low[node] = min(low[node], index[next_node])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for node in list(graph):
        if node not in index:
            visit(node)
    return out


def main() -> None:
    sys.setrecursionlimit(10000)
    problems = []
    for crate, src in CRATES.items():
        files = sorted(src.rglob("*.rs"))
        graph = {}
        for file in files:
            rel = file.relative_to(ROOT)
            lines = file.read_text().count("\n")
            if lines > MAX_LINES and file.name != "tests.rs":
                problems.append(f"{rel}: {lines} lines, over {MAX_LINES}")
            graph[file] = edges(src, file)
        for component in cycles(graph):
            names = ", ".join(str(f.relative_to(ROOT)) for f in component)
            problems.append(f"{crate}: an import cycle between {names}")
        if crate == "central_probes":
            store = src / "store"
            for file in files:
                if store in file.parents:
                    for target in graph[file]:
                        if target.relative_to(src).parts[0] == "server":
                            problems.append(
                                f"{file.relative_to(ROOT)} imports {target.relative_to(ROOT)}: the store is below it")
    for problem in problems:
        print(problem)
    if problems:
        sys.exit(1)
    print("house rules hold: no file over 400 lines, no import cycle, the store imports nothing above it")


if __name__ == "__main__":
    main()
