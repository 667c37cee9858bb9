"""The tree is the architecture: imports point one way, no circle (lazy imports included), small
modules, torch-free stages, and docs that match the tree and the command line."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import click
import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "mimicfilter"
CLI = ROOT / "cli"  # installed as mimicfilter_cli
MAX_MODULE_LINES = 400
MAX_PIPELINE_FUNCTION_LINES = 50  # the score pipeline's middle layer reads function by function

# Who may import whom: a module may import its own subpackage and anything of a lower layer.
# The root package (the lazy public API) and __main__ sit above everything; the CLI above that.
LAYERS = {
    "errors": 0, "version": 0, "metrics": 0, "timing": 0, "lean_imports": 0, "checksums": 0,
    "defaults": 1,
    "store": 2,
    "shards": 3, "mimic": 3, "execute": 3,
    "curate": 4, "train": 4,  # train: open_clip's trainer with GradMimic (imports mimic, never pipeline)
    "pipeline": 5, "extrapolate": 5, "report": 5,
    "dedup": 6,  # near-duplicate search: extrapolate's embedding readers, faiss, the executors
    "": 7,  # mimicfilter/__init__.py
    "__main__": 8,
}
TORCH_FREE = ("errors", "version", "metrics", "timing", "checksums", "defaults", "store", "curate", "report")


def module_name(path: Path) -> str:
    if path.is_relative_to(CLI):
        parts = ["mimicfilter_cli", *path.relative_to(CLI).with_suffix("").parts]
    else:
        parts = ["mimicfilter", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    files = sorted(PACKAGE.rglob("*.py")) + sorted(CLI.rglob("*.py"))
    return {module_name(path): path for path in files}


MODULES = all_modules()


def imports_of(path: Path) -> list[tuple[str, int, bool]]:
    """(imported module, line, at module level) for every import statement, functions included."""
    tree = ast.parse(path.read_text())
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno, id(node) in top_level) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                found.append((candidate if candidate in MODULES else node.module, node.lineno, id(node) in top_level))
    return found


def internal_edges() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {name: set() for name in MODULES}
    for name, path in MODULES.items():
        for target, _, _ in imports_of(path):
            if target in MODULES and target != name:
                edges[name].add(target)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one member (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(edges[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in edges[node]:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def stage(module: str) -> str:
    """The subpackage (or top-level module) a module belongs to; "" for the root package."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_the_cycle_finder_finds_a_lazy_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle_inside_the_package_not_even_a_lazy_one():
    assert cycles(internal_edges()) == []


def test_imports_point_one_way():
    wrong = []
    for name, path in MODULES.items():
        if name.startswith("mimicfilter_cli"):
            continue  # the click layer sits on top and may import any stage
        for target, line, _ in imports_of(path):
            if target.startswith("mimicfilter_cli") and name != "mimicfilter.__main__":
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports the CLI ({target})")
            if not target.startswith("mimicfilter.") or target not in MODULES:
                continue
            source, destination = stage(name), stage(target)
            if source != destination and LAYERS[destination] >= LAYERS[source]:
                wrong.append(f"{path.relative_to(ROOT)}:{line} ({source or 'root'}) imports {target}")
    assert wrong == []


def test_every_stage_has_a_layer():
    assert {stage(name) for name in MODULES if name == "mimicfilter" or name.startswith("mimicfilter.")} <= set(LAYERS)


def test_no_module_is_over_the_size_limit():
    too_long = {str(path.relative_to(ROOT)): count for path in MODULES.values()
                if (count := len(path.read_text().splitlines())) > MAX_MODULE_LINES}
    assert too_long == {}


def function_lengths(path: Path) -> dict[str, int]:
    """Lines of every function and method of a module (decorators excluded, docstrings included)."""
    tree = ast.parse(path.read_text())
    return {f"{path.name}:{node.lineno} {node.name}": node.end_lineno - node.lineno + 1
            for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}


