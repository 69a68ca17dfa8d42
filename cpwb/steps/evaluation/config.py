"""What `cpwb evaluate` measures, on how much data: every setting with its default, range and help text."""
from __future__ import annotations

from dataclasses import dataclass, field

from cpwb.core.config import require
from cpwb.data.corpora import RTP_SUBSETS
from cpwb.engine.adapters import is_adapter

EMBEDDER_NAME = "all-minilm-l6-v2"


GENERATIVE = ("greedy", "rtp", "toxigen", "blackbox")  # their tables go to continuations/, the others' to items/


PROTOCOL_NAMES = ("phi_gap", "greedy", "rtp", "toxigen", "wikitext2", "hellaswag", "piqa", "blackbox")


@dataclass
class EvaluateConfig:
    """What `cpwb evaluate` measures, on how much data; configs/evaluate_default.yaml mirrors it."""

    model: str = "default"
    adapter: str | None = None  # a LoRA adapter folder (cpwb train's <output_dir>/adapter); null: the base model
    trust_remote_code: bool = False
    device: str = "auto"  # auto: CUDA when present, else CPU
    protocols: list[str] = field(default_factory=lambda: list(PROTOCOL_NAMES))
    scorer: str = "default"  # toxicity scorer, see cpwb.engine.scoring.load_toxicity_scorer
    similarity: bool = True  # MiniLM cosine of input and output on greedy, rtp and toxigen
    conditional_ppl: bool = True  # perplexity of the outputs given their inputs under the base model (adapter off)
    # RealToxicityPrompts: k top-p samples per prompt of each subset; greedy: one continuation per challenging prompt
    rtp_subsets: list[str] = field(default_factory=lambda: ["challenging", "nontoxic"])
    rtp_prompts: int = 20
    samples_per_prompt: int = 25
    top_p: float = 0.9
    max_new_tokens: int = 20
    greedy_prompts: int = 200
    # ToxiGen: continue the first n hateful seed statements of every target group (top-p, low temperature)
    toxigen_per_group: int = 5
    toxigen_max_new_tokens: int = 64
    toxigen_temperature: float = 0.1
    # fluency, utility, phi gap, black box
    wikitext_windows: int | None = 24  # windows of 512 tokens, stride 256; null: the whole test set
    hellaswag_items: int = 100
    piqa_items: int = 200
    heldout_pairs: int = 200  # ParaDetox held-out split of cpwb.steps.training.trainer (normalised), as in cpwb.steps.experiment
    blackbox_texts: int = 32  # RTP-challenging prompt + original continuation, rewritten by the model
    blackbox_max_new_tokens: int = 64
    seed: int = 0
    batch_size: int = 16  # rows per forward pass (sampled sequences, scored texts); WikiText windows: a quarter
    output_dir: str = "outputs/evaluate"
    progress: bool = True

    def __post_init__(self) -> None:
        require(bool(self.protocols), "protocols", f"name at least one of {list(PROTOCOL_NAMES)}")
        for index, name in enumerate(self.protocols):
            require(name in PROTOCOL_NAMES, f"protocols[{index}]",
                    f"unknown protocol {name!r}; known: {list(PROTOCOL_NAMES)}")
        require(len(set(self.protocols)) == len(self.protocols), "protocols", "lists a protocol twice")
        for index, subset in enumerate(self.rtp_subsets):
            require(subset in RTP_SUBSETS, f"rtp_subsets[{index}]", f"must be one of {sorted(RTP_SUBSETS)}")
        for name in ("rtp_prompts", "samples_per_prompt", "max_new_tokens", "greedy_prompts", "toxigen_per_group",
                     "toxigen_max_new_tokens", "hellaswag_items", "piqa_items", "heldout_pairs", "blackbox_texts",
                     "blackbox_max_new_tokens", "batch_size"):
            require(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        require(self.wikitext_windows is None or self.wikitext_windows >= 1, "wikitext_windows",
                f"must be >= 1 or null (the whole test set), got {self.wikitext_windows}")
        require(0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}")
        require(self.toxigen_temperature > 0, "toxigen_temperature", f"must be > 0, got {self.toxigen_temperature}")
        require(self.adapter is None or is_adapter(self.adapter), "adapter",
                f"not an adapter folder (no adapter_config.json): {self.adapter}")
        require(self.device == "auto" or self.device.split(":")[0] in ("cpu", "cuda", "mps"), "device",
                f"must be auto, cpu, cuda[:N] or mps, got {self.device!r}")
