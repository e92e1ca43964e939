#!/usr/bin/env python3
"""Fails when the modules of a workspace crate import each other in a cycle.

Each .rs file is a module (`lib.rs`/`main.rs` the root, `x/mod.rs` is `x`).
An edge a -> b is a `crate::b::...` (or `super::`) path (in a `use` or inline) in a's
production code (everything before its `#[cfg(test)]`). Edges between a
module and its own ancestors or descendants are the module tree itself, so
they are left out: a cycle here is between siblings or cousins, the kind that
means two parts of the design lean on each other. Run from the repository
root; prints every cycle found and exits 1 if there is one.
"""
import os
import re
import sys

CRATES = ["domain", "proto", "coordinator", "agent", "cli", "tests"]
PATH = re.compile(r"\bcrate((?:::[a-z_][a-z0-9_]*)+)")
SUPER = re.compile(r"(?<!::)\b((?:super::)+)([a-z_][a-z0-9_]*(?:::[a-z_][a-z0-9_]*)*)")
GROUP = re.compile(r"\bcrate::\{([^}]*)\}")


def module_of(src, path):
    rel = os.path.relpath(path, src)[:-3].split(os.sep)
    if rel[-1] in ("lib", "main", "mod"):
        rel = rel[:-1]
    return tuple(rel)


def production(text):
    text = re.sub(r"//[^\n]*", "", text)
    cut = text.find("#[cfg(test)]")
    return text if cut < 0 else text[:cut]


def crate_graph(src, root_file):
    files = {}
    for d, _, names in os.walk(src):
        for n in names:
            if n.endswith(".rs"):
                p = os.path.join(d, n)
                # A binary's own modules live beside main.rs; bin/ targets are
                # crates of their own.
                if os.sep + "bin" + os.sep in p:
                    continue
                files[module_of(src, p)] = p
    modules = set(files)
    edges = {m: set() for m in modules}
    for m, p in files.items():
        text = production(open(p, encoding="utf-8").read())
        paths = [g.split("::")[1:] for g in PATH.findall(text)]
        for ups, rest in SUPER.findall(text):
            n = ups.count("super::")
            if n <= len(m):
                paths.append(list(m[: len(m) - n]) + rest.split("::"))
        for inner in GROUP.findall(text):
            for item in inner.split(","):
                item = item.strip().split("::")
                if item and item[0]:
                    paths.append(item)
        for parts in paths:
            target = ()
            for i in range(1, len(parts) + 1):
                if tuple(parts[:i]) in modules:
                    target = tuple(parts[:i])
            if target == m or m[: len(target)] == target or target[: len(m)] == m:
                continue
            edges[m].add(target)
    return edges


def cycles(edges):
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            scc = []
            while True:
                w = stack.pop()
                on.discard(w)
                scc.append(w)
                if w == v:
                    break
            if len(scc) > 1:
                out.append(sorted(scc))

    sys.setrecursionlimit(10000)
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def main():
    found = 0
    for crate in CRATES:
        src = os.path.join(crate, "src")
        if not os.path.isdir(src):
            continue
        for scc in cycles(crate_graph(src, None)):
            found += 1
            names = ", ".join("::".join(m) or "(root)" for m in scc)
            print(f"{crate}: modules in a cycle: {names}")
    if found:
        print(f"{found} import cycle(s)")
        return 1
    print("no import cycles between modules")
    return 0


if __name__ == "__main__":
    sys.exit(main())
