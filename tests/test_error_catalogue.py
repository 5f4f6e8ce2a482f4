"""docs/errors.md lists every error reason the service can raise, each with its gRPC status.

The reasons are found by reading the source of service/**/*.py (AST, nothing imported):

- string constants (UPPER_SNAKE) passed as a `reason=` keyword, directly, in a conditional
  expression, or through a module-level name (`REASON = "X"` ... `reason=REASON`);
- the `reason` field of a dataclass such as the merge jobs' JobError, given positionally;
- the `default_reason` of an error class (a class with `code` and `default_reason`, like
  errors.InvalidArgument), when that class is instantiated somewhere without a `reason`.

The status comes from the error class called (its `code = grpc.StatusCode.X`, inherited) or from
the `grpc.StatusCode.X` in the code argument of a JobError-like record; a reason passed to
anything else only has to be listed.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parent.parent
SERVICE = ROOT / "service"
CATALOGUE = ROOT / "docs" / "errors.md"

REASON = re.compile(r"^[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)*$")
STATUS_NAMES = {code.name for code in grpc.StatusCode}
ROW = re.compile(r"^\|\s*`(?P<reason>[A-Z0-9_]+)`\s*\|(?P<status>[^|]*)\|")


@dataclass(frozen=True)
class Raised:
    """One place the service raises a reason."""

    reason: str
    status: str | None
    """The gRPC status name, when the scanner can tell."""
    where: str


@dataclass
class _Class:
    name: str
    bases: list[str]
    code: str | None = None
    default_reason: ast.expr | None = None
    defines_init: bool = False
    fields: list[str] = field(default_factory=list)
    """Annotated fields in order (the positional parameters of a dataclass)."""


def _name(node: ast.expr) -> str | None:
    """`X` of `X` or of `a.b.X`."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


def _status_in(node: ast.AST) -> str | None:
    """The X of the first `grpc.StatusCode.X` (or `StatusCode.X`) in `node`."""
    for sub in ast.walk(node):
        if isinstance(sub, ast.Attribute) and sub.attr in STATUS_NAMES and _name(sub.value) == "StatusCode":
            return sub.attr
    return None


class Scanner:
    """The reasons raised in a set of Python sources."""

    def __init__(self, sources: dict[str, str]) -> None:
        self.trees = {where: ast.parse(text, where) for where, text in sources.items()}
        self.constants: dict[str, set[str]] = {}
        self.classes: dict[str, _Class] = {}
        for tree in self.trees.values():
            self._collect(tree)

    def _collect(self, tree: ast.Module) -> None:
        for node in tree.body:
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
                for target in node.targets:
                    if isinstance(target, ast.Name):
                        self.constants.setdefault(target.id, set()).add(node.value.value)
        for node in ast.walk(tree):
            if not isinstance(node, ast.ClassDef):
                continue
            cls = _Class(node.name, [n for n in (_name(b) for b in node.bases) if n])
            for item in node.body:
                targets: list[ast.expr] = []
                value: ast.expr | None = None
                if isinstance(item, ast.Assign):
                    targets, value = item.targets, item.value
                elif isinstance(item, ast.AnnAssign):
                    targets, value = [item.target], item.value
                    if isinstance(item.target, ast.Name):
                        cls.fields.append(item.target.id)
                elif isinstance(item, ast.FunctionDef) and item.name == "__init__":
                    cls.defines_init = True
                for target in targets:
                    if isinstance(target, ast.Name) and value is not None:
                        if target.id == "code":
                            cls.code = _status_in(value)
                        elif target.id == "default_reason":
                            cls.default_reason = value
            self.classes.setdefault(node.name, cls)

    def _chain(self, name: str) -> Iterator[_Class]:
        """The class and its ancestors defined in the sources (first base first)."""
        seen: set[str] = set()
        todo = [name]
        while todo:
            current = todo.pop(0)
            if current in seen or current not in self.classes:
                continue
            seen.add(current)
            cls = self.classes[current]
            yield cls
            todo.extend(cls.bases)

    def _error_class(self, name: str) -> tuple[str | None, ast.expr | None, bool] | None:
        """(status, default reason, own __init__ below the root) of an error class, or None when `name` is none."""
        chain = list(self._chain(name))
        if not any(c.default_reason is not None for c in chain):
            return None
        status = next((c.code for c in chain if c.code), None)
        default = next(c.default_reason for c in chain if c.default_reason is not None)
        root = chain[-1].name
        custom_init = any(c.defines_init for c in chain if c.name != root)
        return status, default, custom_init

    def reasons_in(self, node: ast.expr) -> set[str]:
        """UPPER_SNAKE string constants in an expression, following module-level names."""
        found: set[str] = set()
        for sub in ast.walk(node):
            if isinstance(sub, ast.Constant) and isinstance(sub.value, str):
                candidates = {sub.value}
            elif isinstance(sub, (ast.Name, ast.Attribute)) and _name(sub) in self.constants:
                candidates = self.constants[_name(sub) or ""]
            else:
                continue
            found |= {c for c in candidates if REASON.match(c)}
        return found

    def raised(self) -> list[Raised]:
        """Every (reason, status, place) in the sources."""
        out: list[Raised] = []
        for where, tree in self.trees.items():
            for node in ast.walk(tree):
                if isinstance(node, ast.Call):
                    out += self._call(node, f"{where}:{node.lineno}")
        return out

    def _call(self, node: ast.Call, where: str) -> list[Raised]:
        callee = _name(node.func) or ""
        error = self._error_class(callee)
        status = error[0] if error else None
        out: list[Raised] = []
        keywords = {k.arg: k.value for k in node.keywords}
        if "reason" in keywords:
            out += [Raised(r, status, where) for r in sorted(self.reasons_in(keywords["reason"]))]
        elif error is not None and None not in keywords and not error[2] and error[1] is not None:
            out += [Raised(r, status, where + " (default_reason)") for r in sorted(self.reasons_in(error[1]))]
        record = self.classes.get(callee)
        if record is not None and error is None and "reason" in record.fields:
            index = record.fields.index("reason")
            record_status = None
            if "code" in record.fields:
                code_index = record.fields.index("code")
                code_arg = node.args[code_index] if len(node.args) > code_index else keywords.get("code")
                record_status = _status_in(code_arg) if code_arg is not None else None
            if len(node.args) > index:
                out += [Raised(r, record_status, where) for r in sorted(self.reasons_in(node.args[index]))]
            elif "reason" in keywords:
                out = [Raised(r.reason, record_status, r.where) for r in out]
        return out


