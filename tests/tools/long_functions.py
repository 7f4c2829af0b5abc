"""Fails when a function in the given source trees is longer than a limit (80 lines by default)
without a comment saying why: a `// long: <reason>` line within the three lines above its `fn`.
Test code (`tests.rs`, `mod tests` after `#[cfg(test)]`, the `tests/` folders) is not checked.

    python3 tests/tools/long_functions.py [--limit N] DIR...
    python3 tests/tools/long_functions.py --self-test

A function ends at the first line that is its opening line's indentation followed by `}` (what
rustfmt writes); one-line and expression-bodied functions are short by definition."""

import re
import sys
from pathlib import Path

FN = re.compile(r"^(\s*)(?:pub(?:\([^)]*\))?\s+)?(?:const\s+)?(?:async\s+)?(?:unsafe\s+)?(?:extern\s+\"C\"\s+)?fn\s+(\w+)")
WAIVER = re.compile(r"^\s*//\s*long:\s*\S")


def long_functions(text, limit):
    """(line, name, length) of each function over `limit` lines without a waiver, before any
    `#[cfg(test)]` at the start of a line."""
    lines = text.split("\n")
    found = []
    for i, line in enumerate(lines):
        if line.startswith("#[cfg(test)]"):
            break
        m = FN.match(line)
        if not m or line.rstrip().endswith(";") or line.rstrip().endswith("}"):
            continue
        closing = m.group(1) + "}"
        end = next((j for j in range(i + 1, len(lines)) if lines[j] == closing), None)
        if end is None:
            continue
        length = end - i + 1
        waived = any(WAIVER.match(lines[k]) for k in range(max(0, i - 3), i))
        if length > limit and not waived:
            found.append((i + 1, m.group(2), length))
    return found


def self_test():
    body = "\n".join(f"    let x{i} = {i};" for i in range(85))
    long_fn = f"fn long() {{\n{body}\n}}\n"
    assert long_functions(long_fn, 80) == [(1, "long", 87)], long_functions(long_fn, 80)
    assert long_functions("// long: a table\n" + long_fn, 80) == []
    assert long_functions(long_fn, 100) == []
    nested = f"impl A {{\n    pub(crate) async fn f(&self) {{\n{body}\n    }}\n}}\n"
    assert [n for _, n, _ in long_functions(nested, 80)] == ["f"]
    assert long_functions("#[cfg(test)]\nmod tests {\n" + long_fn + "}\n", 80) == []
    assert long_functions("fn short() {}\n" + "fn decl();\n", 80) == []
    print("long_functions self-test passed")


def main(argv):
    if argv == ["--self-test"]:
        self_test()
        return 0
    limit = 80
    if len(argv) >= 2 and argv[0] == "--limit":
        limit, argv = int(argv[1]), argv[2:]
    failures = []
    for root in argv:
        for path in sorted(Path(root).rglob("*.rs")):
            if path.name == "tests.rs" or "tests" in path.relative_to(root).parts[:-1]:
                continue
            for line, name, length in long_functions(path.read_text(), limit):
                failures.append(f"{path}:{line}: fn {name} is {length} lines (limit {limit}; "
                                f"split it, or say why above it with `// long: <reason>`)")
    for f in failures:
        print(f)
    if failures:
        return 1
    print(f"no function over {limit} lines in {', '.join(argv)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
