"""DExperts: decoding-time control by an expert and an anti-expert (Liu et al., ACL 2021, "DExperts: Decoding-Time
Controlled Text Generation with Experts and Anti-Experts", eq. 1): the next-token logits are

    z = z_base + alpha * (z_expert - z_anti),

the expert tuned on non-toxic text, the anti-expert on toxic text. Here both are LoRA adapters on the base model
itself (peft adapters "expert" and "anti", one copy of the weights), trained on the same pairs as CP: the expert on
the positives, the anti-expert on the negatives.

`DExpertsLM` presents the combined distribution through the interfaces the rest of cpwb uses, so that generation
(cpwb.engine.sampler), phi, WikiText-2 perplexity and the phi gap all see it, not the base model:
- its decoder returns the three models' last hidden states side by side [h_base | h_expert | h_anti], and its LM
  head maps them to the combined logits (so the NLL engine's chunked head and log-softmax apply unchanged);
- its forward keeps one key/value cache per model (`new_cache`), so KV-cached decoding works;
- `base_of` (cpwb.engine.adapters) runs it as the base model alone, one pass.
Every token costs three forward passes of the model (one when run as the base): the comparison reports it.
transformers' `model.generate` takes a PreTrainedModel and does not run it; lm-evaluation-harness does, through
cpwb.steps.evaluation.harness (log-likelihood tasks).

Written here because no maintained library implements DExperts on current transformers; the original code
(alisawuffles/DExperts) targets GPT-2 on transformers 3.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import torch

ADAPTERS = ("expert", "anti")


class _Caches:
    """The key/value caches of the base, expert and anti-expert passes, reshaped together."""

    def __init__(self, config) -> None:
        from transformers import DynamicCache

        self.parts = [DynamicCache(config=config) for _ in range(3)]

    def batch_repeat_interleave(self, repeats: int) -> None:
        for part in self.parts:
            part.batch_repeat_interleave(repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        for part in self.parts:
            part.batch_select_indices(indices)


class _Decoder(torch.nn.Module):
    """The three decoders run on the same inputs; last_hidden_state = [h_base | h_expert | h_anti]."""

    def __init__(self, owner: DExpertsLM) -> None:
        super().__init__()
        self.owner = [owner]  # a list, so the owner is not registered as a submodule (no cycle)

    def forward(self, **kwargs: Any) -> SimpleNamespace:
        states = [out.last_hidden_state for out in self.owner[0]._passes(lambda decoder, _: decoder(**kwargs))]
        return SimpleNamespace(last_hidden_state=torch.cat(states, dim=-1))


class _Head(torch.nn.Module):
    """The base LM head applied to each third of the hidden size, combined as DExperts's logits."""

    def __init__(self, owner: DExpertsLM) -> None:
        super().__init__()
        self.owner = [owner]

    @property
    def weight(self) -> torch.Tensor:  # the NLL engine sizes its chunks by the vocabulary
        return self.owner[0].head.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        owner = self.owner[0]
        if owner.plain:
            return owner.head(hidden)
        base, expert, anti = (owner.head(part).float() for part in hidden.chunk(3, dim=-1))
        return base + owner.alpha * (expert - anti)


