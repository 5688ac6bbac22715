"""The patch registry: what a plain import installs, version guards, and that nothing outside
``patches/`` and ``compat/`` assigns to Megatron's modules or classes."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "megatron_hyperball"


# One fresh interpreter for all the registry facts below (each read in the order that keeps them
# independent: the plain import first, the test entries last); a start-up costs ~20 s on 2 cores.
FACTS_SCRIPT = """
import json, megatron_hyperball
from megatron_hyperball import compat, patches
from megatron.core.optimizer import distrib_optimizer as d
facts = {}
cls = d.DistributedOptimizer
facts["plain"] = {"applied": [a.split(":")[0] for a in patches.applied()],
    "torch_adamw": not d.HAVE_APEX_OR_TE, "cpu": compat.is_enabled(),
    "marked": [getattr(getattr(cls, n), patches.MARKER, False) for n in
               ("sharded_state_dict", "_set_main_param_and_optimizer_states", "load_state_dict")]}
try:
    patches.apply_training(cpu=True)
    facts["cpu_refusal"] = ""
except RuntimeError as e:
    facts["cpu_refusal"] = str(e)
patches.apply("training"); first = patches.applied(); patches.apply("training")
facts["training"] = {"same": first == patches.applied(), "n": len(first),
    "entries": [[p.name, p.group, list(p.versions), len(p.why), p.target] for p in patches.REGISTRY]}
calls = []
for v, name in ((("0.99.",), "future"), ((patches.megatron_version()[:5],), "current")):
    patches.register(patches.Patch(name=name, target="megatron.x", versions=v, why="test",
                                   install=lambda name=name: calls.append(name), group="test"))
patches.apply("test")
facts["versions"] = {"calls": calls, "skipped": patches._skipped.get("future", ""),
    "applied": [a for a in patches.applied() if a.startswith(("future", "current"))]}
print(json.dumps(facts))
"""


@pytest.fixture(scope="module")
def facts() -> dict:
    out = subprocess.run([sys.executable, "-c", FACTS_SCRIPT], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_plain_import_installs_core_patches_and_torch_adamw_fixes(facts):
    """Without enable_cpu(): the torch-AdamW checkpoint fixes are installed whenever Megatron fell
    back to torch's AdamW (always here: no TE / apex), with the optimizer registration."""
    got = facts["plain"]
    assert got["cpu"] is False
    assert got["torch_adamw"] is True
    assert got["applied"] == ["dp_reshardable_load_no_grad", "torch_adamw_checkpoint_state",
                              "layer_wise_untagged_matrices", "optimizer_factory", "muonh_registry_entry",
                              "layer_wise_fp32_members", "layer_wise_found_inf", "layer_wise_hook_state"]
    assert got["marked"] == [True, True, True]


def test_entries_are_documented_and_training_groups_apply_once(facts):
    got = facts["training"]
    assert got["same"] is True
    entries = got["entries"]
    assert len({e[0] for e in entries}) == len(entries)  # unique names
    for name, group, versions, why_len, target in entries:
        assert group in ("core", "training", "cpu"), name
        assert versions and all(v.startswith("0.") for v in versions), name
        assert why_len > 40 and target.startswith("megatron."), name
    assert got["n"] == 8 + sum(e[1] == "training" for e in entries)


def test_other_megatron_version_is_skipped_not_patched(facts):
    """An entry written for other megatron-core versions is skipped (logged), never installed."""
    got = facts["versions"]
    assert got["calls"] == ["current"]
    assert got["applied"] == ["current: megatron.x"]
    assert "written for megatron-core 0.99." in got["skipped"]


def test_cpu_group_needs_the_cpu_layer(facts):
    assert "call megatron_hyperball.compat.enable_cpu() first" in facts["cpu_refusal"]


def _megatron_names(tree: ast.Module) -> set[str]:
    """Local names bound to a megatron.* module or an object imported from one."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "megatron":
                    out.add((a.asname or a.name).split(".")[0])
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "megatron":
            out.update(a.asname or a.name for a in node.names)
    return out


def _root(node: ast.AST) -> str | None:
    while isinstance(node, ast.Attribute):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


@pytest.mark.parametrize("path", sorted(p for p in PACKAGE.rglob("*.py")
                                        if p.relative_to(PACKAGE).parts[0] not in ("patches", "compat")),
                         ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_assignment_to_megatron_outside_patches(path):
    """Every runtime change to Megatron lives in patches/ (or the CPU device layer in compat/)."""
    tree = ast.parse(path.read_text())
    megatron = _megatron_names(tree)
    bad = []
    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, ast.Assign) else (
            [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else [])
        for t in targets:
            if isinstance(t, ast.Attribute) and _root(t) in megatron:
                bad.append(f"line {node.lineno}: {ast.unparse(t)} = ...")
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setattr" and node.args \
                and _root(node.args[0]) in megatron:
            bad.append(f"line {node.lineno}: setattr({ast.unparse(node.args[0])}, ...)")
    assert not bad, bad
