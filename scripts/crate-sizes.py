"""A cargo-bloat-style table: the code size of a binary, attributed to crates.

Usage: python3 scripts/crate-sizes.py BINARY [N]
BINARY must still have its symbol table (build it before stripping: e.g. with
`--config profile.release.strip=false`, or use the bench profile's target/release/khub).
Sums the sizes of the text symbols (`nm -S -C`, types t/T/w/W) by the crate named first in
each demangled symbol: `<reqwest::Client as …>::send` counts for reqwest, a trait impl of
one crate's trait for another's type for the type's crate. Symbols without a Rust path
(C code, the standard library's C parts, linker stubs) count as `[C/other]`. Prints the N
largest (default 20) as a Markdown table, with the total of the .text section for scale.
"""

import collections
import re
import subprocess
import sys

binary = sys.argv[1]
top = int(sys.argv[2]) if len(sys.argv) > 2 else 20
out = subprocess.run(["nm", "-S", "-C", "--size-sort", binary], capture_output=True, text=True, check=True).stdout
sizes = collections.Counter()
path = re.compile(r"^[<&\s]*(?:mut\s+|dyn\s+|const\s+)*([A-Za-z_][A-Za-z0-9_]*)::")
for line in out.splitlines():
    parts = line.split(None, 3)
    if len(parts) < 4 or parts[2] not in "tTwW":
        continue
    size, name = int(parts[1], 16), parts[3]
    m = path.match(name)
    crate = m.group(1) if m else "[C/other]"
    if crate in ("core", "alloc", "std"):
        crate = "std/core/alloc"
    sizes[crate] += size
text = 0
for line in subprocess.run(["size", "-A", binary], capture_output=True, text=True, check=True).stdout.splitlines():
    f = line.split()
    if f and f[0] == ".text":
        text = int(f[1])
total = sum(sizes.values())
print(f"binary {binary}: .text {text / 2**20:.2f} MiB; text symbols attributed below: {total / 2**20:.2f} MiB")
print()
print("| crate | size | share of attributed text |")
print("|---|---:|---:|")
for crate, size in sizes.most_common(top):
    print(f"| {crate} | {size / 1024:.0f} KiB | {100 * size / total:.1f}% |")
