"""Static scans of cpwb's source: every call with the function it sits in and whether an atomic write wraps it."""
from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "cpwb"


@dataclass(frozen=True)
class Call:
    """One call expression in cpwb's source."""

    module: str  # dotted below cpwb, e.g. "data.pairs"
    function: str  # enclosing function, dotted through classes ("KerasTokenizer.save"); "<module>" at top level
    name: str  # dotted callee as written ("torch.save", "tmp.write_text", "open")
    node: ast.Call
    in_atomic_block: bool  # lexically inside `with atomic_path(...)`
    source: str  # the line the call starts on

    @property
    def where(self) -> str:
        return f"cpwb/{self.module.replace('.', '/')}.py:{self.node.lineno} in {self.function}: {self.source}"

    def keyword(self, name: str) -> ast.expr | None:
        """The value of keyword argument `name`, if given."""
        return next((k.value for k in self.node.keywords if k.arg == name), None)


def dotted(node: ast.expr) -> str:
    """`a.b.c` for a Name/Attribute chain; the innermost call's name followed by `()` otherwise."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{dotted(node.value)}.{node.attr}"
    if isinstance(node, ast.Call):
        return f"{dotted(node.func)}()"
    return type(node).__name__


class _Visitor(ast.NodeVisitor):
    def __init__(self, module: str, text: str) -> None:
        self.module, self.lines, self.scope, self.atomic, self.calls = module, text.splitlines(), [], 0, []

    def _scoped(self, node: ast.AST) -> None:
        self.scope.append(node.name)  # type: ignore[attr-defined]
        self.generic_visit(node)
        self.scope.pop()

    visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = _scoped

    def visit_With(self, node: ast.With) -> None:
        atomic = any(isinstance(i.context_expr, ast.Call) and dotted(i.context_expr.func).endswith("atomic_path")
                     for i in node.items)
        self.atomic += atomic
        self.generic_visit(node)
        self.atomic -= atomic

    def visit_Call(self, node: ast.Call) -> None:
        self.calls.append(Call(self.module, ".".join(self.scope) or "<module>", dotted(node.func), node,
                               self.atomic > 0, self.lines[node.lineno - 1].strip()))
        self.generic_visit(node)


def package_calls() -> Iterator[Call]:
    """Every call in every module of cpwb, subpackages included."""
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        visitor = _Visitor(".".join(path.relative_to(PACKAGE).with_suffix("").parts), text)
        visitor.visit(ast.parse(text))
        yield from visitor.calls


def constant(node: ast.expr | None) -> object:
    """The value of a literal argument, else None."""
    return node.value if isinstance(node, ast.Constant) else None
