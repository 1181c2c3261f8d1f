"""The package's house rules: the Hub remote-code folder imports only itself, no import cycle (imports inside functions
count), no library module over 600 lines. Each rule is checked on the package and, to show it can fail, on a small
package that breaks it."""

import ast
from pathlib import Path

import pytest


PACKAGE = Path(__file__).resolve().parents[1] / "ace_lora_hf"
REMOTE_FOLDER = PACKAGE / "models" / "ace_lora"
MAX_LINES = 600


def module_names(package: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every module of `package` (a package is named by its `__init__.py`)."""
    names = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(package.parent).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def imported_modules(path: Path, module: str, modules: dict[str, Path]) -> set[str]:
    """The modules of the package that `path` (module `module`) imports anywhere in it, lazily too."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            base = (f"{base}.{node.module}" if node.module else base) if node.level else node.module
            names = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def import_graph(package: Path) -> dict[str, set[str]]:
    """Each module's imports of the package, without a module's own parent packages (importing them is no cycle)."""
    modules = module_names(package)
    return {module: {target for target in imported_modules(path, module, modules)
                     if target != module and not module.startswith(f"{target}.")}
            for module, path in modules.items()}


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iteratively)."""
    index, low, on_stack, stack, cycles = {}, {}, set(), [], []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, targets = work[-1]
            target = next(targets, None)
            if target is not None:
                if target not in index:
                    index[target] = low[target] = len(index)
                    stack.append(target)
                    on_stack.add(target)
                    work.append((target, iter(sorted(graph.get(target, ())))))
                elif target in on_stack:
                    low[node] = min(low[node], index[target])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    cycles.append(sorted(component))
    return cycles


def outside_imports(package: Path, folder: Path) -> list[str]:
    """`file imports module` for every import of a module of `package` outside `folder` by a file in `folder`."""
    modules = module_names(package)
    folder_module = ".".join(folder.relative_to(package.parent).parts)
    problems = []
    for path in sorted(folder.glob("*.py")):
        module = folder_module if path.name == "__init__.py" else f"{folder_module}.{path.stem}"
        for target in sorted(imported_modules(path, module, modules)):
            if target != folder_module and modules[target].parent != folder:
                problems.append(f"{path.name} imports {target}")
    return problems


def long_modules(package: Path) -> list[str]:
    lengths = {path: len(path.read_text(encoding="utf-8").splitlines()) for path in package.rglob("*.py")}
    return [f"{path.relative_to(package.parent)}: {count} lines" for path, count in sorted(lengths.items())
            if count > MAX_LINES]


# ------------------------------------------------------------------------------------------------ the package


def test_the_remote_code_folder_imports_nothing_of_the_package_outside_it():
    assert (REMOTE_FOLDER / "modeling_ace_lora.py").is_file()
    assert outside_imports(PACKAGE, REMOTE_FOLDER) == []


def test_the_package_has_no_import_cycle():
    assert import_cycles(import_graph(PACKAGE)) == []


def test_no_library_module_is_over_600_lines():
    assert long_modules(PACKAGE) == []


# --------------------------------------------------------------------------------------- the checks can fail


def write_package(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / "pkg" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "pkg"


@pytest.fixture
def broken_package(tmp_path) -> Path:
    return write_package(tmp_path, {
        "__init__.py": "",
        "a.py": "def f():\n    from . import b  # lazy: still a cycle\n",
        "b.py": "from .a import f\n",
        "long.py": "x = 1\n" * (MAX_LINES + 1),
        "remote/__init__.py": "",
        "remote/model.py": "from .config import C\n\ndef g():\n    from ..a import f\n    import pkg.b\n",
        "remote/config.py": "C = 1\n",
    })


def test_the_checks_find_a_lazy_cycle_a_long_module_and_an_import_out_of_the_remote_folder(broken_package):
    assert import_cycles(import_graph(broken_package)) == [["pkg.a", "pkg.b"]]
    assert long_modules(broken_package) == [f"pkg/long.py: {MAX_LINES + 1} lines"]
    assert outside_imports(broken_package, broken_package / "remote") == ["model.py imports pkg.a",
                                                                            "model.py imports pkg.b"]