def test_the_function_length_counter_counts_methods_and_nested_functions(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def outer():\n    def inner():\n        return 1\n    return inner\n\n\n"
                      "class C:\n    def method(self):\n        x = 1\n        return x\n")
    assert function_lengths(module) == {"m.py:1 outer": 4, "m.py:2 inner": 2, "m.py:8 method": 3}


def test_no_pipeline_function_is_over_the_length_limit():
    too_long = {name: count for path in sorted((PACKAGE / "pipeline").glob("*.py"))
                for name, count in function_lengths(path).items() if count > MAX_PIPELINE_FUNCTION_LINES}
    assert too_long == {}


def test_torch_free_stages_never_import_torch():
    offenders = []
    for name, path in MODULES.items():
        if name.startswith("mimicfilter.") and stage(name) in TORCH_FREE:
            offenders += [f"{name}:{line}" for target, line, _ in imports_of(path)
                          if target.split(".")[0] in ("torch", "open_clip", "torchvision", "webdataset")]
    assert offenders == []


def test_shards_import_torch_only_where_a_tensor_is_needed():
    """shards/ hands tensors around but loads torch lazily, so `report` can decode images without it."""
    eager = [f"{name}:{line}" for name, path in MODULES.items() if stage(name) == "shards"
             for target, line, top in imports_of(path) if top and target.split(".")[0] in ("torch", "open_clip")]
    assert eager == []


def test_filter_and_report_run_without_loading_torch():
    code = ("import sys, mimicfilter_cli.main, mimicfilter.curate.filter, mimicfilter.report.build, "
            "mimicfilter.report.sheets; print(sorted(m for m in ('torch', 'open_clip') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_score_loads_neither_duckdb_nor_the_report():
    """Commands are imported when they run: `score` starts without DuckDB, pyarrow.compute or matplotlib."""
    code = ("import sys; from mimicfilter_cli.main import cli; cli.get_command(None, 'score'); "
            "print(sorted(m for m in ('duckdb', 'matplotlib', 'mimicfilter.curate.votes', 'mimicfilter_cli.filter') "
            "if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_the_package_and_python_m_still_work():
    import mimicfilter

    assert callable(mimicfilter.GradMimic) and callable(mimicfilter.contrastive_per_sample_loss)
    result = subprocess.run([sys.executable, "-m", "mimicfilter", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "score" in result.stdout


# ---------------------------------------------------------------------------------- docs


def test_architecture_doc_lists_every_module_and_only_real_ones():
    text = (ROOT / "docs" / "architecture.md").read_text()
    paths = {str(path.relative_to(ROOT)) for path in MODULES.values() if path.name != "__init__.py"}
    missing = sorted(path for path in paths if f"`{path}`" not in text)
    assert missing == []
    import re

    mentioned = set(re.findall(r"`((?:mimicfilter|cli)/[\w/]+\.py)`", text))
    assert sorted(mentioned - paths) == []


COMMAND_PAGES = {"filter": "filter.md", "report": "report.md"}


@pytest.mark.parametrize("command_name", ["score", "filter", "report", "embed", "extrapolate", "dedup"])
def test_every_option_in_help_is_documented(command_name):
    from mimicfilter_cli.main import cli

    command = cli.all_commands[command_name]
    pages = ["usage.md"] + ([COMMAND_PAGES[command_name]] if command_name in COMMAND_PAGES else [])
    text = "".join((ROOT / "docs" / page).read_text() for page in pages)
    assert f"mimicfilter {command_name}" in text
    options = [opt for param in command.params if isinstance(param, click.Option)
               for opt in param.opts if opt.startswith("--") and opt != "--help"]
    assert [option for option in options if option not in text] == []
    assert "Example:" in command.help


def test_documented_options_exist():
    """Every option named in a docs/usage.md table row is an option of some command."""
    import re

    from mimicfilter_cli.main import cli

    known = {opt for command in cli.all_commands.values() for param in command.params
             if isinstance(param, click.Option) for opt in param.opts}
    text = (ROOT / "docs" / "usage.md").read_text()
    documented = set(re.findall(r"^\| `(--[a-z-]+)", text, flags=re.M))
    assert documented and sorted(documented - known) == []
