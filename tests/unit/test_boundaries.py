"""Package boundaries: the client never pulls in torch or the worker; imports go one way, with no
cycles; the operators' Celery app is torch-free."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {"sdqueue": ROOT / "producer" / "sdqueue", "sdqueue_worker": ROOT / "worker" / "sdqueue_worker"}
HEAVY = ("torch", "diffusers", "transformers", "sdqueue_worker")


def _loaded_after(code: str) -> list[str]:
    probe = f"import sys; {code}; print(sorted({{m.split('.')[0] for m in sys.modules}} & {set(HEAVY)!r}))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    return eval(out.strip())


def test_client_side_never_imports_torch_or_the_worker() -> None:
    code = (
        "import sdqueue, sdqueue.cli, sdqueue.bulk, sdqueue.bulk_cli, sdqueue.webhooks, sdqueue.app, "
        "sdqueue.storage, sdqueue.aio, sdqueue.uploads, sdqueue.server.app, sdqueue.server.run; "
        "from sdqueue import SdQueue, Txt2ImgJob; "
        "from sdqueue.cli import build_parser; build_parser()"
    )
    assert _loaded_after(code) == []


def test_operator_app_is_torch_free_and_knows_the_task_names() -> None:
    code = "from sdqueue.app import app; assert {'sdqueue.txt2img', 'sdqueue.img2img'} <= set(app.tasks)"
    assert _loaded_after(code) == []


def test_the_launcher_builds_the_worker_command_without_torch() -> None:
    """``sdqueue worker`` execs Celery, which imports torch and diffusers; importing them before
    the exec as well cost 10 s of every start on a 2-core VM (15 s on the H200 host)."""
    code = (
        "import os; os.environ['SDQ_MODEL'] = 'm'; from sdqueue_worker.launch import worker_argv, "
        "notifier_argv; worker_argv(None, 'INFO'); notifier_argv(None, 'INFO', 4)"
    )
    assert [name for name in _loaded_after(code) if name != "sdqueue_worker"] == []


def _module_name(path: Path, package: str, root: Path) -> str:
    parts = [package, *path.relative_to(root).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _parse(source: str) -> ast.Module:
    """``ast.parse``, tried again on CPython 3.11's spurious "AST constructor recursion depth
    mismatch" SystemError: its AST converter keeps the recursion depth in global state
    (gh-106905, fixed in 3.12), and 3.11's traceback module parses source lines to place its
    carets, so a traceback logged at that moment by a thread an earlier integration test left
    running races this parse."""
    for attempt in range(3):
        try:
            return ast.parse(source)
        except SystemError:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def _imports(path: Path, module: str) -> set[str]:
    """Every sdqueue / sdqueue_worker module this file imports, at module level or inside functions."""
    found: set[str] = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(_parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + [base]
                ).strip(".")
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {name for name in found if name.split(".")[0] in PACKAGES}


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports (names that are not modules are dropped)."""
    files = {
        _module_name(path, name, root): path for name, root in PACKAGES.items() for path in root.rglob("*.py")
    }
    return {
        module: {dep for dep in _imports(path, module) if dep in files and dep != module}
        for module, path in files.items()
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return stack[stack.index(dep) :] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_imports_have_no_cycle() -> None:
    graph = import_graph()
    assert len(graph) > 20, "the walk found too few modules"
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_the_client_package_never_imports_the_worker_package() -> None:
    edges = [
        (module, dep)
        for module, deps in import_graph().items()
        if module.startswith("sdqueue.") or module == "sdqueue"
        for dep in deps
        if dep.split(".")[0] == "sdqueue_worker"
    ]
    assert edges == []
