"""The layout tells the architecture: no import cycle between mmebm_dist's subpackages, data below evaluation.

The graph is read from the source (ast over every module, function-level imports included, and module names
written as strings for importlib, e.g. the command tables), not from what happens to be imported at run time.
A node is a subpackage (``data``, ``prior``, ...) or a top-level module (``config``, ``cli``); the top-level
``kernels/`` folder is the subpackage ``kernels`` (installed as ``mmebm_dist.kernels``).
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "mmebm_dist"


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of mmebm_dist and of kernels/ (as mmebm_dist.kernels)."""
    out = {}
    for root, prefix in ((PACKAGE, "mmebm_dist"), (REPO / "kernels", "mmebm_dist.kernels")):
        for path in root.rglob("*.py"):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([prefix, *parts])] = path
    return out


def _imported(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The mmebm_dist modules that module ``name`` (file ``path``) imports anywhere in its body."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import sub` imports the submodule when there is one, else a name of pkg
            targets.update(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in known:
            targets.add(node.value)  # a module named for importlib (a lazily imported command or judge)
    return {t for t in targets if t == "mmebm_dist" or t.startswith("mmebm_dist.")}


def _node(module: str) -> str:
    """The subpackage or top-level module of mmebm_dist that ``module`` belongs to."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "mmebm_dist"


def module_imports() -> dict[str, set[str]]:
    known = _modules()
    return {name: _imported(name, path, known) for name, path in known.items()}


def package_graph() -> dict[str, set[str]]:
    """Subpackage -> the other subpackages its modules import. A ``__main__`` module is an entry point
    (``python -m mmebm_dist.train`` runs the ``mmebm train`` command above the package): nothing imports it,
    so its imports cannot close a cycle, and it is left out."""
    graph: dict[str, set[str]] = {}
    for module, targets in module_imports().items():
        if module.endswith(".__main__"):
            continue
        edges = graph.setdefault(_node(module), set())
        edges.update(_node(t) for t in targets if _node(t) not in (_node(module), "mmebm_dist"))
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_sees_every_kind_of_import():
    imports = module_imports()
    assert "mmebm_dist.prior.langevin" in imports["mmebm_dist.models.multimodal_vae"]  # module level
    assert "mmebm_dist.models" in imports["mmebm_dist.train.loop"]  # inside a function
    assert "mmebm_dist.commands.data" in imports["mmebm_dist.commands"]  # a command table entry for importlib
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_between_subpackages():
    graph = package_graph()
    assert {"data", "datasets", "prior", "models", "train", "evaluate", "bench", "kernels"} <= graph.keys()
    found = cycles(graph)
    assert not found, f"import cycles between mmebm_dist subpackages: {found}; edges: " + "; ".join(
        f"{a} -> {sorted(b)}" for a, b in sorted(graph.items()) if any(a in c for c in found))


def test_layers_import_only_downwards():
    graph = package_graph()
    assert graph["kernels"] == set()  # plain tensors in, plain tensors out
    assert graph["prior"] <= {"kernels"}  # the energy, p0 and the sampler know no model
    assert "models" not in graph["data"] | graph["datasets"] | graph["prior"]
    assert "datasets" not in graph["data"]  # builders sit on the shard writer, not under it
    # the commands sit on top: only the entry point (and __main__ entry points, left out) dispatches to them
    assert {node for node, edges in graph.items() if "commands" in edges} == {"cli"}


def test_data_holds_no_evaluation_code():
    offenders = {module: sorted(t for t in targets if t.startswith("mmebm_dist.evaluate"))
                 for module, targets in module_imports().items()
                 if module.startswith(("mmebm_dist.data.", "mmebm_dist.datasets."))}
    assert not {m: t for m, t in offenders.items() if t}


# ------------------------------------------------------------------------------------- commands and files

COMMANDS_DIR = PACKAGE / "commands"
ENTRY_POINT = PACKAGE / "cli.py"
"""``mmebm``: builds the top-level parser and dispatches to ``commands/``."""


def _library_files() -> list[Path]:
    """Every module outside ``commands/`` and the entry point: the library, kernels/ included."""
    files = [*PACKAGE.rglob("*.py"), *(REPO / "kernels").rglob("*.py")]
    return [f for f in files if not f.is_relative_to(COMMANDS_DIR) and f != ENTRY_POINT]


def _main_guard(node: ast.AST) -> bool:
    """``if __name__ == "__main__":``, a worker's or a ``python -m`` entry point's body."""
    return (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
            and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__")


def _exits(tree: ast.AST) -> list[int]:
    """Lines that end the process: ``raise SystemExit(...)`` anywhere, ``sys.exit(...)`` outside a
    ``__main__`` guard."""
    guarded = {id(n) for g in ast.walk(tree) if _main_guard(g) for n in ast.walk(g)}
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Raise) and node.exc is not None:
            target = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
            if isinstance(target, ast.Name) and target.id == "SystemExit":
                lines.append(node.lineno)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "exit"
              and isinstance(node.func.value, ast.Name) and node.func.value.id == "sys"
              and id(node) not in guarded):
            lines.append(node.lineno)
    return lines


def test_argparse_only_in_commands():
    """Arguments are parsed by the commands (and the entry point) only: library code takes typed options."""
    offenders = []
    for path in _library_files():
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n == "argparse" or n.startswith("argparse.") for n in names):
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not offenders, f"argparse imported outside mmebm_dist/commands/: {offenders}"


def test_only_commands_exit():
    """Library code raises its own errors (config.OptionError for a refused option); only commands/ exits,
    and a ``__main__`` file or guard (a worker process, ``python -m mmebm_dist.train``)."""
    offenders = [f"{path.relative_to(REPO)}:{line}" for path in _library_files() if path.name != "__main__.py"
                 for line in _exits(ast.parse(path.read_text(), filename=str(path)))]
    assert not offenders, f"SystemExit / sys.exit outside mmebm_dist/commands/: {offenders}"
    assert _exits(ast.parse("raise SystemExit('x')\nimport sys\nsys.exit(1)\n")) == [1, 3]
    assert _exits(ast.parse("import sys\nif __name__ == '__main__':\n    sys.exit(1)\n")) == []


def file_cycles() -> list[list[str]]:
    """Import cycles between single files (lazy, function-level imports included; ``__main__`` left out)."""
    imports = module_imports()
    graph = {m: {t for t in targets if t in imports and t != m} for m, targets in imports.items()
             if not m.endswith(".__main__")}
    return cycles(graph)


# The one file-level cycle left, outside this rule's scope (named so that the scope can close when it goes):
# data.replan <-> data.stream.
FILE_CYCLE_EXEMPT = ("mmebm_dist.data.",)


def test_no_import_cycle_between_files():
    """No file-level import cycle (lazy imports included) outside data/: in particular none inside datasets/
    (builders no longer import argparse helpers from a command), commands/ or evaluate/ (report.md's writer
    and the modules whose sections it writes share reporting.tables; coherence and the judges share
    evaluate.interfaces)."""
    found = file_cycles()
    outside = [c for c in found if not all(m.startswith(FILE_CYCLE_EXEMPT) for m in c)]
    assert not outside, f"file-level import cycles: {outside}"
    assert not [c for c in found if any(m.startswith("mmebm_dist.datasets") for m in c)]


def test_shared_types_and_tables_are_leaves():
    """The modules every evaluation or document module reads import none of those, so no arrow runs back."""
    imports = module_imports()
    leaves = ("mmebm_dist.evaluate.interfaces", "mmebm_dist.reporting.tables",
              "mmebm_dist.evaluate.judges.options")
    for leaf in leaves:
        assert not {t for t in imports[leaf] if t.startswith(("mmebm_dist.evaluate", "mmebm_dist.reporting"))}
    assert package_graph()["reporting"] == set()  # the table helpers need nothing of the package


def test_the_training_loop_names_no_stage():
    """train/loop.py applies a stage of the schedule without knowing which: no stage name as a string, no
    call that switches the model's stage, no energy-update or reference-fit setting (mmebm_dist.schedule says
    what each stage trains and adds; the model's ``on_step`` / ``objective`` hooks do the rest)."""
    import typing

    from mmebm_dist.config import StageName

    path = PACKAGE / "train" / "loop.py"
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set(typing.get_args(StageName))
    assert names == {"reference", "energy", "joint"}  # the rule reads the real list
    strings = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    words = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    words |= {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    assert not names & strings, f"{path} names the stages {sorted(names & strings)}"
    banned = {"set_stage", "energy_updates", "reference_refit", "fit_reference", "learned_reference",
              "energy"}
    assert not banned & words, f"{path} uses {sorted(banned & words)}, which belong to the model or schedule"


def _external_imports(path: Path) -> set[str]:
    """Top-level names of every package ``path`` imports anywhere in its body (absolute imports only)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_deepspeed_is_imported_only_by_training():
    """Parallelism stays in train/ (torchtitan: applied to a plain model): the prior and the model never
    know how they are sharded; train/zero3.py hands the sampler its ZeRO-3 gather."""
    importers = {name for name, path in _modules().items() if "deepspeed" in _external_imports(path)}
    assert importers, "the scan found no deepspeed import at all: it is broken"
    assert all(_node(name) == "train" for name in importers), sorted(importers)


def _functions_calling(path: Path, dotted: str) -> set[str]:
    """Names of the functions in ``path`` whose body calls ``dotted`` (e.g. torch.autograd.grad)."""
    found = set()
    for fn in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
            calls = (ast.unparse(node.func) for node in ast.walk(fn) if isinstance(node, ast.Call))
            if dotted in calls:
                found.add(fn.name)
    return found


def test_one_langevin_autograd_reference():
    """The Langevin update by autograd is written once: kernels._utils.langevin_reference (any energy
    callable; the prior's autograd backend and every kernel test use it). The only other autograd.grad is
    the AIS estimator's MALA target (evaluate/likelihood.py: a Metropolis-adjusted float64 chain)."""
    callers = {(name, fn) for name, path in _modules().items()
               for fn in _functions_calling(path, "torch.autograd.grad")}
    assert callers == {("mmebm_dist.kernels._utils", "langevin_reference"),
                       ("mmebm_dist.evaluate.likelihood", "_log_target_and_grad")}
