"""What `cpwb evaluate` measures, on how much data: every setting with its default, range and help text."""
from __future__ import annotations

from dataclasses import dataclass

from cpwb.core.config import require
from cpwb.core.settings import check_settings, same_as, setting
from cpwb.data.corpora import RTP_SUBSETS
from cpwb.engine.device import ModelSettings

EMBEDDER_NAME = "all-minilm-l6-v2"
GENERATIVE = ("greedy", "rtp", "toxigen", "blackbox")  # their tables go to continuations/, the others' to items/
PROTOCOL_NAMES = ("phi_gap", "greedy", "rtp", "toxigen", "wikitext2", "hellaswag", "piqa", "blackbox", "lm_eval")
DEFAULT_PROTOCOLS = PROTOCOL_NAMES[:-1]  # lm_eval on request: the full tasks take about an hour on 2 CPU cores


@dataclass
class EvaluateConfig:
    """What `cpwb evaluate` measures, on how much data; configs/evaluate_default.yaml shows the defaults."""

    model: str = same_as(ModelSettings, "model")
    adapter: str | None = setting(None, "a LoRA adapter folder (`cpwb train` writes <output_dir>/adapter); null: the "
                                        "base model alone", check="adapter")
    trust_remote_code: bool = same_as(ModelSettings, "trust_remote_code")
    device: str = same_as(ModelSettings, "device")
    protocols: list[str] = setting(list(DEFAULT_PROTOCOLS), f"protocols to run, of {', '.join(PROTOCOL_NAMES)}",
                                   check="nonempty")
    scorer: str = setting("default", "toxicity scorer: default, bilstm-toxblock, bilstm-tcc, detoxify, or hf:FOLDER "
                                     "(any AutoModelForSequenceClassification folder; see cpwb.engine.classifiers)")
    scorer_options: dict = setting({}, "the scorer's options: label (the toxic one in config.id2label, for hf:), "
                                       "checkpoint and huggingface_config_path (for detoxify), max_length, device")
    similarity: bool = setting(True, "MiniLM cosine of input and output on greedy, rtp and toxigen")
    conditional_ppl: bool = setting(True, "perplexity of the outputs given their inputs under the base model "
                                          "(adapter off)")
    # RealToxicityPrompts: k top-p samples per prompt of each subset; greedy: one continuation per challenging prompt
    rtp_subsets: list[str] = setting(["challenging", "nontoxic"], "RealToxicityPrompts subsets to sample",
                                     check="nonempty")
    rtp_prompts: int = setting(20, "first prompts of each subset", check=">=1")
    samples_per_prompt: int = setting(25, "k top-p samples per prompt: EMT is the mean over prompts of the most "
                                          "toxic sample's score, TP the share with one sample >= 0.5", check=">=1")
    top_p: float = setting(0.9, "nucleus sampling mass (RTP and ToxiGen)", check="(0,1]")
    max_new_tokens: int = setting(20, "tokens per RTP and greedy continuation (the RealToxicityPrompts protocol's "
                                      "20)", check=">=1")
    greedy_prompts: int = setting(200, "first RTP-challenging prompts continued greedily", check=">=1")
    # ToxiGen: continue the first n hateful seed statements of every target group (top-p, low temperature)
    toxigen_per_group: int = setting(5, "first hateful seed statements continued per target group", check=">=1")
    toxigen_max_new_tokens: int = setting(64, "tokens per ToxiGen continuation (the paper: 128)", check=">=1")
    toxigen_temperature: float = setting(0.1, "ToxiGen sampling temperature (the paper's 0.1, with top-p: nearly "
                                              "greedy)", check=">0")
    # fluency, utility, phi gap, black box
    wikitext_windows: int | None = setting(24, "WikiText-2 windows of 512 tokens, stride 256; null: the whole test "
                                               "set", check=">=1")
    hellaswag_items: int = setting(100, "HellaSwag items (of the shipped 1,000-item sample)", check=">=1")
    piqa_items: int = setting(200, "PIQA items (of 1,838)", check=">=1")
    lm_eval_tasks: list[str] = setting(["hellaswag", "piqa"], "lm-evaluation-harness tasks of the lm_eval protocol, "
                                       "on the shipped data (cpwb.steps.evaluation.harness)")
    lm_eval_limit: int | None = setting(None, "first items of each lm_eval task; null: all (HellaSwag 1,000, PIQA "
                                              "1,838)", check=">=1")
    lm_eval_task_files: list[str] = setting([], "extra lm-eval task files (YAML) the lm_eval protocol runs too")
    heldout_pairs: int = setting(200, "canonical held-out ParaDetox pairs for the phi gap", check=">=1")
    blackbox_texts: int = setting(32, "RTP-challenging prompt + original continuation, rewritten by the model",
                                  check=">=1")
    blackbox_max_new_tokens: int = setting(64, "tokens per black-box rewrite", check=">=1")
    seed: int = setting(0, "sampling seed")
    batch_size: int = setting(16, "rows per scoring forward pass (texts, choices, phi); WikiText windows: a quarter",
                              check=">=1")
    generation_batch_size: int = setting(64, "rows per generate call (greedy, toxigen, blackbox; rtp: this over "
                                             "samples_per_prompt prompts); greedy outputs do not depend on it, "
                                             "sampled ones do (each batch is seeded)", check=">=1")
    output_dir: str = setting("outputs/evaluate", "the evaluation folder: metrics.csv/json, continuations/, items/, "
                                                  "protocols/")
    progress: bool = setting(True, "show progress bars")

    def __post_init__(self) -> None:
        from cpwb.core.errors import CpwbError
        from cpwb.engine.scoring import check_scorer_name

        check_settings(self)
        try:
            check_scorer_name(self.scorer)
        except CpwbError as err:
            require(False, "scorer", str(err))
        for index, name in enumerate(self.protocols):
            require(name in PROTOCOL_NAMES, f"protocols[{index}]",
                    f"unknown protocol {name!r}; known: {list(PROTOCOL_NAMES)}")
        require(len(set(self.protocols)) == len(self.protocols), "protocols", "lists a protocol twice")
        from cpwb.steps.evaluation.harness import TASKS, check_task_file

        for index, task in enumerate(self.lm_eval_tasks):
            require(task in TASKS, f"lm_eval_tasks[{index}]", f"unknown task {task!r}; shipped: {sorted(TASKS)}")
        for path in self.lm_eval_task_files:
            check_task_file(path)
        for index, subset in enumerate(self.rtp_subsets):
            require(subset in RTP_SUBSETS, f"rtp_subsets[{index}]", f"must be one of {sorted(RTP_SUBSETS)}")
