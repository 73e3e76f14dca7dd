"""composition.py, the one composition root: entry scripts lean on it and not on each other, importing it changes
nothing, and it hands the trainer an already sparse model."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import composition
from dynadiag import DiagLinear

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENTRY_SCRIPTS = ("train", "eval", "prune")


def _imported_modules(path: str) -> set[str]:
    with open(path, encoding="utf-8") as fh:
        tree = ast.parse(fh.read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_entry_scripts_import_composition_and_not_each_other():
    for script in ENTRY_SCRIPTS:
        imported = _imported_modules(os.path.join(ROOT, f"{script}.py"))
        assert "composition" in imported, script
        assert not imported & set(ENTRY_SCRIPTS), f"{script}.py imports {imported & set(ENTRY_SCRIPTS)}"
    assert not _imported_modules(os.path.join(ROOT, "composition.py")) & set(ENTRY_SCRIPTS)


def test_importing_the_hydra_side_registers_no_resolver():
    script = (
        "from omegaconf.basecontainer import BaseContainer\n"
        "before = set(BaseContainer._resolvers)\n"
        "import composition, train, eval, prune\n"
        "assert set(BaseContainer._resolvers) == before, set(BaseContainer._resolvers) - before\n"
    )
    env = {**os.environ, "PYTHONPATH": ROOT}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]


def test_build_sparse_model_applies_the_method_once():
    with initialize_config_dir(config_dir=os.path.join(ROOT, "configs"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["model=vit_nano", "data=synthetic", "sparsifier=dynadiag"])
    model, method, report = composition.build_sparse_model(cfg.model, cfg.sparsifier)
    layers = [m for m in model.modules() if isinstance(m, DiagLinear)]
    assert len(layers) == len(report.layers) == 8  # qkv, proj, fc1, fc2 of both blocks
    assert method.sparsity == 0.9 and method.config.sparsity == 0.9
    assert method.schedule.kind == "cosine" and method.schedule.per_epoch


def test_sparse_dynadiag_takes_layer_options_in_a_nested_config_and_old_flat_nodes_are_upgraded():
    overrides = ["model=vit_nano", "data=synthetic", "sparsifier.config.group=4", "sparsifier.config.permute=true"]
    with initialize_config_dir(config_dir=os.path.join(ROOT, "configs"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)  # the default run's sparsifier: sparse_dynadiag
    model, method, _ = composition.build_sparse_model(cfg.model, cfg.sparsifier)
    layers = [m for m in model.modules() if isinstance(m, DiagLinear)]
    assert method.name == "sparse_dynadiag" and method.config.group == 4 and method.config.permute
    assert len(layers) == 8 and all(m.group == 4 and m.perm is not None for m in layers)
    # a checkpoint's resolved config from before the nesting (flat layer options) builds the same method
    flat = {k: v for k, v in OmegaConf.to_container(cfg.sparsifier, resolve=True).items() if k != "config"}
    flat |= {"sparsity": 0.8, "include": ["blocks.0.*"], "exclude": [], "backend": "reference"}
    node = composition.upgrade_sparsifier_config(flat)
    assert node["config"] == {
        "_target_": "dynadiag.sparsify.DiagSparsifyConfig",
        "sparsity": 0.8,
        "include": ["blocks.0.*"],
        "exclude": [],
        "backend": "reference",
    }
    assert "sparsity" not in node and flat["sparsity"] == 0.8  # the caller's node is left alone
    _, old, report = composition.build_sparse_model(cfg.model, node)
    assert old.config.sparsity == 0.8 and old.config.group == 1 and len(report.layers) == 4
    nested = OmegaConf.to_container(cfg.sparsifier, resolve=True)
    assert composition.upgrade_sparsifier_config(nested) == nested  # today's layout passes through
