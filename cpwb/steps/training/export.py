"""Adapters out of cpwb: a trained adapter merged into its base model, as one folder any tool loads.

`cpwb export --merge RUN_DIR OUT` writes a safetensors model folder with its tokenizer, which
`AutoModelForCausalLM.from_pretrained(OUT)` loads alone (no peft, no cpwb): what serving (vLLM), lm-evaluation-harness
and sharing need. Without `--merge` it copies the adapter itself, which names its base model as the run was given it
(see `cpwb.steps.training.checkpoints.save_adapter`).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

from cpwb.core.errors import InputError
from cpwb.core.files import atomic_path
from cpwb.core.provenance import versions
from cpwb.engine.adapters import RUN_ADAPTER, is_adapter, load_adapter

EXPORT_RECORD = "cpwb_export.json"


def run_adapter(run_dir: str | Path) -> tuple[Path, dict]:
    """The adapter of a training run folder (or an adapter folder itself) and the run's settings (config.yaml)."""
    run_dir = Path(run_dir)
    for adapter, config in ((run_dir / "adapter", run_dir / "config.yaml"), (run_dir / RUN_ADAPTER,
                            run_dir / "train" / "config.yaml"), (run_dir, run_dir.parent / "config.yaml")):
        if is_adapter(adapter):
            settings = (yaml.safe_load(config.read_text(encoding="utf-8")) or {}) if config.is_file() else {}
            return adapter, settings
    raise InputError("neither a training run folder (with adapter/) nor an adapter folder", run_dir, field="run_dir")


def export(run_dir: str | Path, out: str | Path, merge: bool = True, model: str | None = None) -> Path:
    """Write the run's adapter merged into its base model (`merge`), or the adapter alone, to `out`, atomically.

    The base model is the run's (config.yaml), else `model`, else the adapter's own record of it.
    """
    from cpwb.engine.interventions import is_intervention, load_intervention

    adapter, settings = run_adapter(run_dir)
    intervention = load_intervention(adapter) if is_intervention(adapter) else None
    if intervention is not None and intervention.method == "steering" and merge:
        raise InputError("steering acts on activations while the model runs: it has no merged weights; export with "
                         "--no-merge (the intervention folder) instead", adapter, field="merge")
    recorded = (intervention.settings.get("model") if intervention is not None else
                json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path"))
    base = model or settings.get("model") or recorded
    if not base:
        raise InputError("the run names no base model; pass one", run_dir, field="model")
    out = Path(out)
    with atomic_path(out) as tmp:
        if merge:
            peft_model, tokenizer = load_adapter(adapter, base, "cpu", bool(settings.get("trust_remote_code")))
            merged = peft_model if intervention is not None else peft_model.merge_and_unload()  # ProFS: edited
            merged.config.name_or_path = str(out)
            merged.save_pretrained(str(tmp), safe_serialization=True)
            tokenizer.save_pretrained(str(tmp))
        else:
            shutil.copytree(adapter, tmp)
        (tmp / EXPORT_RECORD).write_text(json.dumps({"run": str(Path(run_dir).resolve()), "base_model": base,
                                                     "merged": merge, "versions": versions()}, indent=2))
    return out
