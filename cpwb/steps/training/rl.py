"""The reinforcement-learning baselines: GRPO and RLOO (TRL's GRPOTrainer and RLOOTrainer, trl 1.16) with the
toxicity scorer as reward.

The CP paper compares with PPO; TRL no longer ships PPO. Its current on-policy trainers take the same reward,
prompts and settings here (objective `grpo` or `rloo`): for each prompt they sample `rl_generations` continuations
and reward each with the negated toxicity of the continuation (`toxicity_reward`). GRPO (Shao et al. 2024,
"DeepSeekMath") normalises the rewards within the prompt's group; RLOO (Ahmadian et al., ACL 2024, "Back to Basics:
Revisiting REINFORCE Style Optimization for Learning from Human Feedback in LLMs") baselines each reward with the
mean of the group's other rewards (leave-one-out). Both take a clipped policy-gradient step with `rl_beta` x KL to
the base model (the frozen base: the LoRA adapter switched off). The policy is a LoRA adapter with the run's LoRA
settings, steps, learning rate and seed, like CP's.

Prompts: RealToxicityPrompts non-toxic rows 600 on (`cpwb.data.corpora.GENERAL_TEXT_FIRST_ROW`), which no
evaluation protocol uses (the evaluations take the challenging subset and the first 500 non-toxic rows), less three
whose text is also in the challenging subset; they are given as plain text, tokenised by TRL without cpwb's start
token. The trainer's checkpoints go to `<output_dir>/<objective>/` and a re-run resumes from the last (TRL loads
its states with weights_only; a run stopped after its final checkpoint takes the policy from it, as TRL would
train one step more); the final adapter is written like any run's (`<output_dir>/adapter/`). TRL's trainer is used
as is: this module only builds its dataset, reward and settings.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cpwb.core.config import require_same_settings, to_dict, yaml_text
from cpwb.core.files import atomic_write_json, atomic_write_text
from cpwb.steps.training.config import NOT_FITTED, TrainConfig


def rl_prompts(limit: int = 0) -> list[str]:
    """The RL prompts: RTP non-toxic rows 600 on, less the 3 whose text is also a challenging prompt (evaluated), at
    most `limit` (0: all 597)."""
    from cpwb.data.corpora import GENERAL_TEXT_FIRST_ROW, load_rtp

    evaluated = {p.text for p in load_rtp("challenging")}
    prompts = [p.text for p in load_rtp("nontoxic")[GENERAL_TEXT_FIRST_ROW:] if p.text not in evaluated]
    return prompts[:limit] if limit else prompts


def toxicity_reward(scorer) -> Callable[..., list[float]]:
    """TRL reward function: the negated toxicity of each completion under `scorer` (higher is less toxic)."""

    def reward(completions: list[Any], **_: Any) -> list[float]:
        texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
        return [-float(s) for s in scorer.score(texts)]

    reward.__name__ = f"negated_{scorer.name}"
    return reward


def rl_settings(config: TrainConfig, output_dir: Path, device: str) -> Any:
    """TRL's GRPOConfig or RLOOConfig of a run (by its objective): cpwb's steps, learning rate, seed and the RL
    settings."""
    from trl import GRPOConfig, RLOOConfig

    extra = {"loss_type": "grpo"} if config.objective == "grpo" else {}
    return (GRPOConfig if config.objective == "grpo" else RLOOConfig)(
        output_dir=str(output_dir), max_steps=config.steps or 200, learning_rate=config.lr,
        lr_scheduler_type="linear", warmup_steps=config.warmup_steps, max_grad_norm=config.max_grad_norm,
        per_device_train_batch_size=config.anchors_per_step * config.rl_generations,
        gradient_accumulation_steps=config.grad_accum, num_generations=config.rl_generations,
        max_completion_length=config.rl_max_new_tokens, temperature=1.0, top_p=1.0, beta=config.rl_beta,
        seed=config.seed, data_seed=config.seed, use_cpu=device == "cpu", bf16=False,
        logging_steps=1, save_strategy="steps", save_steps=config.checkpoint_every, save_total_limit=1,
        report_to=[], disable_dropout=True, disable_tqdm=not config.progress,
        # cpwb's own setting (off by default), not TRL's default (on): recomputing activations costs time, not
        # results, and a 135M policy needs no memory saved
        gradient_checkpointing=config.gradient_checkpointing, **extra)


def fit_rl(config: TrainConfig, resume: bool = False):
    """Train the GRPO or RLOO policy (resuming from `<output_dir>/<objective>/`), save its adapter; return a
    TrainResult."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import GRPOTrainer, RLOOTrainer

    from cpwb.core.errors import ConfigError
    from cpwb.engine.assets import load_causal_lm, load_tokenizer, model_label
    from cpwb.engine.device import peak_memory_mb, pick_device
    from cpwb.engine.scoring import load_toxicity_scorer
    from cpwb.steps.training.batches import load_training_pairs
    from cpwb.steps.training.checkpoints import save_adapter
    from cpwb.steps.training.trainer import TrainResult

    _, heldout, source = load_training_pairs(config)  # the held-out pairs every evaluation uses
    try:
        scorer = load_toxicity_scorer(config.rl_scorer)  # a reward that does not load fails before anything
    except Exception as err:  # noqa: BLE001 - any loading failure is the setting's
        raise ConfigError(f"the reward scorer does not load: {err}", field="rl_scorer") from None
    run_dir, adapter_dir = Path(config.output_dir), Path(config.output_dir) / "adapter"
    trainer_dir = run_dir / config.objective
    if resume and (run_dir / "config.yaml").is_file():
        require_same_settings(run_dir / "config.yaml", to_dict(config), NOT_FITTED,
                              config_type=TrainConfig)
        if (adapter_dir / "adapter_config.json").is_file() and (run_dir / "metrics.jsonl").is_file():
            # finished (the adapter is saved last): TRL resuming its final checkpoint would train one step more
            from cpwb.engine.adapters import load_adapter

            history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
            policy, tokenizer = load_adapter(adapter_dir, config.model, str(pick_device(config.device)),
                                             config.trust_remote_code)
            return TrainResult(run_dir, adapter_dir, history, heldout, policy, tokenizer)
    device = str(pick_device(config.device))
    model = load_causal_lm(config.model, device=device, dtype=config.dtype,
                           trust_remote_code=config.trust_remote_code)
    tokenizer = load_tokenizer(config.model, trust_remote_code=config.trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    atomic_write_text(run_dir / "config.yaml", yaml_text(to_dict(config)))
    atomic_write_json(run_dir / "data.json", {**source, "rl_prompts": "rtp nontoxic rows 600+",
                                              "reward": f"-{scorer.name}"})
    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=list(config.target_modules), task_type="CAUSAL_LM")
    trainer_type = GRPOTrainer if config.objective == "grpo" else RLOOTrainer
    trainer = trainer_type(model=model, reward_funcs=toxicity_reward(scorer),
                           args=rl_settings(config, trainer_dir, device),
                           train_dataset=Dataset.from_dict({"prompt": rl_prompts(config.rl_prompts)}),
                           processing_class=tokenizer, peft_config=lora)
    checkpoints = sorted(trainer_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    last = checkpoints[-1] if resume and checkpoints else None
    started = time.perf_counter()
    if last is not None and int(last.name.split("-")[1]) >= trainer.args.max_steps:
        # stopped after its final checkpoint, before the adapter: TRL resuming it would train one step more
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file
        from transformers import TrainerState

        set_peft_model_state_dict(trainer.model, load_file(last / "adapter_model.safetensors"))
        trainer.state = TrainerState.load_from_json(str(last / "trainer_state.json"))
    else:
        trainer.train(resume_from_checkpoint=str(last) if last else None)
    seconds = time.perf_counter() - started
    history = [{"step": int(h["step"]), **{k: v for k, v in h.items() if isinstance(v, (int, float))}}
               for h in trainer.state.log_history if "loss" in h]
    steps, memory = max(len(history), 1), peak_memory_mb(pick_device(config.device))
    for record in history:  # TRL's own step time (kept in its checkpoints, so a resumed run keeps it), else the
        record["step_seconds"] = record.get("step_time", seconds / steps)  # run's seconds spread over its steps
        record["peak_memory_mb"] = memory
    atomic_write_text(run_dir / "metrics.jsonl", "".join(json.dumps(h, sort_keys=True) + "\n" for h in history))
    policy = trainer.model
    save_adapter(adapter_dir, policy, model_label(config.model))
    return TrainResult(run_dir, adapter_dir, history, heldout, policy.eval(), tokenizer)
