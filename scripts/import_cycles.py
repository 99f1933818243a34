#!/usr/bin/env python3
"""Fails when the crate's modules import each other in a cycle.

A module is a file under src/ (`src/a.rs` and `src/a/mod.rs` are `crate::a`). An edge `m -> n`
is a path in `m`'s code (a `use` or a qualified path starting `crate::`, `super::`, `self::` or
a module `m` declares) that names module `n` or an item defined in `n`; re-exports are followed
to the module that defines the item. Comments, string literals and `#[cfg(test)]` modules are
left out: tests may reach anywhere. Exit status 1 and the cycle's edges, with file and line, on
a cycle; 0 and a one-line summary otherwise.

Usage: python3 scripts/import_cycles.py [--graph] [--src DIR]   (--graph prints every edge;
DIR defaults to the repository's src/)
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"
Mod = tuple[str, ...]


def module_of(src: Path, path: Path) -> Mod:
    parts = list(path.relative_to(src).with_suffix("").parts)
    if parts[-1] in ("mod", "lib"):
        parts.pop()
    return ("crate", *parts)


def strip(text: str) -> str:
    """The code without comments and string contents, newlines kept so line numbers hold."""
    out, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            i = n if j < 0 else j
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            j = n if j < 0 else j + 2
            out.append("\n" * text.count("\n", i, j))
            i = j
        elif c == '"' or (c == "r" and re.match(r'r#*"', text[i:])):
            m = re.match(r'r(#*)"', text[i:])
            if m:
                end = '"' + m.group(1)
                j = text.find(end, i + len(m.group(0)))
                j = n if j < 0 else j + len(end)
            else:
                j = i + 1
                while j < n and text[j] != '"':
                    j += 2 if text[j] == "\\" else 1
                j += 1
            out.append('""' + "\n" * text.count("\n", i, j))
            i = j
        elif c == "'" and (ch := re.match(r"'(\\.|[^\\'])'", text[i:])):
            out.append("' '")
            i += len(ch.group(0))
        else:
            out.append(c)
            i += 1
    return "".join(out)


def drop_test_modules(code: str) -> str:
    """Blanks `#[cfg(test)]` / `#[cfg(all(test, ...))]` modules, keeping their newlines."""
    pat = re.compile(r"#\[cfg\((?:all\()?test\b[^\]]*\]\s*(?:pub(?:\([^)]*\))?\s+)?mod\s+\w+\s*\{")
    while m := pat.search(code):
        depth, j = 1, m.end()
        while depth and j < len(code):
            depth += {"{": 1, "}": -1}.get(code[j], 0)
            j += 1
        code = code[: m.start()] + "\n" * code.count("\n", m.start(), j) + code[j:]
    return code


def use_paths(tree: str) -> list[list[str]]:
    """Flattens a use tree (`a::{b, c::{d as e, self}}`) into paths; `self` ends its prefix."""
    tree = re.sub(r"\s*(::|\{|\}|,)\s*", r"\1", " ".join(tree.split()))
    paths: list[list[str]] = []

    def walk(prefix: list[str], s: str) -> None:
        depth, start, items = 0, 0, []
        for k, ch in enumerate(s):
            depth += {"{": 1, "}": -1}.get(ch, 0)
            if ch == "," and depth == 0:
                items.append(s[start:k])
                start = k + 1
        items.append(s[start:])
        for item in filter(None, items):
            if "{" in item:
                head, rest = item.split("{", 1)
                walk(prefix + [p for p in head.split("::") if p], rest[:-1])
            else:
                parts = [p for p in item.split(" as ")[0].split("::") if p]
                if parts == ["self"]:
                    paths.append(prefix)
                else:
                    paths.append(prefix + parts)

    walk([], tree)
    return paths


class Crate:
    def __init__(self, src: Path) -> None:
        self.src = src
        self.files = {module_of(src, p): p for p in sorted(src.rglob("*.rs"))}
        self.code = {m: drop_test_modules(strip(p.read_text())) for m, p in self.files.items()}
        # name -> absolute path, for each module's `pub ... use` re-exports
        self.reexports: dict[Mod, dict[str, list[str]]] = {}
        self.uses: dict[Mod, list[tuple[int, bool, list[str]]]] = {}
        for m, code in self.code.items():
            self.uses[m] = []
            for u in re.finditer(r"(pub(?:\([^)]*\))?\s+)?use\s+([^;]+);", code):
                line = code.count("\n", 0, u.start()) + 1
                for path in use_paths(u.group(2)):
                    self.uses[m].append((line, bool(u.group(1)), path))
            self.reexports[m] = {}
            for _line, public, path in self.uses[m]:
                if public and path and path[-1] != "*":
                    absolute = self.absolute(m, path)
                    if absolute:
                        self.reexports[m][path[-1]] = absolute

    def children(self, m: Mod) -> set[str]:
        return {k[len(m)] for k in self.files if len(k) == len(m) + 1 and k[: len(m)] == m}

    def absolute(self, m: Mod, path: list[str]) -> list[str] | None:
        """`path` as seen from module `m`, from `crate`; None for other crates (std, ndarray)."""
        head, *rest = path
        if head == "crate":
            return path
        if head == "self":
            return [*m, *rest]
        if head == "super":
            base = list(m)
            while path and path[0] == "super":
                base.pop()
                path = path[1:]
            return [*base, *path]
        if head in self.children(m):
            return [*m, *path]
        return None

    def resolve(self, path: list[str], seen: int = 0) -> Mod | None:
        """The module that defines what `path` (absolute) names."""
        k = 1
        while k < len(path) and tuple(path[: k + 1]) in self.files:
            k += 1
        mod = tuple(path[:k])
        if mod not in self.files:
            return None
        if k < len(path) and seen < 8:
            target = self.reexports.get(mod, {}).get(path[k])
            if target:
                return self.resolve(target + path[k + 1 :], seen + 1)
        return mod

    def edges(self) -> dict[tuple[Mod, Mod], tuple[Path, int]]:
        found: dict[tuple[Mod, Mod], tuple[Path, int]] = {}

        def add(m: Mod, absolute: list[str] | None, line: int) -> None:
            if absolute is None:
                return
            n = self.resolve([p for p in absolute if p != "*"])
            if n is not None and n != m:
                found.setdefault((m, n), (self.files[m], line))

        for m, code in self.code.items():
            for line, _, path in self.uses[m]:
                add(m, self.absolute(m, path), line)
            code_no_use = re.sub(r"use\s+[^;]+;", lambda u: "\n" * u.group(0).count("\n"), code)
            heads = {"crate", "super", "self"} | self.children(m)
            for p in re.finditer(r"(?<![\w:])(\w+)((?:::\w+)+)", code_no_use):
                if p.group(1) in heads:
                    line = code_no_use.count("\n", 0, p.start()) + 1
                    add(m, self.absolute(m, [p.group(1), *p.group(2).split("::")[1:]]), line)
        return found


def cycles(nodes: list[Mod], edges: set[tuple[Mod, Mod]]) -> list[list[Mod]]:
    """Strongly connected components of more than one module (Tarjan)."""
    succ: dict[Mod, list[Mod]] = {v: [] for v in nodes}
    for a, b in edges:
        succ[a].append(b)
    index: dict[Mod, int] = {}
    low: dict[Mod, int] = {}
    stack: list[Mod] = []
    on: set[Mod] = set()
    out: list[list[Mod]] = []

    def visit(v: Mod) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in succ[v]:
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
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in nodes:
        if v not in index:
            visit(v)
    return out


def name(m: Mod) -> str:
    return "::".join(m)


def main() -> int:
    args = sys.argv[1:]
    crate = Crate(Path(args[args.index("--src") + 1]).resolve() if "--src" in args else SRC)
    found = crate.edges()
    if "--graph" in args:
        for (a, b), (f, line) in sorted(found.items()):
            print(f"{name(a)} -> {name(b)}  ({f.relative_to(crate.src.parent)}:{line})")
    bad = cycles(sorted(crate.files), set(found))
    for comp in bad:
        members = set(comp)
        print(f"import cycle through {len(comp)} modules: {', '.join(map(name, comp))}")
        for (a, b), (f, line) in sorted(found.items()):
            if a in members and b in members:
                print(f"  {name(a)} -> {name(b)}  ({f.relative_to(crate.src.parent)}:{line})")
    if bad:
        return 1
    print(f"no import cycle: {len(crate.files)} modules, {len(found)} edges")
    return 0


if __name__ == "__main__":
    sys.exit(main())
