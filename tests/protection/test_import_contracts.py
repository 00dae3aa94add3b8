"""The trust boundary in the source tree, checked on the AST (import-linter cannot see
attribute access such as ``torch.cuda.synchronize()``)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "service" / "src" / "tdllm"
CUDA_MODULE = SRC / "untrusted" / "cuda_device.py"
CROSSING = SRC / "trusted" / "crossing.py"
FORBIDDEN_FOR_UNTRUSTED = (
    "tdllm.trusted",
    "tdllm.model",
    "tdllm.engine",
    "tdllm.sealing",
    "tdllm.api",
    "tdllm_lab.protection",
    "tdllm.cli",
    "tdllm_attest",
)


def imported_modules(tree: ast.AST) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


def sources() -> dict[Path, ast.AST]:
    return {p: ast.parse(p.read_text(), str(p)) for p in SRC.rglob("*.py")}


def mentions_torch_cuda(tree: ast.AST) -> bool:
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr == "cuda":
            if isinstance(node.value, ast.Name) and node.value.id == "torch":
                return True
    return any(m.startswith("torch.cuda") for m in imported_modules(tree))


def test_torch_cuda_appears_only_in_the_cuda_device_module() -> None:
    users = sorted(str(p.relative_to(SRC)) for p, t in sources().items() if mentions_torch_cuda(t))
    assert users == ["untrusted/cuda_device.py"]


def test_only_the_crossing_module_imports_untrusted_code() -> None:
    importers = sorted(
        str(p.relative_to(SRC))
        for p, tree in sources().items()
        if "untrusted" not in p.parts
        and any(m.startswith("tdllm.untrusted") for m in imported_modules(tree))
    )
    assert importers == ["trusted/crossing.py"]


def test_untrusted_code_imports_nothing_trusted() -> None:
    bad = {
        str(p.relative_to(SRC)): sorted(
            m for m in imported_modules(t) if m.startswith(FORBIDDEN_FOR_UNTRUSTED)
        )
        for p, t in sources().items()
        if "untrusted" in p.parts
    }
    assert {p: m for p, m in bad.items() if m} == {}


def test_the_checker_sees_attribute_access_to_torch_cuda() -> None:
    assert mentions_torch_cuda(ast.parse("import torch\ntorch.cuda.synchronize()"))
    assert not mentions_torch_cuda(ast.parse("import torch\ntorch.zeros(1)"))
