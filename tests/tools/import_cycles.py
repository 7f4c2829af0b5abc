#!/usr/bin/env python3
"""Checks that the `use` imports between a crate's modules form no cycle.

    import_cycles.py SRC_DIR [SRC_DIR ...]
    import_cycles.py --self-test

Each file is a module (`a/b.rs` and `a/b/mod.rs` are `a::b`; `lib.rs`, `main.rs` are the root).
An edge a -> b is a `use crate::b::...`, `use super::...` or `use self::...` line in a, or a path
`crate::b::...` written out in a's code, naming a module b (the longest module path that exists);
comments and a file's inline `mod tests` do not count. A module's edges to its own ancestors are the
ordinary way a child uses what its parent defines and are not counted; a parent using a child,
and siblings using each other both ways, are what make a cycle. Prints each cycle and exits 1
if there is one."""

import re
import sys
from pathlib import Path

# A path written out in code (`crate::cache::now_ms()`) is a dependency as much as a `use` is.
PATH = re.compile(r"(?<![A-Za-z0-9_:])crate(?:::[A-Za-z0-9_]+)+")
COMMENT = re.compile(r"//[^\n]*")
USE = re.compile(r"^\s*(?:pub(?:\([^)]*\))?\s+)?use\s+((?:crate|super|self)(?:::[A-Za-z0-9_]+)*)(?:::\{([^;]*)\}|::[A-Za-z0-9_*]+)?", re.M)


def modules(src: Path):
    mods = {}
    for f in src.rglob("*.rs"):
        rel = f.relative_to(src).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "mod":
            parts = parts[:-1]
        if parts in (["lib"], ["main"]):
            parts = []
        if parts and parts[0] == "bin":
            continue
        mods[tuple(parts)] = f
    return mods


def resolve(path: str, here: tuple, mods) -> tuple | None:
    segs = path.split("::")
    if segs[0] == "crate":
        base, rest = (), segs[1:]
    else:
        base = here
        while segs and segs[0] in ("super", "self"):
            if segs[0] == "super":
                base = base[:-1]
            segs = segs[1:]
        rest = segs
    # The longest prefix that is a module.
    for n in range(len(rest), -1, -1):
        cand = base + tuple(rest[:n])
        if cand in mods:
            return cand
    return None


def edges(mods):
    graph = {m: set() for m in mods}
    for m, f in mods.items():
        # Test modules inside a file are not the module's dependencies; comments are none.
        text = COMMENT.sub("", f.read_text().split("#[cfg(test)]\nmod tests {")[0])
        targets = [p.group(0) for p in PATH.finditer(text)]
        for match in USE.finditer(text):
            head, group = match.group(1), match.group(2)
            if group:
                targets += [f"{head}::{g.strip().split('::')[0].split(' ')[0]}" for g in group.split(",") if g.strip()]
            else:
                targets.append(head)
        for t in targets:
            target = resolve(t, m, mods)
            if target is None or target == m or m[: len(target)] == target:
                continue
            graph[m].add(target)
    return graph


def cycles(graph):
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(comp)

    sys.setrecursionlimit(10_000)
    for v in graph:
        if v not in index:
            visit(v)
    return out


def self_test():
    """The checker finds a cycle through a `use` and one through a written-out path, and none
    where a child only uses its parent."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        src = Path(d)
        (src / "lib.rs").write_text("pub mod a;\npub mod b;\npub mod c;\n")
        (src / "a.rs").write_text("use crate::b::{One, Two};\npub fn f() {}\n")
        (src / "b.rs").write_text("pub fn g() { crate::a::f() }\n// crate::c::h\n")
        (src / "c").mkdir()
        (src / "c.rs").write_text("mod inner;\npub fn h() {}\n")
        (src / "c" / "inner.rs").write_text("use super::h;\nuse crate::c::h as h2;\n")
        found = [sorted("::".join(x) for x in comp) for comp in cycles(edges(modules(src)))]
        assert found == [["a", "b"]], found
    print("import_cycles: self test passed")


def main():
    if sys.argv[1:2] == ["--self-test"]:
        self_test()
        return
    failed = False
    for src in map(Path, sys.argv[1:]):
        mods = modules(src)
        found = cycles(edges(mods))
        for comp in found:
            names = sorted("::".join(c) or "<root>" for c in comp)
            print(f"{src}: import cycle among {', '.join(names)}")
            failed = True
        if not found:
            print(f"{src}: {len(mods)} modules, no import cycle")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
