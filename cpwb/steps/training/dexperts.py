"""DExperts fitted on CP's pairs: an expert adapter tuned on the positives and an anti-expert on the negatives.

Both are plain likelihood fine-tunes (objective positives_only, no KL term) with the run's LoRA, step and seed
settings; the anti-expert's pairs have their sides swapped (swap_fraction 1), so its "positives" are the toxic
texts. They train into `<output_dir>/expert/` and `<output_dir>/anti/` (each resumable like any run), then
`<output_dir>/adapter/` gets both and `dexperts.json` (alpha): what `cpwb evaluate --adapter` and the sweeps load
(cpwb.engine.dexperts). The fitting cost is both trainings' steps.

alpha only matters at decoding time, so a curve over alpha needs one pair of trainings, not one per point: both
experts are runs of `train` with alpha at its default, so with `run_cache` (cpwb.steps.training.run_cache) the
second point of a curve copies them in instead of training them again.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from cpwb.core.config import to_dict, yaml_text
from cpwb.core.files import atomic_write_text
from cpwb.steps.training.config import TrainConfig


def expert_configs(config: TrainConfig) -> tuple[TrainConfig, TrainConfig]:
    """The expert's and the anti-expert's training runs of a DExperts run."""
    run_dir = Path(config.output_dir)  # alpha back to its default: the experts do not depend on it
    common = {"objective": "positives_only", "kl_weight": 0.0,
              "dexperts_alpha": TrainConfig.__dataclass_fields__["dexperts_alpha"].default}
    return (dataclasses.replace(config, **common, output_dir=str(run_dir / "expert")),
            dataclasses.replace(config, **common, swap_fraction=1.0, output_dir=str(run_dir / "anti")))


def fit_dexperts(config: TrainConfig, resume: bool = False):
    """Train both experts (resuming each), save the DExperts artefact, return a TrainResult whose model is the
    DExperts combination on a fresh base model."""
    from cpwb.engine.assets import load_causal_lm
    from cpwb.engine.device import pick_device
    from cpwb.engine.dexperts import load_dexperts, save_dexperts
    from cpwb.steps.training.trainer import TrainResult, train

    expert_config, anti_config = expert_configs(config)
    expert = train(expert_config, resume=resume)
    anti = train(anti_config, resume=resume)
    run_dir, adapter_dir = Path(config.output_dir), Path(config.output_dir) / "adapter"
    atomic_write_text(run_dir / "config.yaml", yaml_text(to_dict(config)))
    save_dexperts(adapter_dir, expert.adapter_dir, anti.adapter_dir, config.dexperts_alpha,
                  {"steps": config.steps, "model": config.model})
    del expert.model, anti.model
    base = load_causal_lm(config.model, device=str(pick_device(config.device)), dtype=config.dtype,
                          trust_remote_code=config.trust_remote_code)
    model = load_dexperts(adapter_dir, base)
    history = [{**m, "expert": "expert"} for m in expert.metrics] + [{**m, "expert": "anti"} for m in anti.metrics]
    return TrainResult(run_dir, adapter_dir, history, anti.heldout, model, anti.tokenizer)