def service_sources() -> dict[str, str]:
    return {str(p.relative_to(ROOT)): p.read_text(encoding="utf-8") for p in sorted(SERVICE.rglob("*.py"))}


def catalogue() -> dict[str, set[str]]:
    """reason -> the statuses its row lists."""
    rows: dict[str, set[str]] = {}
    for line in CATALOGUE.read_text(encoding="utf-8").splitlines():
        match = ROW.match(line)
        if match:
            reason = match["reason"]
            assert reason not in rows, f"docs/errors.md lists {reason} twice"
            statuses = set(re.findall(r"[A-Z_]+", match["status"]))
            assert statuses and statuses <= STATUS_NAMES, f"docs/errors.md: {reason} has no valid gRPC status: {match['status']!r}"
            rows[reason] = statuses
    return rows


def test_every_raised_reason_is_in_the_catalogue() -> None:
    documented = catalogue()
    missing: dict[str, list[str]] = {}
    for r in Scanner(service_sources()).raised():
        if r.reason not in documented:
            missing.setdefault(r.reason, []).append(r.where)
    assert not missing, "reasons the service raises but docs/errors.md does not list (add a row each):\n" + "\n".join(
        f"  {reason}: {', '.join(places)}" for reason, places in sorted(missing.items())
    )


def test_every_catalogue_entry_is_still_raised() -> None:
    raised = {r.reason for r in Scanner(service_sources()).raised()}
    stale = sorted(set(catalogue()) - raised)
    assert not stale, f"docs/errors.md lists reasons the service no longer raises (remove them): {', '.join(stale)}"


def test_catalogue_gives_each_reason_its_status() -> None:
    documented = catalogue()
    wrong = sorted(
        f"  {r.reason}: raised as {r.status} at {r.where}, listed as {', '.join(sorted(documented[r.reason]))}"
        for r in Scanner(service_sources()).raised()
        if r.status is not None and r.reason in documented and r.status not in documented[r.reason]
    )
    assert not wrong, "docs/errors.md gives the wrong status:\n" + "\n".join(wrong)


def test_the_scanner_finds_each_form() -> None:
    source = '''
import grpc
from dataclasses import dataclass

class KinshipError(Exception):
    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    default_reason = "INTERNAL"
    def __init__(self, message, *, reason=None): ...

class FailedPrecondition(KinshipError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    default_reason = "FAILED_PRECONDITION"

class Corrupt(FailedPrecondition):
    default_reason = CORRUPT

class Wrapped(FailedPrecondition):
    def __init__(self, message):
        super().__init__(message, reason="WRAPPED")

class Unused(KinshipError):
    default_reason = "NEVER_RAISED"

CORRUPT = "CORRUPT_FILE"
FALLBACK = "FALLBACK_REASON"

@dataclass(frozen=True)
class JobError:
    code: int
    message: str
    reason: str

def f(exc, cond):
    FailedPrecondition("a", reason="DIRECT" if cond else FALLBACK)
    errors.FailedPrecondition("b")
    Corrupt("c")
    Wrapped("d")
    FailedPrecondition("e", reason=exc.reason)
    JobError(number(grpc.StatusCode.ABORTED), "f", "RESTARTED")
    JobError(code=number(grpc.StatusCode.UNAVAILABLE), message="g", reason="GONE")
    print("not a reason", reason="free text")
'''
    found = {(r.reason, r.status) for r in Scanner({"x.py": source}).raised()}
    assert found == {
        ("DIRECT", "FAILED_PRECONDITION"),
        ("FALLBACK_REASON", "FAILED_PRECONDITION"),
        ("FAILED_PRECONDITION", "FAILED_PRECONDITION"),
        ("CORRUPT_FILE", "FAILED_PRECONDITION"),
        ("WRAPPED", None),
        ("RESTARTED", "ABORTED"),
        ("GONE", "UNAVAILABLE"),
    }


def test_the_scanner_sees_the_service() -> None:
    """A broken scanner would pass the tests above vacuously: the service's main forms must be found."""
    raised = {r.reason for r in Scanner(service_sources()).raised()}
    assert {"CORRUPT_SAFETENSORS", "JOB_NOT_FOUND", "TOKEN_MISSING", "SERVER_RESTARTED", "INVALID_ARGUMENT"} <= raised
