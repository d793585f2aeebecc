"""The flavour registry answers every flavour question: no code outside ``shared.config.flavours`` compares a
flavour's name, and the config schema accepts exactly the registry's flavours."""

from __future__ import annotations

import ast
import typing
from pathlib import Path

from shared.config.flavours import FLAVOURS, get_flavour
from shared.config.schema import TrainConfig

ROOT = Path(__file__).resolve().parents[2]


def _name_comparisons(path: Path) -> list[str]:
    """``x == "edit-v1"``, ``x != "edit-v3"``, ``x in ("edit-v1", ...)``: a question the registry should answer."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(node, ast.Compare):
            continue
        for op, right in zip(node.ops, node.comparators, strict=True):
            names = [right] if not isinstance(right, ast.Tuple | ast.List | ast.Set) else list(right.elts)
            if isinstance(op, ast.Eq | ast.NotEq | ast.In | ast.NotIn) and any(
                isinstance(n, ast.Constant) and n.value in FLAVOURS for n in names
            ):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return found


def test_no_code_compares_a_flavours_name():
    paths = [
        p
        for top in ("shared", "encoder_svc", "trainer_svc", "eval_svc")
        for p in (ROOT / top).rglob("*.py")
        if "_pb2" not in p.name and p != ROOT / "shared" / "config" / "flavours.py"
    ]
    assert [hit for p in paths for hit in _name_comparisons(p)] == []


def test_the_schema_takes_exactly_the_registrys_flavours():
    hints = typing.get_type_hints(TrainConfig)
    assert set(typing.get_args(hints["model_flavour"])) == set(FLAVOURS)


def test_the_registry_answers_what_differs():
    v1, v2, v3 = (get_flavour(n) for n in ("edit-v1", "edit-v2", "edit-v3"))
    assert (v1.max_refs, v2.max_refs, v3.max_refs) == (1, 3, 3)
    assert not v1.sizes_references_to_target and v2.sizes_references_to_target and v3.sizes_references_to_target
    assert [n for n, f in FLAVOURS.items() if f.caption_embeds_in_conditioning_cache] == ["edit-v1"]
    assert [n for n, f in FLAVOURS.items() if f.zero_cond_t] == ["edit-v3"]
