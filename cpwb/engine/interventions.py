"""Training-free detoxification on a model's hidden states: ProFS weight projection and activation steering.

Both are fitted from the same preference pairs as CP (a non-toxic and a toxic text each), by the hidden state at the
output of each transformer block, averaged over a text's tokens (padding and the start token left out):
X+_l, X-_l [N, D] for block l.

**ProFS** (Uppaal et al., ICLR 2025, "Model Editing as a Robust and Denoised variant of DPO", section 4):
- the preference matrix T_l = (X+_l - X-_l) / 2;
- centring: the corpus-wide direction mu_l, the top right singular vector of X+_l, is projected out,
  T_l <- T_l (I - mu_l mu_l^T);
- the toxic subspace is spanned by the top-k right singular vectors V_l [D, k] of T_l, P_l = V_l V_l^T;
- the edit: each chosen block's MLP output projection ("value" vectors, which write into the residual stream)
  becomes W_out <- (I - P_l) W_out, so that block's MLP can no longer write along V_l (the paper edits the upper
  layers, k = 2 for GPT-2).
Unlike the released code (Uppaal/detox-edit), padding tokens are not averaged into the embeddings.

**Activation steering** (mean difference, as in ActAdd, Turner et al. 2023, and CAA, Rimsky et al., ACL 2024): at
the output of block l the residual stream becomes h <- h - s * (mean X-_l - mean X+_l) at every position, s the
strength (s = 1 removes the average toxic-minus-neutral offset once).

Why written here: `steering-vectors` (the maintained steering library) requires transformers < 5, and no library
offers ProFS; both are a few lines of torch. An `Intervention` is a small artefact (its directions in safetensors, its
settings in JSON) attached to a loaded model in place and reversibly (`suspended`), so "the base model" of an
intervened model is the same object switched off, as for a peft adapter.
"""
from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from cpwb.core.errors import ConfigError, InputError
from cpwb.core.files import atomic_path
from cpwb.engine.nll import decoder_layers

INTERVENTION_FILE = "intervention.json"
WEIGHTS_FILE = "intervention.safetensors"
ATTACHED = "_cpwb_intervention"  # the attribute an attached intervention lives under on its model
MLP_OUTPUTS = ("mlp.down_proj", "mlp.c_proj", "mlp.fc2", "mlp.dense_4h_to_h")  # Llama/Qwen/SmolLM, GPT-2, OPT, NeoX
Method = Literal["profs", "steering"]


def mlp_output(block: torch.nn.Module) -> tuple[torch.nn.Module, int]:
    """A block's MLP output projection and the axis of its weight that indexes the residual stream."""
    for path in MLP_OUTPUTS:
        module = block.get_submodule(path) if _has(block, path) else None
        if module is not None:
            # nn.Linear stores [out, in]; GPT-2's Conv1D stores [in, out] (its `nf` is the output size)
            return module, 1 if hasattr(module, "nf") else 0
    raise InputError(f"no MLP output projection ({', '.join(MLP_OUTPUTS)}) in {type(block).__name__}",
                     field="model")


