"""Code-shape rules the issue tracker asked for, checked on the source itself."""
from __future__ import annotations

import pytest
import ast

from conftest import ROOT


FOLDERS = ("dist_cifar", "benchmarks", "tests")


def python_files():
    for folder in FOLDERS:
        yield from sorted((ROOT / folder).rglob("*.py"))


@pytest.mark.quick
def test_no_call_passes_more_than_five_positional_arguments():
    """Values travel inside objects (TrainConfig, LoaderSpec, StepParts, TrainingRun), not as long
    positional lists; longer signatures are keyword-only."""
    offenders = []
    for path in python_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and len(node.args) > 5:
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} {ast.unparse(node.func)}()")
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                params = [a.arg for a in node.args.posonlyargs + node.args.args if a.arg not in ("self", "cls")]
                if len(params) > 5:
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} def {node.name}({len(params)} positional)")
    assert not offenders, offenders


@pytest.mark.quick
def test_only_the_assembler_builds_trainer_parts():
    """Loaders, eval shards, optimizers and schedules are built in assembly.py and nowhere else
    (tests of the loaders themselves and the loader benchmark excepted)."""
    builders = {"build_train_loader", "EvalShards", "build_optimizer", "build_scheduler", "wrap_model"}
    allowed = {"dist_cifar/assembly.py", "dist_cifar/loaders.py"}
    offenders = []
    for path in python_files():
        rel = str(path.relative_to(ROOT))
        if rel in allowed:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
                if name in builders:
                    offenders.append(f"{rel}:{node.lineno} {name}")
    assert not offenders, offenders


def test_the_product_cites_nothing_outside_the_repository():
    text = "".join(p.read_text() for folder in ("dist_cifar", "launch", "slurm")
                   for p in sorted((ROOT / folder).rglob("*")) if p.is_file() and p.suffix in (".py", ".sh", ".sbatch"))
    text += (ROOT / "README.md").read_text()
    assert "../shared" not in text and "PROTOCOL.md" not in text
    assert (ROOT / "docs" / "report_protocol.md").read_text().count("|") > 50


def package_imports() -> dict[str, set[str]]:
    """module -> the package modules it imports (relative imports, late ones inside functions too)."""
    graph = {}
    for path in sorted((ROOT / "dist_cifar").glob("*.py")):
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                deps.update([node.module.split(".")[0]] if node.module else [a.name for a in node.names])
        graph[path.stem] = deps & {p.stem for p in (ROOT / "dist_cifar").glob("*.py")} - {"__init__"}
    return graph


@pytest.mark.quick
def test_the_package_import_graph_has_no_cycle():
    """Data flows one way (config -> runtime -> ..., data -> download): a cycle means a late import
    papering over a layering mistake."""
    graph = package_imports()
    state: dict[str, str] = {}

    def visit(module, path):
        state[module] = "open"
        for dep in sorted(graph.get(module, ())):
            assert state.get(dep) != "open", "import cycle: " + " -> ".join(path + [module, dep])
            if dep not in state:
                visit(dep, path + [module])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
    assert graph["data"] >= {"download"} and "data" not in graph["download"]


@pytest.mark.quick
def test_every_file_is_created_through_files_py():
    """The standing rule of #30: outside dist_cifar/files.py no code of the package or the
    benchmarks opens a path for writing, writes a path's text or bytes, torch.save()s or
    savefig()s to a path, or chmods a path: all of that follows links a user can plant. Writing
    into a descriptor that files.py handed out is fine."""
    import re
    writes = re.compile(r"(?<!fd)open\([^)]*[\"'][wax]b?\+?[\"']|\.write_(text|bytes)\(|os\.chmod\(|shutil\.copy")
    to_a_path = re.compile(r"(torch\.save|savefig)\((?![^)]*\b(f|writer)\b)")  # file objects from files.py
    offenders = []
    for path in sorted([*(ROOT / "dist_cifar").glob("*.py"), *(ROOT / "benchmarks").glob("*.py")]):
        if path.name == "files.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            code = line.split("#", 1)[0]
            if writes.search(code) or to_a_path.search(code):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, offenders
