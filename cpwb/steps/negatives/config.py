"""Every setting of a hard-negative generation run, with its default, range and help text (`cpwb generate --help`)."""
from __future__ import annotations

import dataclasses
from typing import Literal

from cpwb.core.config import require
from cpwb.core.settings import check_settings, same_as, setting
from cpwb.engine.device import ModelSettings
from cpwb.steps.negatives.hardness import Thresholds


@dataclasses.dataclass
class GenerateConfig:
    """Every setting of a hard-negative generation run; configs/generate_default.yaml shows the defaults."""

    # anchors
    anchors: Literal["paradetox", "toxigen"] = setting("paradetox", "paradetox: the first neutral side of a ParaDetox "
                                                                    "row; toxigen: neutral ToxiGen seed statements")
    n_anchors: int = setting(50, "anchors to paraphrase", check=">=1")
    anchor_offset: int = setting(0, "skip this many anchors (e.g. rows used elsewhere)", check=">=0")
    toxigen_groups: list[str] | None = setting(None, "ToxiGen target groups to take anchors from; null: all")
    normalize: bool = setting(True, "the same casing and spacing on every side (cpwb.data.corpora.normalize_text)")
    human_fallback: bool = setting(True, "fill the sets with ParaDetox's human paraphrases where generation falls "
                                         "short (ParaDetox anchors only)")
    # generation
    generator: str = setting("default", "the LM that writes the paraphrases: 'default', a Hugging Face id or a folder")
    backend: Literal["transformers", "vllm"] = setting("transformers", "transformers (CPU or GPU), or vllm (a GPU "
                                                                       "with the vllm package)")
    paraphrases_per_anchor: int = setting(8, "k samples per side and anchor", check=">=1")
    n_examples: int = setting(8, "few-shot examples per prompt (0: zero-shot)", check=">=0")
    max_new_tokens: int = setting(64, "tokens per sample, at most (each chunk also stops at length_ratio_max x its "
                                      "longest anchor)", check=">=1")
    temperature: float = setting(0.8, "sampling temperature", check=">0")
    top_p: float = setting(0.95, "nucleus sampling: the smallest set of tokens whose probabilities sum to top_p",
                           check="(0,1]")
    top_k: int = setting(0, "top-k cut (0: none)", check=">=0")
    batch_size: int = setting(8, "anchors per generation call (each gives k rows)", check=">=1")
    seed: int = setting(0, "sampling seed (each chunk of anchors derives its own, so a resumed run repeats it)")
    # scoring: the model that will be trained gives phi and token lengths
    target_model: str = setting("default", "the model notebook 02 will train: phi and token lengths are measured "
                                           "under it")
    scorer: str = setting("default", "toxicity scorer (see cpwb.engine.scoring.load_toxicity_scorer)")
    embedder: str = setting("default", "sentence embedder for similarity: 'default' (all-MiniLM-L6-v2) or a folder")
    max_length: int = setting(128, "tokens per scored text, at most (as in training, so phi is measured the same "
                                   "way)", check=">=1")
    nll_batch_size: int = setting(16, "texts per NLL forward pass", check=">=1")
    device: str = same_as(ModelSettings, "device")
    trust_remote_code: bool = same_as(ModelSettings, "trust_remote_code")
    # filters (see cpwb.steps.negatives.hardness)
    t_neg: float = setting(0.5, "negatives: toxicity >= t_neg", check="[0,1]")
    t_pos: float = setting(0.1, "positives: toxicity <= t_pos", check="[0,1]")
    s_min: float = setting(0.5, "cosine similarity to the anchor >= s_min (MiniLM): a paraphrase must keep the "
                                "meaning", check="[-1,1)")
    min_edit: float = setting(0.1, "positives within this normalised edit distance of the anchor are copies; "
                                   "candidates this close to an earlier one are duplicates", check="[0,1)")
    min_edit_negative: float = setting(0.0, "negatives: the same copy distance (0: only exact copies; a toxic near "
                                            "copy is a minimal toxic edit)", check="[0,1)")
    length_ratio_min: float = setting(0.5, "token length / the anchor's, at least", check=">0")
    length_ratio_max: float = setting(2.0, "token length / the anchor's, at most", check=">0")
    delta: float = setting(1.0, "negatives: |phi - prototype of the chosen positives| <= delta [nats/token]",
                           check=">0")
    # selection
    n_positives: int = setting(2, "|P|: the hardest positives kept per anchor", check=">=1")
    n_negatives: int = setting(1, "|N|: the hardest negatives kept per anchor (anchors that cannot fill both sets "
                                  "are dropped)", check=">=1")
    output_dir: str = setting("outputs/generate", "the run folder: pairs.jsonl, generation_log.jsonl, pairs_card.md")
    progress: bool = setting(True, "show a progress bar")

    def __post_init__(self) -> None:
        check_settings(self)
        require(self.t_pos < self.t_neg, "t_neg", f"need 0 <= t_pos < t_neg <= 1, got t_pos={self.t_pos}, "
                                                  f"t_neg={self.t_neg}")
        require(self.length_ratio_min < self.length_ratio_max, "length_ratio_max",
                f"need 0 < length_ratio_min < length_ratio_max, got {self.length_ratio_min}, {self.length_ratio_max}")
        require(not (self.human_fallback and self.anchors != "paradetox"), "human_fallback",
                "human paraphrases exist for ParaDetox anchors only; set human_fallback: false")
        for name in ("n_positives", "n_negatives"):
            require(self.human_fallback or getattr(self, name) <= self.paraphrases_per_anchor, name,
                    f"{getattr(self, name)} > paraphrases_per_anchor ({self.paraphrases_per_anchor}) can never be "
                    "filled without human_fallback")

    def thresholds(self) -> Thresholds:
        """The filter thresholds of this run."""
        return Thresholds(**{f.name: getattr(self, f.name) for f in dataclasses.fields(Thresholds)})
