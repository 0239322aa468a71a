"""Saving and loading fitted radio models: safetensors arrays + a JSON sidecar (never pickle).

Options add arrays without a format change (an older model lacks them and predicts as before): "mean_shift",
"dof_bins", and with stacking.TREE_STACK "tree_w", "tree_seed" and the forests' node arrays ("f." keys,
`FittedCells.forest_arrays`, in their own dtypes); a model saved without forests refits a cell's forest from its
stored training rows and seed (tests/radio/test_tree_stack.py: the same predictions)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cellsynth.errors import SchemaError

# 5: batched GP residual over the physical mean (arrays: training rows, hyperparameters, std factor)
FORMAT_VERSION = 5


def save_fitted(fitted, path: str | Path, *, extra_meta: dict[str, Any] | None = None) -> None:
    """Write `<path>.safetensors` (arrays) and `<path>.json` (ids, target, settings)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"a.{k}": torch.as_tensor(np.ascontiguousarray(v, dtype=np.float64)) for k, v in fitted.arrays.items()}
    tensors["elbo"] = torch.as_tensor(np.asarray(fitted.elbo, dtype=np.float64))
    tensors["n_train"] = torch.as_tensor(np.asarray(fitted.n_train, dtype=np.int64))
    tensors.update({f"f.{k}": torch.as_tensor(np.ascontiguousarray(v)) for k, v in fitted.forest_arrays().items()})
    save_file(tensors, str(path.with_suffix(".safetensors")))
    meta = {"format_version": FORMAT_VERSION, "cell_ids": fitted.cell_ids, "target": fitted.target,
            "settings": fitted.settings.as_dict()}
    path.with_suffix(".json").write_text(json.dumps({**meta, **(extra_meta or {})}))


def load_fitted(path: str | Path) -> tuple[list[str], str, dict, dict[str, np.ndarray], np.ndarray, np.ndarray,
                                           dict[str, np.ndarray]]:
    """(cell ids, target, settings dict, arrays, log marginal likelihoods, training row counts, forest arrays ({}
    when the model was saved without them))."""
    from safetensors.torch import load_file

    path = Path(path)
    meta = json.loads(path.with_suffix(".json").read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise SchemaError(f"radio weights {path}: format_version {meta.get('format_version')}, expected {FORMAT_VERSION}")
    t = load_file(str(path.with_suffix(".safetensors")))
    arrays = {k[2:]: v.numpy() for k, v in t.items() if k.startswith("a.")}
    arrays["mask"] = arrays["mask"] > 0
    forests = {k[2:]: v.numpy() for k, v in t.items() if k.startswith("f.")}
    return meta["cell_ids"], meta["target"], meta["settings"], arrays, t["elbo"].numpy(), t["n_train"].numpy(), forests
