"""Every setting of a training run, with its default, range and help text (`cpwb train --help` lists them)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from cpwb.core.config import require
from cpwb.core.settings import check_settings, same_as, setting
from cpwb.data.paradetox import HOLDOUT_FRACTION, PARADETOX_ROWS
from cpwb.engine.device import ModelSettings
from cpwb.engine.loss import CPLossConfig
from cpwb.steps.training.tracking import missing_tracker

Objective = Literal["cp", "reference", "positives_only", "negatives_only", "dpo", "simpo", "profs", "steering",
                    "dexperts", "grpo", "rloo"]
RL_OBJECTIVES = ("grpo", "rloo")  # TRL's on-policy trainers, the toxicity scorer as reward (steps.training.rl)
TRAINING_FREE = ("profs", "steering")  # fitted from the pairs' hidden states, no gradient steps


# Settings that do not change what a run fits, only where it is written, how it reports and what it reuses: a run
# resumes whatever they hold, and they are not in the run cache's key. `expert_cache` was run_cache's DExperts-only
# forerunner: run folders recorded with it resume.
NOT_FITTED = ("progress", "output_dir", "report_to", "run_cache", "embedding_cache", "expert_cache")


@dataclass
class TrainConfig:
    """Every setting of a training run; configs/cp_default.yaml shows the defaults (a test keeps them equal)."""

    # model
    model: str = same_as(ModelSettings, "model")
    trust_remote_code: bool = same_as(ModelSettings, "trust_remote_code")
    device: str = same_as(ModelSettings, "device")
    dtype: str | None = setting(None, "weights' dtype; null: float32 on CPU, bfloat16 on CUDA", check="dtype")
    load_in_4bit: bool = setting(False, "QLoRA: the base model in 4-bit NF4 through bitsandbytes")
    gradient_checkpointing: bool = setting(False, "recompute activations in the backward pass: less memory, more "
                                                  "time")
    # data
    pairs: str | None = setting(None, "a pairs JSONL file (notebook 01, `cpwb generate`); null: pairs built from "
                                      "ParaDetox", check="file")
    with_paradetox: bool = setting(False, "with a pairs file: train on it together with ParaDetox's training pairs")
    paradetox_limit: int = setting(PARADETOX_ROWS, "ParaDetox rows the pairs are built from", check=">=1")
    normalize_text: bool = setting(True, "lower-case and detokenise both sides of ParaDetox pairs (its toxic side is "
                                         "tokenised, its neutral side is not: a confound for phi)")
    holdout_fraction: float = setting(HOLDOUT_FRACTION, "share of the pairs held out, seeded (the canonical held-out "
                                                        "ParaDetox pairs never train whatever this is)", check="[0,1)")
    max_positives: int = setting(3, "positives per anchor, at most", check=">=1")
    max_negatives: int = setting(3, "hard negatives per anchor, at most (0 with random_negatives: random ones only)",
                                 check=">=0")
    random_negatives: int = setting(0, "toxic texts of other anchors added to each anchor's negatives (a strength "
                                       "knob: docs/ablations.md)", check=">=0")
    train_pairs_limit: int = setting(0, "fit on this many training pairs only, drawn with `seed` (sample-efficiency "
                                        "studies); 0: all", check=">=0")
    swap_fraction: float = setting(0.0, "share of training pairs whose non-toxic and toxic sides are swapped, drawn "
                                        "with `seed` (label-noise studies)", check="[0,1]")
    max_length: int = setting(128, "tokens per text, at most", check=">=1")
    packing: bool = setting(True, "run each step's texts as one padding-free row (checked against padding once per "
                                  "run; padded when the model disagrees)")
    # objective (see cpwb.engine.loss)
    objective: Objective = setting("cp", "cp; or an ablation or baseline on the same pairs: reference (the released "
                                         "code's loss), positives_only, negatives_only, dpo, simpo; or a "
                                         "training-free peer: profs, steering; decoding-time dexperts; or the "
                                         "RL baselines grpo, rloo (docs/peers.md)")
    negatives: Literal["directional", "symmetric"] = same_as(CPLossConfig, "negatives")
    tau: float = same_as(CPLossConfig, "tau")
    alpha: float = same_as(CPLossConfig, "alpha")
    anchor_weight: float = same_as(CPLossConfig, "anchor_weight")
    phi_form: Literal["log_ppl", "ppl"] = same_as(CPLossConfig, "phi_form")
    detach_prototype: bool = same_as(CPLossConfig, "detach_prototype")
    prototype: Literal["mean_positives", "first_positive"] = same_as(CPLossConfig, "prototype")
    kl_weight: float = setting(2.0, "+ kl_weight x mean token KL(base || model) on kl_data: keeps non-toxic text as "
                                    "the base model had it", check=">=0")
    kl_data: Literal["positives", "general"] = setting("general", "general: benign web text (RealToxicityPrompts "
                                                                  "non-toxic rows 600 on, never evaluated); "
                                                                  "positives: the pairs' positives")
    kl_texts_per_step: int = setting(4, "general texts per micro-batch for the KL term, over all processes",
                                     check=">=1")
    preference_beta: float = setting(0.1, "DPO's beta: the scale of the policy's log-ratio to the reference in the "
                                          "logistic loss", check=">0")
    simpo_beta: float = setting(2.0, "SimPO's beta: the scale of the length-normalised log-probability margin",
                                check=">0")
    simpo_gamma: float = setting(0.5, "SimPO's target margin gamma", check="finite")
    # training-free peers (cpwb.engine.interventions)
    edit_rank: int = setting(2, "ProFS: toxic directions projected out of each edited block's MLP output (the "
                                "paper's k)", check=">=1")
    edit_layers: list[int] = setting([], "ProFS: the blocks edited; []: the upper half (the paper edits GPT-2 "
                                         "medium's blocks 10-23 of 24)")
    edit_first_layer: int | None = setting(None, "ProFS: edit the blocks from this one to the last (one number, "
                                                 "for tuning studies); null: as edit_layers says", check=">=0")
    edit_centering: bool = setting(True, "ProFS: project the corpus-wide direction (top singular vector of the "
                                         "non-toxic embeddings) out of the preference matrix first")
    edit_length_control: bool = setting(False, "ProFS: regress the pairs' token-count difference out of the "
                                               "preference matrix first (cpwb's control for the length confound of "
                                               "ParaDetox pairs, docs/peers.md; not in the paper)")
    steering_layer: int | None = setting(None, "steering: the block whose output is steered; null: the middle one")
    embedding_cache: bool = setting(True, "ProFS, steering: reuse the pairs' hidden states across runs of the same "
                                          "model (cached under $CPWB_CACHE/embeddings); false: computed every fit, "
                                          "so its time is the full fitting cost")
    steering_strength: float = setting(1.0, "steering: multiples of the mean toxic-minus-neutral hidden state "
                                            "subtracted at every position (0: the base model)", check=">=0")
    dexperts_alpha: float = setting(2.0, "DExperts: logits = base + alpha x (expert - anti-expert); 0: the base "
                                         "model", check=">=0")
    run_cache: bool = setting(False, "keep each finished training run under $CPWB_CACHE/runs and reuse it in runs "
                                     "with the same settings, pairs and training code (a DExperts alpha curve's "
                                     "experts, the lee2024 grid's points; the research grids turn it on); their "
                                     "training seconds are kept; false: train every run")
    rl_generations: int = setting(4, "GRPO, RLOO: continuations sampled per prompt (the group its rewards are "
                                     "normalised in); anchors_per_step prompts a step", check=">=2")
    rl_max_new_tokens: int = setting(20, "GRPO, RLOO: tokens per sampled continuation", check=">=1")
    rl_beta: float = setting(0.04, "GRPO, RLOO: weight of the KL to the base model in the loss", check=">=0")
    rl_scorer: str = setting("default", "GRPO, RLOO: the toxicity scorer whose negated score is the reward (any "
                                        "name `cpwb evaluate --scorer` takes)")
    rl_prompts: int = setting(0, "GRPO, RLOO: RealToxicityPrompts non-toxic prompts from row 600 on (never "
                                 "evaluated) to train on; 0: all (597)", check=">=0")
    # LoRA
    lora_r: int = setting(16, "LoRA rank", check=">=1")
    lora_alpha: int = setting(32, "LoRA alpha: the adapter's update is scaled by alpha / r (32 / 16 = 2 by "
                                  "default)", check=">=1")
    lora_dropout: float = setting(0.0, "dropout on the LoRA input", check="[0,1)")
    target_modules: list[str] = setting(["q_proj", "k_proj", "v_proj", "o_proj"], "linear modules that get a LoRA "
                                                                                    "adapter", check="nonempty")
    # optimisation
    steps: int = setting(200, "optimizer steps (the learning rate decays to 0 over them); 0: one epoch over the "
                              "training anchors", check=">=0")
    anchors_per_step: int = setting(4, "anchors per micro-batch, over all processes (each takes its share)",
                                    check=">=1")
    grad_accum: int = setting(1, "micro-batches per optimizer step: a step sees anchors_per_step x grad_accum "
                                 "anchors", check=">=1")
    lr: float = setting(4e-4, "peak learning rate (AdamW; linear warm-up, then linear decay to 0)", check=">0")
    warmup_steps: int = setting(10, "steps of linear warm-up", check=">=0")
    weight_decay: float = setting(0.0, "AdamW weight decay", check=">=0")
    max_grad_norm: float = setting(1.0, "gradient clipping: the LoRA gradients' global norm is scaled down to "
                                        "this", check=">0")
    seed: int = setting(0, "seed of the anchor order, random negatives, KL texts and LoRA initialisation")
    checkpoint_every: int = setting(50, "steps between checkpoints (and the last step)", check=">=1")
    distributed: Literal["ddp", "fsdp"] = setting("ddp", "with several processes (accelerate launch, torchrun): ddp, "
                                                         "each holds the model and gradients are all-reduced; fsdp, "
                                                         "parameters, gradients and optimizer state are sharded")
    report_to: list[str] = setting([], "experiment trackers besides metrics.jsonl: tensorboard, trackio, mlflow "
                                       "(their packages installed)")
    output_dir: str = setting("outputs/train", "the run folder: config.yaml, data.json, metrics.jsonl, "
                                               "checkpoints/, adapter/")
    progress: bool = setting(True, "show a progress bar")

    def __post_init__(self) -> None:
        check_settings(self)
        require(self.max_negatives + self.random_negatives >= 1, "max_negatives",
                "must be >= 1 unless random_negatives >= 1 (0 with random negatives: random toxic negatives only)")
        require(missing_tracker(self.report_to) is None, "report_to", str(missing_tracker(self.report_to)))
        self.loss_config()  # the loss's own checks

    def loss_config(self) -> CPLossConfig:
        """The CP loss settings of this run."""
        return CPLossConfig(negatives=self.negatives, tau=self.tau, alpha=self.alpha, phi_form=self.phi_form,
                            detach_prototype=self.detach_prototype, anchor_weight=self.anchor_weight,
                            prototype=self.prototype)
