"""Imports point one way (DESIGN section 2): kernels <- engine.kv <- engine core and weights <- the
evaluation harness (engine.eval) <- the CLIs. Every module of the project is read with `ast` (nothing
is imported or run), every `import x` / `from x import y` in it, at module level or inside a
function, is given the layer of what it imports, and an import from a higher layer fails the test
with the file, the line and the import."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("engine", "kernels", "weights", "tools")  # walked recursively
SCRIPTS = ("generate.py", "bench.py", "profile_layers.py")
CLI = 4
LAYER_NAMES = {0: "kernels", 1: "engine.kv", 2: "engine core", 3: "engine.eval", CLI: "CLI"}

# Imports known to point the wrong way, as (file, imported module). Empty: keep it so.
KNOWN: set[tuple[str, str]] = set()


def layer(module: str) -> int | None:
    """The layer of a dotted module name; None for what is not ours (stdlib, torch, ...)."""
    top = module.split(".")[0]
    if top == "kernels":
        return 0
    # engine.config (ModelArgs, the presets) imports nothing of ours: the policies' vocabulary too
    if module == "engine.kv" or module.startswith("engine.kv.") or module == "engine.config":
        return 1
    if module == "engine.eval" or module.startswith("engine.eval."):
        return 3
    if top in ("engine", "weights"):
        return 2
    if top in ("tools",) + tuple(s.removesuffix(".py") for s in SCRIPTS):
        return CLI
    return None


def module_name(path: str) -> str:
    """'engine/kv/base.py' -> 'engine.kv.base'; a package's __init__.py -> the package."""
    parts = path.removesuffix(".py").split("/")
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_files() -> list[str]:
    """Every .py file of the project, relative to ROOT with '/' separators."""
    out = [s for s in SCRIPTS if os.path.exists(os.path.join(ROOT, s))]
    for pkg in PACKAGES:
        for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, pkg)):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            rel = os.path.relpath(dirpath, ROOT).replace(os.sep, "/")
            out += [f"{rel}/{f}" for f in filenames if f.endswith(".py")]
    return sorted(out)


def imports(path: str, source: str, modules: set[str]) -> list[tuple[int, str, str]]:
    """-> (line, imported module, the statement as written) for every import in `source`.
    `from pkg import name` imports pkg.name when that is one of `modules` (a submodule), else pkg."""
    me = module_name(path)
    out = []
    for node in ast.walk(ast.parse(source, filename=path)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name, f"import {a.name}") for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: '.' is this module's package
                pkg = me.split(".") if path.endswith("__init__.py") else me.split(".")[:-1]
                base = ".".join(pkg[:len(pkg) - node.level + 1] + ([base] if base else []))
            for a in node.names:
                full = f"{base}.{a.name}"
                target = full if full in modules else base
                out.append((node.lineno, target, f"from {'.' * node.level}{node.module or ''} import {a.name}"))
    return sorted(out)  # ast.walk goes breadth first: function bodies after the module level


def violations(sources: dict[str, str], modules: set[str]) -> list[str]:
    """'file:line: statement (layer -> layer)' for each import that points up or at a CLI script."""
    bad = []
    for path, source in sources.items():
        mine = layer(module_name(path))
        for line, target, stmt in imports(path, source, modules):
            theirs = layer(target)
            if theirs is None or mine is None or (path, target) in KNOWN:
                continue
            # kernels importing engine/weights at all is the layer rule's case mine=0 < theirs.
            if theirs > mine or theirs == CLI:
                bad.append(f"{path}:{line}: {stmt} ({LAYER_NAMES[mine]} imports {LAYER_NAMES[theirs]})")
    return bad


def test_imports_point_one_way():
    files = project_files()
    assert "engine/eval/cells.py" in files and "kernels/pack.py" in files and "generate.py" in files
    sources = {}
    for path in files:
        with open(os.path.join(ROOT, path), encoding="utf-8") as f:
            sources[path] = f.read()
    bad = violations(sources, {module_name(p) for p in files})
    assert not bad, "imports against the layering (DESIGN section 2):\n" + "\n".join(bad)


def test_the_walker_catches_upward_imports():
    modules = {"engine.eval", "engine.eval.cells", "engine.model", "engine.kv", "engine.kv.base", "kernels"}
    fake = {
        "kernels/fake.py": "import torch\n\ndef f():\n    from engine.model import Llama\n",
        "engine/kv/fake.py": "from engine.kv.base import KVPolicy\nimport engine.eval.cells\n",
        "engine/fake.py": "from engine.eval import cells\nfrom . import model\n",
        "engine/eval/fake.py": "from engine.kv import base\n\n\ndef g():\n    import generate\n",
        "tools/fake.py": "from engine.eval import cells\nfrom bench import parse_policies\n",
    }
    bad = violations(fake, modules)
    assert bad == [
        "kernels/fake.py:4: from engine.model import Llama (kernels imports engine core)",
        "engine/kv/fake.py:2: import engine.eval.cells (engine.kv imports engine.eval)",
        "engine/fake.py:1: from engine.eval import cells (engine core imports engine.eval)",
        "engine/eval/fake.py:5: import generate (engine.eval imports CLI)",
        "tools/fake.py:2: from bench import parse_policies (CLI imports CLI)",
    ]
