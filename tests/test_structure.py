"""The package's shape: no import cycles among picochat's modules, and the stage modules (the CLI commands that run
a stage of the pipeline) are leaves that no other stage imports: what two stages share lives in a library module.
Imports inside functions count as much as those at the top of a module."""
import ast
from pathlib import Path

from picochat.cli import COMMAND_MODULES

PACKAGE = Path(__file__).resolve().parents[1] / "picochat"
# CLI commands that are also libraries every stage needs
LIBRARY_COMMANDS = {"data", "tokenizer"}
STAGES = {f"picochat.{m}" for m in COMMAND_MODULES} - {f"picochat.{m}" for m in LIBRARY_COMMANDS}


def module_name(path):
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def import_graph():
    """{module: {imported picochat module: first line that imports it}} over picochat/*.py and picochat/tasks/*.py."""
    paths = sorted(PACKAGE.glob("*.py")) + sorted((PACKAGE / "tasks").glob("*.py"))
    modules = {module_name(p): p for p in paths}
    graph = {}
    for name, path in modules.items():
        edges = graph.setdefault(name, {})
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package `level` steps up
                    up = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                # `from picochat import x` imports the module picochat.x when there is one
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for t in targets:
                while t and t not in modules:  # picochat.x.y (an attribute path) -> picochat.x
                    t = t.rpartition(".")[0]
                if t and t != name and t != "picochat":
                    edges.setdefault(t, node.lineno)
    return graph


def find_cycle(graph):
    """One import cycle as a list of modules [a, b, ..., a], or None."""
    state = {}

    def visit(m, stack):
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == "open":
                return stack[stack.index(n):] + [n]
            if n not in state:
                found = visit(n, stack)
                if found:
                    return found
        stack.pop()
        state[m] = "done"
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m, [])
            if found:
                return found
    return None


def test_the_graph_sees_every_kind_of_import(tmp_path):
    graph = import_graph()
    assert "picochat.tasks.gsm8k" in graph and "picochat.engine" in graph
    assert "picochat.decode" in graph["picochat.engine"]  # at the top of the module
    assert "picochat.calculator" in graph["picochat.engine"]  # inside a function
    assert "picochat.tasks.common" in graph["picochat.tasks.gsm8k"]  # a module of the tasks package


def test_find_cycle_names_the_loop():
    assert find_cycle({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b": 1}, "b": {"c": 1}, "c": {}}) is None


def test_no_import_cycles():
    graph = import_graph()
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(
        f"{m} (line {graph[m][n]})" for m, n in zip(cycle, cycle[1:])) + f" -> {cycle[-1]}"


def test_stages_are_leaves():
    graph = import_graph()
    assert STAGES <= set(graph), STAGES - set(graph)
    bad = [f"{m} imports the stage {n} (line {line}): move what they share into a library module"
           for m in sorted(STAGES) for n, line in sorted(graph[m].items()) if n in STAGES]
    assert not bad, "\n".join(bad)


# the project's style: keyword arguments past the first few, so a call reads without the signature beside it
MAX_POSITIONAL = 5
# "file:qualified name" of the functions whose signature is not ours to choose, each with its reason
POSITIONAL_EXCEPTIONS = {
    # autograd.Function.apply takes no keywords: it hands forward its inputs in order, and backward returns one
    # gradient per input in that order
    "model.py:LinearSoftcapCrossEntropy.forward",
}


def definitions(tree, prefix=""):
    """(qualified name, node) of every function in tree: methods and nested functions too."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield prefix + node.name, node
            yield from definitions(node, f"{prefix}{node.name}.")
        elif isinstance(node, ast.ClassDef):
            yield from definitions(node, f"{prefix}{node.name}.")
        else:
            yield from definitions(node, prefix)


def positional_parameters(fn):
    """The named parameters a call can fill by position, self or cls left out (*args is a pass-through, not counted)."""
    names = [a.arg for a in fn.args.posonlyargs + fn.args.args]
    return names[1:] if names[:1] in (["self"], ["cls"]) else names


def too_many_positional():
    """{"file:qualified name": "picochat/file:line: ..."} for every function in picochat/ over MAX_POSITIONAL."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        for name, fn in definitions(ast.parse(path.read_text(), str(path))):
            params = positional_parameters(fn)
            if len(params) > MAX_POSITIONAL:
                found[f"{rel}:{name}"] = (f"picochat/{rel}:{fn.lineno}: {name}({', '.join(params)}) takes "
                                          f"{len(params)} positional parameters")
    return found


def test_positional_parameters_are_counted_as_a_call_fills_them():
    tree = ast.parse("class A:\n    def m(self, a, b, *, c): pass\n    @classmethod\n    def k(cls, a): pass\n"
                     "def f(a, b, /, c, *args, d=1, **kw):\n    def inner(x, y): pass\n")
    found = {name: positional_parameters(fn) for name, fn in definitions(tree)}
    assert found == {"A.m": ["a", "b"], "A.k": ["a"], "f": ["a", "b", "c"], "f.inner": ["x", "y"]}


def test_keyword_arguments_past_the_first_few():
    found = too_many_positional()
    assert POSITIONAL_EXCEPTIONS <= set(found), f"no longer needed: {POSITIONAL_EXCEPTIONS - set(found)}"
    bad = [line for key, line in sorted(found.items()) if key not in POSITIONAL_EXCEPTIONS]
    assert not bad, (f"more than {MAX_POSITIONAL} positional parameters: put a * after the first few and pass the "
                     "rest by keyword at every call\n" + "\n".join(bad))


def unresolved_imports(paths):
    """`from picochat.x import name` lines (anywhere in a file, inside functions too) whose name picochat.x does not
    define: what a module split leaves behind in callers that only run in a slow test, a benchmark or on a GPU."""
    import importlib
    import importlib.util
    missing = []
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not (isinstance(node, ast.ImportFrom) and (node.module or "").startswith("picochat")):
                continue
            module = importlib.import_module(node.module)
            for alias in node.names:
                submodule = hasattr(module, "__path__") and importlib.util.find_spec(f"{node.module}.{alias.name}")
                if not hasattr(module, alias.name) and not submodule:
                    missing.append(f"{path.name}:{node.lineno} {node.module}.{alias.name}")
    return missing


def test_unresolved_imports_are_found(tmp_path):
    script = tmp_path / "old_caller.py"
    script.write_text("def f():\n    from picochat.engine import NoSuchThing\n")
    assert unresolved_imports([script]) == ["old_caller.py:2 picochat.engine.NoSuchThing"]


def test_every_picochat_import_resolves():
    """The tests, benchmarks, dev scripts and the package itself import only names that exist."""
    root = PACKAGE.parent
    folders = ("picochat", "picochat/tasks", "tests", "bench", "dev")
    paths = [p for d in folders for p in sorted((root / d).glob("*.py"))]
    assert unresolved_imports(paths) == []
