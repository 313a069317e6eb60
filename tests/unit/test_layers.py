"""The package's layers (README, "Layout of the repository"): a module imports only from its own
layer or the ones below, and the two sides of the wire never import each other. Every import
statement counts, the lazy ones inside functions included."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import kvbm

# Bottom up, as the README names them.
LAYERS = [
    ("errors", "progress"),
    ("policy", "metrics"),
    ("_fast", "layout", "pools"),
    ("config", "hashing", "shm", "shared_g2", "shared_g3"),
    ("wire",),
    ("transfer", "workers"),
    ("manager",),
    ("integrations", "vllm_integration", "cli", "demo"),   # vllm_integration: the Dynamo KVBM module path
]
SIDES = ("transfer", "workers")   # same layer, but never each other
ROOT = Path(kvbm.__file__).parent


def _layer_of(module: str) -> int | None:
    """Layer index of a kvbm module name (kvbm.X or kvbm.X.Y), None for the package root."""
    parts = module.split(".")
    if parts[0] != "kvbm" or len(parts) < 2:
        return None
    for i, names in enumerate(LAYERS):
        if parts[1] in names:
            return i
    raise AssertionError(f"{module} belongs to no layer: add it to LAYERS (and to the README)")


PYX_IMPORT = re.compile(r"^\s*(?:from\s+(kvbm[\w.]*)\s+c?import|c?import\s+(kvbm[\w.]*))", re.M)


def _imports(path: Path) -> list[tuple[int, str]]:
    text = path.read_text()
    if path.suffix == ".pyx":   # Cython: not Python syntax, but its imports are plain lines
        return [(text.count("\n", 0, m.start()) + 1, m.group(1) or m.group(2))
                for m in PYX_IMPORT.finditer(text) if (m.group(1) or m.group(2)).startswith("kvbm.")]
    tree = ast.parse(text, str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
            # `from kvbm import x` names a module of the package
            if node.module == "kvbm":
                found += [(node.lineno, f"kvbm.{a.name}") for a in node.names]
    return [(line, name) for line, name in found if name.startswith("kvbm.")]


def _modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted(ROOT.rglob("*")):
        if path.suffix not in (".py", ".pyx") or path.name == "__init__.py" and path.parent == ROOT:
            continue
        if path.name.startswith("_build_info"):
            continue
        rel = path.relative_to(ROOT.parent).with_suffix("")
        out.append((".".join(rel.parts), path))
    return out


def test_every_module_has_a_layer():
    for module, _ in _modules():
        _layer_of(module)


def test_no_upward_import_and_the_sides_never_meet():
    bad = []
    for module, path in _modules():
        mine = _layer_of(module)
        side = module.split(".")[1]
        for line, name in _imports(path):
            theirs = _layer_of(name)
            if theirs is None:
                continue
            other = name.split(".")[1]
            if theirs > mine:
                bad.append(f"{path.relative_to(ROOT.parent)}:{line} imports {name} from a higher layer")
            elif side in SIDES and other in SIDES and side != other:
                bad.append(f"{path.relative_to(ROOT.parent)}:{line} imports {name} across the wire")
    assert not bad, "\n".join(bad)


def test_the_check_sees_a_violation(tmp_path):
    """The checker itself: an upward import in a synthetic module is reported."""
    fake = tmp_path / "mod.py"
    fake.write_text("def f():\n    from kvbm.manager import KvBlockManager\n")
    assert _imports(fake) == [(2, "kvbm.manager")]
    assert _layer_of("kvbm.manager") > _layer_of("kvbm.wire.protocol")
