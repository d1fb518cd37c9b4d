"""The layering the code promises: the core never imports Ray, and nothing imports upward."""
import ast
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
CORE = sorted(p for p in (ROOT / "kd_ray" / "core").rglob("*.py"))


def test_every_core_module_imports_with_ray_unimportable():
    # a meta-path finder that refuses `ray` and its submodules, then every core module is imported
    modules = [".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__") for p in CORE]
    code = (
        "import sys, importlib.abc\n"
        "class NoRay(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name == 'ray' or name.startswith('ray.'):\n"
        "            raise ImportError('ray is not importable in this test')\n"
        "sys.meta_path.insert(0, NoRay())\n"
        f"import importlib\nfor m in {modules!r}: importlib.import_module(m)\n"
        "import kd_ray.layout\n"
        "assert not any(k == 'ray' or k.startswith('ray.') for k in sys.modules)\n"
        "print('ok', len(sys.argv))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert len(modules) >= 9  # config, data, subsets, augment, models, losses, ensemble, train, storage


def _imports(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {m for m in out if m.startswith("kd_ray")}


def test_no_lower_layer_imports_a_higher_one():
    # core < layout < stages < report/export/cli
    rank = {"kd_ray.core": 0, "kd_ray.layout": 1, "kd_ray.stages": 2}
    def layer(module: str) -> int:
        return next((r for prefix, r in rank.items() if module == prefix or module.startswith(prefix + ".")), 3)

    for path in (ROOT / "kd_ray").rglob("*.py"):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for imported in _imports(path):
            if imported == "kd_ray":
                continue
            assert layer(imported) <= layer(module), f"{module} imports {imported} from a higher layer"


def test_no_import_cycles_between_modules():
    graph = {}
    for path in (ROOT / "kd_ray").rglob("*.py"):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        graph[module] = {m for m in _imports(path) if m != module}
    seen, stack = set(), []

    def visit(m):
        if m in stack:
            raise AssertionError(f"import cycle: {' -> '.join(stack[stack.index(m):] + [m])}")
        if m in seen or m not in graph:
            return
        stack.append(m)
        for n in sorted(graph[m]):
            visit(n)
        stack.pop()
        seen.add(m)

    for m in sorted(graph):
        visit(m)
