"""Every setting of a hard-negative generation run, with its default, range and help text (`cpwb generate --help`)."""
from __future__ import annotations

import dataclasses
from typing import Literal

from cpwb.core.config import require
from cpwb.steps.negatives.hardness import Thresholds


@dataclasses.dataclass
class GenerateConfig:
    """Every setting of a hard-negative generation run; configs/generate_default.yaml mirrors it."""

    # anchors
    anchors: Literal["paradetox", "toxigen"] = "paradetox"
    n_anchors: int = 50
    anchor_offset: int = 0  # skip this many anchors (e.g. rows used elsewhere)
    toxigen_groups: list[str] | None = None  # ToxiGen target groups (null: all)
    normalize: bool = True  # the same casing and spacing on every side (cpwb.data.corpora.normalize_text)
    human_fallback: bool = True  # fill sets with ParaDetox's human paraphrases (ParaDetox anchors only)
    # generation
    generator: str = "default"
    backend: Literal["transformers", "vllm"] = "transformers"
    paraphrases_per_anchor: int = 8  # k, per side
    n_examples: int = 8  # few-shot examples per prompt (0: zero-shot)
    max_new_tokens: int = 64  # cap; each chunk also stops at length_ratio_max x its longest anchor
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 0  # 0: no top-k cut
    batch_size: int = 8  # anchors per generation call (each gives k rows)
    seed: int = 0
    # scoring: the model that will be trained gives phi and token lengths
    target_model: str = "default"
    scorer: str = "default"
    embedder: str = "default"
    max_length: int = 128
    nll_batch_size: int = 16
    device: str = "auto"
    trust_remote_code: bool = False
    # filters (see cpwb.steps.negatives.hardness)
    t_neg: float = 0.5
    t_pos: float = 0.1
    s_min: float = 0.5
    min_edit: float = 0.1
    min_edit_negative: float = 0.0
    length_ratio_min: float = 0.5
    length_ratio_max: float = 2.0
    delta: float = 1.0
    # selection
    n_positives: int = 2
    n_negatives: int = 1
    output_dir: str = "outputs/generate"
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("n_anchors", "paraphrases_per_anchor", "max_new_tokens", "batch_size", "max_length",
                     "nll_batch_size", "n_positives", "n_negatives"):
            require(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        for name in ("anchor_offset", "n_examples", "top_k"):
            require(getattr(self, name) >= 0, name, f"must be >= 0, got {getattr(self, name)}")
        require(self.temperature > 0, "temperature", f"must be > 0 (sampling), got {self.temperature}")
        require(0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}")
        require(0 <= self.t_pos < self.t_neg <= 1, "t_neg", f"need 0 <= t_pos < t_neg <= 1, got t_pos={self.t_pos}, "
                                                          f"t_neg={self.t_neg}")
        require(-1 <= self.s_min < 1, "s_min", f"must be in [-1, 1), got {self.s_min}")
        for name in ("min_edit", "min_edit_negative"):
            require(0 <= getattr(self, name) < 1, name, f"must be in [0, 1), got {getattr(self, name)}")
        require(0 < self.length_ratio_min < self.length_ratio_max, "length_ratio_max",
                f"need 0 < length_ratio_min < length_ratio_max, got {self.length_ratio_min}, {self.length_ratio_max}")
        require(self.delta > 0, "delta", f"must be > 0, got {self.delta}")
        require(not (self.human_fallback and self.anchors != "paradetox"), "human_fallback",
                "human paraphrases exist for ParaDetox anchors only; set human_fallback: false")
        for name in ("n_positives", "n_negatives"):
            require(self.human_fallback or getattr(self, name) <= self.paraphrases_per_anchor, name,
                    f"{getattr(self, name)} > paraphrases_per_anchor ({self.paraphrases_per_anchor}) can never be "
                    "filled without human_fallback")
        require(self.device == "auto" or self.device.split(":")[0] in ("cpu", "cuda", "mps"), "device",
                f"must be auto, cpu, cuda[:N] or mps, got {self.device!r}")

    def thresholds(self) -> Thresholds:
        """The filter thresholds of this run."""
        return Thresholds(**{f.name: getattr(self, f.name) for f in dataclasses.fields(Thresholds)})