class DExpertsLM(torch.nn.Module):
    """A peft model carrying adapters "expert" and "anti", decoding as DExperts with weight `alpha`."""

    def __init__(self, peft_model, alpha: float) -> None:
        super().__init__()
        missing = [name for name in ADAPTERS if name not in peft_model.peft_config]
        if missing:
            raise ValueError(f"the peft model lacks adapter(s) {missing}")
        self.peft = peft_model
        self.alpha = float(alpha)
        self.plain = False  # True inside `as_base`: the base model alone
        base = peft_model.get_base_model()
        self.head = base.get_output_embeddings()
        self._decoder, self._head = _Decoder(self), _Head(self)

    # the causal-LM surface cpwb uses -------------------------------------------------------------------------
    @property
    def config(self):
        return self.peft.get_base_model().config

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    @property
    def generation_config(self):
        return self.peft.get_base_model().generation_config

    def get_decoder(self) -> torch.nn.Module:
        return self._decoder

    def get_output_embeddings(self) -> torch.nn.Module:
        return self._head

    def new_cache(self) -> Any:
        """The cache a decoding loop passes back to `forward`: one per model, or the base's alone as the base."""
        from transformers import DynamicCache

        return DynamicCache(config=self.config) if self.plain else _Caches(self.config)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, past_key_values: Any = None, use_cache: bool = False,
                logits_to_keep: int = 0, **_: Any) -> SimpleNamespace:
        """Combined next-token logits (float32) of every (or the last `logits_to_keep`) position."""
        from cpwb.engine.sampler import cache_argument

        argument = cache_argument(self.peft)
        caches = past_key_values.parts if isinstance(past_key_values, _Caches) else [past_key_values] * 3

        def run(_decoder, index: int):
            return self.peft(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             use_cache=use_cache, logits_to_keep=logits_to_keep, **{argument: caches[index]}).logits

        logits = [z.float() for z in self._passes(run)]
        combined = logits[0] if self.plain else logits[0] + self.alpha * (logits[1] - logits[2])
        return SimpleNamespace(logits=combined, past_key_values=past_key_values)

    def _passes(self, fn) -> list[Any]:
        """`fn(decoder, i)` under the base (adapters off), the expert and the anti-expert; the base alone when
        plain."""
        decoder = self.peft.get_base_model().get_decoder()
        with self.peft.disable_adapter():
            out = [fn(decoder, 0)]
        if self.plain:
            return out
        for index, name in enumerate(ADAPTERS, start=1):
            self.peft.set_adapter(name)
            out.append(fn(decoder, index))
        return out

    @contextlib.contextmanager
    def as_base(self) -> Iterator[DExpertsLM]:
        """Inside the block the model is its base (one pass, base logits)."""
        previous, self.plain = self.plain, True
        try:
            yield self
        finally:
            self.plain = previous


# --------------------------------------------------------------------------------------------- the artefact
DEXPERTS_FILE = "dexperts.json"  # beside expert/ and anti/, two peft adapter folders


def is_dexperts(folder) -> bool:
    """True when `folder` holds a DExperts artefact."""
    from pathlib import Path

    return (Path(folder) / DEXPERTS_FILE).is_file()


def save_dexperts(folder, expert_dir, anti_dir, alpha: float, settings: dict | None = None) -> None:
    """`folder` as expert/ and anti/ (copies of the two adapters) and dexperts.json (alpha), written as a whole."""
    import json
    import shutil

    from cpwb.core.files import atomic_path

    with atomic_path(folder) as tmp:
        for name, source in (("expert", expert_dir), ("anti", anti_dir)):
            shutil.copytree(source, tmp / name)
        (tmp / DEXPERTS_FILE).write_text(json.dumps({"method": "dexperts", "alpha": float(alpha), **(settings or {})},
                                                    indent=2), encoding="utf-8")


def dexperts_files(folder) -> list:
    """The files a DExperts artefact's behaviour depends on (for keying its evaluations)."""
    from pathlib import Path

    folder = Path(folder)
    return [folder / DEXPERTS_FILE, *(folder / name / "adapter_model.safetensors" for name in ADAPTERS)]


def load_dexperts(folder, base_model) -> DExpertsLM:
    """The DExperts model of a saved artefact on `base_model` (its adapters loaded from safetensors, eval mode)."""
    import json
    from pathlib import Path

    from peft import PeftModel

    from cpwb.core.errors import InputError

    path = Path(folder) / DEXPERTS_FILE
    try:
        alpha = float(json.loads(path.read_text(encoding="utf-8"))["alpha"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise InputError(f"not a DExperts artefact ({type(err).__name__}: {err})", path, field="alpha") from None
    for name in ADAPTERS:
        if not (Path(folder) / name / "adapter_config.json").is_file():
            raise InputError(f"no {name} adapter (adapter_config.json) beside it", path, field=name)
    peft_model = PeftModel.from_pretrained(base_model, str(Path(folder) / "expert"), adapter_name="expert")
    peft_model.load_adapter(str(Path(folder) / "anti"), adapter_name="anti")
    return DExpertsLM(peft_model.eval(), alpha).eval()
