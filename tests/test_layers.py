"""The package's layers: a module imports only from its own layer or below
(docs/development.md, "Layers"). Imports under ``if __name__ == "__main__":`` and in
``__main__.py`` files are command lines' (ldm.app's layer), and are not counted."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Lowest first; a module may import modules of its own rank or lower.
RANKS = {
    "io": 0,  # weight files
    "seeding": 0,
    "conf": 0,  # configs (ldm/conf links to conf/)
    "": 0,  # the package itself (__version__)
    "diffusion": 1,  # pure math
    "nn": 2,
    "models": 3,
    "data": 4,
    "convert": 5,
    "pipeline": 6,  # checkpoints in, images out
    "metrics": 7,
    "studies": 7,
    "training": 8,
    "serving": 8,  # the HTTP service: batcher, model side, FastAPI app
    "tools": 9,
    "app": 9,
    "train": 9,  # python -m ldm.train / sample / evaluate: command lines
    "sample": 9,
    "evaluate": 9,
    "study": 9,
    "serve": 9,
}


def _part(module: str) -> str:
    """``ldm.models.unet`` -> ``models``; ``ldm`` -> ``""``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


class _Imports(ast.NodeVisitor):
    def __init__(self):
        self.found: list[tuple[int, str]] = []

    def visit_If(self, node: ast.If) -> None:
        test = node.test
        if isinstance(test, ast.Compare) and getattr(test.left, "id", None) == "__name__":
            return  # the command line's imports
        self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        self.found += [(node.lineno, a.name) for a in node.names if a.name.startswith("ldm")]

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:  # relative: resolved against the package
            raise AssertionError(f"line {node.lineno}: use absolute imports")
        if node.module == "ldm":
            for alias in node.names:  # a module of the package, or a name like CONF_DIR
                path = ROOT / "ldm" / alias.name
                module = path.is_dir() or path.with_suffix(".py").is_file()
                self.found.append((node.lineno, f"ldm.{alias.name}" if module else "ldm"))
        elif node.module and node.module.startswith("ldm."):
            self.found.append((node.lineno, node.module))


def _graph() -> list[tuple[str, int, str]]:
    edges = []
    for path in sorted((ROOT / "ldm").rglob("*.py")):
        if path.name == "__main__.py":  # ``python -m ldm.x``: a command line, like ldm.app
            continue
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        visitor = _Imports()
        visitor.visit(ast.parse(path.read_text(encoding="utf-8")))
        edges += [(module, line, target) for line, target in visitor.found]
    return edges


def test_every_part_of_the_package_has_a_layer():
    parts = {_part(".".join(p.relative_to(ROOT).with_suffix("").parts))
             for p in (ROOT / "ldm").rglob("*.py")}  # fmt: skip
    parts.discard("__init__")
    assert parts <= RANKS.keys(), f"give {sorted(parts - RANKS.keys())} a rank in RANKS"


def test_modules_import_only_from_their_layer_or_below():
    upward = [
        f"{module}:{line} imports {target}"
        for module, line, target in _graph()
        if RANKS.get(_part(target), 99) > RANKS[_part(module)]
    ]
    assert not upward, "imports upward:\n" + "\n".join(upward)


def test_the_rule_sees_function_level_imports(tmp_path):
    source = "def f():\n    from ldm.app.train import train\n"
    visitor = _Imports()
    visitor.visit(ast.parse(source))
    assert visitor.found == [(2, "ldm.app.train")]
