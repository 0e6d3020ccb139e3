"""The package's layers (docs/architecture.md): each module imports only from its own layer and the layers below,
with no import circle between modules. Read from the source, function-level imports included, so that a lazy
import cannot hide an upward dependency."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "nemo_run" / "qatflow"

# Bottom to top; a module belongs to the first layer one of whose names is it or a package above it.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("foundation", ("qatflow", "qatflow.errors", "qatflow.paths", "qatflow.config", "qatflow.chat_rows",
                    "qatflow.datasets_public", "qatflow.data", "qatflow.chat", "qatflow.tokens",
                    "qatflow.distributed", "qatflow.rank_zero", "qatflow.experiment", "qatflow.nvfp4_cpu",
                    "qatflow.half_linear_cpu", "qatflow.model_shape", "qatflow.manifest", "qatflow.lifecycle",
                    "qatflow.stage_context", "qatflow.stage_results", "qatflow.artifacts")),
    ("numerics", ("qatflow.evaluation", "qatflow.export_reload", "qatflow.text_eval", "qatflow.generation",
                  "qatflow.task_accuracy", "qatflow.eval_tasks")),
    ("backends", ("qatflow.backends",)),
    ("stages", ("qatflow.stages",)),
    ("planning", ("qatflow.memory_plan", "qatflow.preflight", "qatflow.input_checks", "qatflow.cluster_checks",
                  "qatflow.graph")),
    ("executors", ("qatflow.executors",)),
    ("cli", ("qatflow.cli",)),
)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    if module == "qatflow":
        return 0
    for index, (_, names) in enumerate(LAYERS):
        if any(module == name or (name != "qatflow" and module.startswith(name + ".")) for name in names):
            return index
    raise AssertionError(f"{module} is in no layer: add it to LAYERS and to docs/architecture.md")


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """qatflow modules `path` imports anywhere in its code (`from qatflow import x` names module qatflow.x)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.startswith("qatflow"):
                found.add(node.module)
                found.update(f"{node.module}.{alias.name}" for alias in node.names
                             if f"{node.module}.{alias.name}" in modules)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("qatflow"))
    return {name for name in found if name in modules} - {module_name(path)}


def import_graph() -> dict[str, set[str]]:
    paths = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    assert {"qatflow.cli", "qatflow.graph", "qatflow.stages.runner"} <= set(paths), f"no package at {PACKAGE}"
    return {name: imports_of(path, set(paths)) for name, path in paths.items()}


def test_every_module_imports_only_its_layer_and_below():
    upward = [f"{module} ({LAYERS[layer_of(module)][0]}) imports {target} ({LAYERS[layer_of(target)][0]})"
              for module, targets in sorted(import_graph().items()) for target in sorted(targets)
              if layer_of(target) > layer_of(module)]
    assert not upward, "\n".join(upward)


def test_no_import_circle():
    graph = import_graph()
    # A package's __init__ may gather its own submodules, and they may import names it defines: that is the
    # package's own inside, not a circle between modules.
    def outside(module: str, target: str) -> bool:
        return not (target.startswith(module + ".") or module.startswith(target + "."))

    circles = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        stack.append(module)
        for target in sorted(graph[module]):
            if not outside(module, target):
                continue
            if state.get(target) == 1:
                circles.append(" -> ".join(stack[stack.index(target):] + [target]))
            elif target not in state:
                visit(target)
        stack.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)
    assert not circles, "\n".join(circles)


def test_both_backends_implement_the_backend_interface():
    from qatflow.backends import Backend, get_backend

    members = [name for name in vars(Backend) if not name.startswith("_")]
    assert "load_model" in members and "export" in members
    for name in ("hf", "nemo"):
        backend = get_backend(name)
        assert isinstance(backend, Backend), name
        assert [member for member in members if not callable(getattr(backend, member, None))] == [], name


def test_executors_are_chosen_by_name_in_one_place_and_implement_the_interface():
    from qatflow import cli, graph
    from qatflow.executors import FlowExecutor, get_executor

    config, _ = cli.load_config([])
    for name in ("local", "slurm", "docker"):
        config.run.executor = name
        executor = get_executor(config)
        assert isinstance(executor, FlowExecutor) and executor.name == name
    for module in (graph, cli):
        source = Path(module.__file__).read_text()
        assert "executor ==" not in source and "executor in (" not in source, module.__name__
