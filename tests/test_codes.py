"""The codes of lenkernels/_codes.py are the only declaration of modes, aggregations, estimators,
methods and layouts: the C++ enums must match them member for member, and no Triton kernel
compares a code with an integer literal."""

from __future__ import annotations

import ast
import enum
import re
from pathlib import Path

import pytest

from lenkernels import _codes

ROOT = Path(__file__).resolve().parents[1]
HEADERS = sorted((ROOT / "csrc").rglob("*.h")) + sorted((ROOT / "csrc").rglob("*.cpp")) + sorted(
    (ROOT / "csrc").rglob("*.cu")
)


def _cpp_enums() -> dict[str, dict[str, int]]:
    """``{enum name: {member: value}}`` of every ``enum Name : int { kA = 0, ... }`` in csrc."""
    out: dict[str, dict[str, int]] = {}
    for path in HEADERS:
        text = re.sub(r"//[^\n]*", "", path.read_text())
        for name, body in re.findall(r"enum\s+(?:class\s+)?(\w+)\s*:\s*int\s*\{(.*?)\}", text, flags=re.S):
            members = {}
            for item in body.split(","):
                item = item.strip()
                if not item:
                    continue
                m = re.fullmatch(r"k(\w+)\s*=\s*(\d+)", item)
                assert m, f"{path.name}: enum {name} member {item!r} has no explicit value"
                members[m.group(1)] = int(m.group(2))
            assert name not in out or out[name] == members, f"enum {name} declared twice, differently"
            out[name] = members
    return out


def _norm(name: str) -> str:
    return name.replace("_", "").lower()


PY_ENUMS = [v for v in vars(_codes).values() if isinstance(v, type) and issubclass(v, enum.IntEnum)]


@pytest.mark.parametrize("codes", PY_ENUMS, ids=lambda e: e.__name__)
def test_cpp_enum_matches_python(codes):
    cpp = _cpp_enums()
    assert codes.__name__ in cpp, f"no C++ enum {codes.__name__} in csrc (declare it in csrc/include/lenkernels)"
    expected = {_norm(m.name): int(m) for m in codes}
    got = {_norm(k): v for k, v in cpp[codes.__name__].items()}
    assert got == expected, f"{codes.__name__}: C++ {cpp[codes.__name__]} != Python {dict(codes.__members__)}"


def test_every_cpp_enum_is_declared_in_python():
    python = {e.__name__ for e in PY_ENUMS}
    missing = sorted(set(_cpp_enums()) - python)
    assert not missing, f"C++ enums without a Python declaration in lenkernels/_codes.py: {missing}"


_CODE_ARGS = {"MODE", "AGG", "EST", "METHOD", "LEN_SOURCE", "KL", "ESTIMATOR", "DTYPE", "PHASE", "NORM"}


def test_triton_kernels_compare_codes_with_names_not_literals():
    bad = []
    for path in sorted((ROOT / "lenkernels" / "triton").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                sides = [node.left, *node.comparators]
                named = any(isinstance(s, ast.Name) and s.id in _CODE_ARGS for s in sides)
                literal = any(isinstance(s, ast.Constant) and isinstance(s.value, int) for s in sides)
                if named and literal:
                    bad.append(f"{path.name}:{node.lineno}")
    assert not bad, f"codes compared with integer literals (use lenkernels._codes): {bad}"


def test_parse_and_names_round_trip():
    assert _codes.parse(_codes.Agg, "seq-mean-token-mean", "agg") is _codes.Agg.SEQ_MEAN_TOKEN_MEAN
    assert _codes.names(_codes.Method)[3] == "reinforce_pp_baseline"
    with pytest.raises(ValueError, match="agg"):
        _codes.parse(_codes.Agg, "mean", "agg")
    for codes in PY_ENUMS:
        for name in _codes.names(codes):
            assert _codes.name_of(_codes.parse(codes, name, "x")) == name
