"""The portability check (runs in CI, no gateway needed): the built .wasm imports only host
functions that both Envoy and Kong's ngx_wasm_module export with the same type, and the filter's
source calls only those both implement. The list is tests/portable_imports.txt.

A .wasm that imports a function one host lacks, or types differently, does not even
instantiate there (issue 12: `proxy_get_log_level` stopped every nginx worker).
"""

import re
from pathlib import Path

from envoy_harness import wasm_path

ROOT = Path(__file__).resolve().parents[2]
ALLOWLIST = ROOT / "tests" / "portable_imports.txt"
VALTYPES = {0x7F: "i32", 0x7E: "i64", 0x7D: "f32", 0x7C: "f64"}


def allowlist():
    """(module, name) -> (type, use, [SDK functions])."""
    entries = {}
    for line in ALLOWLIST.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        module, name, sig, use, *sdk = line.split()
        assert use in ("called", "linked"), f"{name}: use must be called or linked, got {use}"
        assert (module, name) not in entries, f"{module}.{name} listed twice"
        entries[(module, name)] = (sig, use, sdk)
    return entries


def _leb128(data, i):
    result = shift = 0
    while True:
        byte = data[i]
        i += 1
        result |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return result, i


def _name(data, i):
    n, i = _leb128(data, i)
    return data[i:i + n].decode(), i + n


def wasm_imports(data):
    """The function imports of a Wasm module: [(module, name, "(params)->(results)")]."""
    assert data[:4] == b"\0asm", "not a Wasm module"
    types, imports, i = [], [], 8
    while i < len(data):
        section, i = data[i], i + 1
        size, i = _leb128(data, i)
        end, j = i + size, i
        if section == 1:  # type section
            count, j = _leb128(data, j)
            for _ in range(count):
                assert data[j] == 0x60, "unexpected type form"
                n, j = _leb128(data, j + 1)
                params, j = [VALTYPES[b] for b in data[j:j + n]], j + n
                n, j = _leb128(data, j)
                results, j = [VALTYPES[b] for b in data[j:j + n]], j + n
                types.append(f"({','.join(params)})->({','.join(results)})")
        elif section == 2:  # import section
            count, j = _leb128(data, j)
            for _ in range(count):
                module, j = _name(data, j)
                name, j = _name(data, j)
                kind, j = data[j], j + 1
                assert kind == 0, f"{module}.{name}: only function imports are expected (kind {kind})"
                index, j = _leb128(data, j)
                imports.append((module, name, types[index]))
        i = end
    return imports


def test_the_wasm_imports_only_what_both_hosts_export():
    allowed = allowlist()
    imports = wasm_imports(wasm_path().read_bytes())
    assert imports, "no imports found: is this the filter?"
    bad = []
    for module, name, sig in imports:
        entry = allowed.get((module, name))
        if entry is None:
            bad.append(f"{module}.{name} {sig}: not exported by both hosts (see {ALLOWLIST.name})")
        elif entry[0] != sig:
            bad.append(f"{module}.{name}: imported as {sig}, both hosts export {entry[0]}")
    assert not bad, "the .wasm would not load on one of the hosts:\n  " + "\n  ".join(bad)


def test_the_filter_calls_only_what_both_hosts_implement():
    called = {fn for sig, use, sdk in allowlist().values() if use == "called" for fn in sdk}
    bad = []
    for path in sorted((ROOT / "src").rglob("*.rs")):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            for fn in re.findall(r"hostcalls::(\w+)", line):
                if fn not in called:
                    bad.append(f"{path.relative_to(ROOT)}:{n}: hostcalls::{fn}")
    assert not bad, ("calls to host functions not both hosts implement "
                     f"(allow them in {ALLOWLIST.name} only if both do):\n  " + "\n  ".join(bad))


def test_the_parser_reads_a_known_module():
    # (module (import "env" "f" (func (param i32 i64) (result i32)))) by hand.
    types = b"\x01\x07\x01\x60\x02\x7f\x7e\x01\x7f"
    imports = b"\x02\x09\x01\x03env\x01f\x00\x00"
    module = b"\0asm\x01\0\0\0" + types + imports
    assert wasm_imports(module) == [("env", "f", "(i32,i64)->(i32)")]