def _has(module: torch.nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
        return True
    except AttributeError:
        return False


def text_embeddings(model, tokenizer, texts: Sequence[str], layers: Sequence[int], batch_size: int = 16,
                    max_length: int = 128, cache_dir: str | Path | None = None, progress: bool = False,
                    costs: dict[int, float | None] | None = None) -> dict[int, torch.Tensor]:
    """{block l: [N, D] float32}: each text's residual stream at the output of block l, averaged over its own tokens
    (cached in `cache_dir` per model, block and texts; `costs` receives the seconds of the pass per block, as
    cpwb.engine.embeddings.model_embeddings records them)."""
    from cpwb.engine.embeddings import model_embeddings

    passes: dict[int, float | None] = {}
    states = model_embeddings(model, tokenizer, list(texts), [layer + 1 for layer in layers], use_adapter=False,
                              cache_dir=cache_dir, batch_size=batch_size, max_length=max_length, progress=progress,
                              before_final_norm=True, costs=passes)
    if costs is not None:
        costs.update({layer: passes.get(layer + 1) for layer in layers})
    return {layer: torch.from_numpy(states[layer + 1]) for layer in layers}


def profs_directions(positive: torch.Tensor, negative: torch.Tensor, rank: int, centering: bool = True,
                     length_difference: torch.Tensor | None = None) -> torch.Tensor:
    """ProFS's toxic subspace of one layer: [D, rank] orthonormal columns from X+ and X- [N, D].

    `length_difference` [N] (cpwb's control, not in the paper): what the pairs' token-count difference explains
    linearly (through the origin: pairs of equal length carry no length effect) is regressed out of the preference
    matrix first, so that a length confound cannot become a direction.
    """
    matrix = (positive - negative).double() / 2
    if length_difference is not None:
        x = length_difference.double()
        if float(x @ x) > 0:
            matrix = matrix - torch.outer(x, x @ matrix / (x @ x))
    if centering:
        mu = torch.linalg.svd(positive.double(), full_matrices=False).Vh[0]
        matrix = matrix - torch.outer(matrix @ mu, mu)
    return torch.linalg.svd(matrix, full_matrices=False).Vh[:rank].T.float()


def project_out(weight: torch.Tensor, directions: torch.Tensor, axis: int) -> torch.Tensor:
    """`weight` with its `axis` (the residual-stream one) projected off the span of `directions` [D, k]."""
    w = weight.double()
    v = directions.to(w)
    edited = w - v @ (v.T @ w) if axis == 0 else w - (w @ v) @ v.T
    return edited.to(weight.dtype)


def steering_vectors(positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    """The mean toxic-minus-neutral offset of one layer [D] from X+ and X- [N, D]."""
    return (negative.mean(0) - positive.mean(0)).float()


@dataclass
class Intervention:
    """A fitted ProFS edit or steering direction set: per chosen layer, a [D, k] basis (ProFS) or a [D] vector."""

    method: Method
    layers: list[int]
    tensors: dict[int, torch.Tensor] = field(repr=False)
    strength: float = 1.0  # steering only
    settings: dict[str, Any] = field(default_factory=dict)  # how it was fitted (recorded, not used)
    _undo: list[Any] = field(default_factory=list, repr=False)

    # --------------------------------------------------------------------------------------------- attaching
    def attach(self, model):
        """Apply to `model` in place (ProFS edits weights, steering adds forward hooks) and return it."""
        check_layers(self.layers, model, "layers")
        if getattr(model, ATTACHED, None) is not None:
            raise InputError("the model already carries an intervention", field="model")
        self._apply(model)
        setattr(model, ATTACHED, self)
        return model

    def _apply(self, model) -> None:
        blocks = decoder_layers(model)
        for layer in self.layers:
            if self.method == "profs":
                module, axis = mlp_output(blocks[layer])
                original = module.weight.data
                module.weight.data = project_out(original, self.tensors[layer].to(original.device), axis)
                self._undo.append(lambda m=module, w=original: setattr(m.weight, "data", w))
            else:
                offset = (-self.strength * self.tensors[layer]).to(next(model.parameters()).device)
                hook = blocks[layer].register_forward_hook(lambda _m, _i, o, d=offset: _shifted(o, d))
                self._undo.append(hook.remove)

    def _remove(self) -> None:
        while self._undo:
            self._undo.pop()()

    # --------------------------------------------------------------------------------------------- saving
    def save(self, folder: str | Path) -> Path:
        """`intervention.json` (method, layers, strength, settings) and `intervention.safetensors` (directions),
        written as a whole folder."""
        from safetensors.torch import save_file

        meta = {k: v for k, v in asdict(self).items() if k not in ("tensors", "_undo")}
        with atomic_path(folder) as tmp:
            tmp.mkdir()
            save_file({f"layer.{k}": v.contiguous() for k, v in self.tensors.items()}, str(tmp / WEIGHTS_FILE))
            (tmp / INTERVENTION_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")
        return Path(folder)


def _shifted(output: Any, offset: torch.Tensor) -> Any:
    """A block's output with `offset` added to its hidden states at every position."""
    if isinstance(output, tuple):
        return (output[0] + offset.to(output[0].dtype), *output[1:])
    return output + offset.to(output.dtype)


def is_intervention(folder: str | Path) -> bool:
    """True when `folder` holds a saved intervention."""
    return (Path(folder) / INTERVENTION_FILE).is_file()


def load_intervention(folder: str | Path) -> Intervention:
    """A saved intervention (its tensors read with safetensors); a malformed file fails in one line."""
    from safetensors.torch import load_file

    path = Path(folder) / INTERVENTION_FILE
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        method, layers = meta["method"], [int(x) for x in meta["layers"]]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise InputError(f"not a cpwb intervention ({type(err).__name__}: {err})", path) from None
    if method not in ("profs", "steering"):
        raise InputError(f"unknown method {method!r}", path, field="method")
    tensors = load_file(str(Path(folder) / WEIGHTS_FILE))
    missing = [layer for layer in layers if f"layer.{layer}" not in tensors]
    if missing:
        raise InputError(f"no tensors for layers {missing}", Path(folder) / WEIGHTS_FILE, field="layers")
    return Intervention(method, layers, {layer: tensors[f"layer.{layer}"] for layer in layers},
                        float(meta.get("strength", 1.0)), dict(meta.get("settings", {})))


def attached(model) -> Intervention | None:
    """The intervention attached to `model`, if any."""
    return getattr(model, ATTACHED, None)


@contextlib.contextmanager
def suspended(model) -> Iterator[Any]:
    """Inside the block, `model` runs without its attached intervention (restored afterwards)."""
    intervention = attached(model)
    if intervention is None:
        yield model
        return
    intervention._remove()
    try:
        yield model
    finally:
        intervention._apply(model)


def detach(model):
    """Remove `model`'s intervention for good (weights restored, hooks removed); returns the model."""
    intervention = attached(model)
    if intervention is not None:
        intervention._remove()
        delattr(model, ATTACHED)
    return model


def check_layers(layers: Sequence[int], model_or_count, field_name: str) -> None:
    """Refuse layer indices the model does not have (one line naming the setting)."""
    count = model_or_count if isinstance(model_or_count, int) else len(decoder_layers(model_or_count))
    bad = [layer for layer in layers if not 0 <= layer < count]
    if bad or not layers:
        raise ConfigError(f"layer(s) {bad or list(layers)} do not exist: the model has blocks 0..{count - 1}",
                          field=field_name)
