"""Safe loading: no remote code unless asked, no pickles at run time, weights from safetensors, a lab bound to
localhost.

Behavioural tests use planted payloads (model code, pickles) that would create a marker file if they ever ran;
static scans of cpwb's source keep `torch.load`, `pickle` and `trust_remote_code` where they are allowed.
(Tampered caches are rebuilt: tests/reliability/test_interruptions.py.)
"""
from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from cpwb.core.config import from_dict
from cpwb.core.errors import AssetError, CpwbError
from cpwb.engine.adapters import load_adapter
from cpwb.engine.assets import load_causal_lm, load_tokenizer, refuse_remote_code
from cpwb.engine.scoring import SentenceEmbedder
from cpwb.steps.training.config import TrainConfig
from cpwb.steps.training.trainer import train
from tests.reliability.jobs import REPO, train_settings
from tests.reliability.source_scan import constant, package_calls

# ------------------------------------------------------------------------------------------------ remote code


def plant_code(folder: Path, marker: Path, auto_map_in: str | None, with_py: bool) -> Path:
    """Plant custom code into a model folder: an auto_map naming it and/or a .py file creating `marker` if run."""
    if auto_map_in is not None:
        config = json.loads((folder / auto_map_in).read_text())
        config["auto_map"] = {"AutoConfig": "modeling_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.Evil",
                              "AutoTokenizer": ["modeling_evil.EvilTokenizer", None]}
        (folder / auto_map_in).write_text(json.dumps(config))
    if with_py:
        (folder / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('remote code ran')\n")
    return folder


@pytest.fixture
def model_copy(tmp_path, tiny_model_dir) -> Path:
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))


CUSTOM_CODE = {
    "auto_map and a .py file": ("config.json", True),
    "a .py file only": (None, True),
    "auto_map only (code fetched elsewhere)": ("config.json", False),
    "tokenizer auto_map and a .py file": ("tokenizer_config.json", True),
}


@pytest.mark.bad_input  # each folder goes to four loaders: tokenizer, model, embedder, trainer
@pytest.mark.parametrize("auto_map_in, with_py", CUSTOM_CODE.values(), ids=CUSTOM_CODE.keys())
def test_model_folder_with_custom_code_is_refused_by_every_loader(model_copy, tmp_path, pairs_file, auto_map_in,
                                                                  with_py):
    marker = tmp_path / "ran"
    folder = str(plant_code(model_copy, marker, auto_map_in, with_py))
    for load in (load_tokenizer, load_causal_lm, SentenceEmbedder.from_pretrained):
        with pytest.raises(AssetError, match="carries custom model code.*trust_remote_code=True") as error:
            load(folder)
        assert "\n" not in str(error.value)
    out = tmp_path / "run"
    with pytest.raises(AssetError, match="carries custom model code"):
        train(from_dict(TrainConfig, {"model": folder, "pairs": str(pairs_file), "output_dir": str(out)}))
    assert not marker.exists() and not any(p.is_file() for p in out.rglob("*"))
    refuse_remote_code(folder, trust_remote_code=True)  # an explicit setting lets it through


# ------------------------------------------------------------------------------------------------ pickles


class Payload:
    """Creates a file when unpickled: a stand-in for arbitrary code in a pickled checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def pickled_weights(path: Path, marker: Path) -> None:
    """A torch pickle checkpoint whose unpickling runs code."""
    torch.save({"weight": torch.zeros(2), "payload": Payload(marker)}, path)


@pytest.mark.bad_input(2)  # a model folder and an adapter folder holding pickles
def test_pickled_weights_are_never_unpickled(model_copy, tmp_path, tiny_model_dir):
    marker = tmp_path / "unpickled"
    (model_copy / "model.safetensors").unlink()  # only a pickle left: refused, not loaded
    pickled_weights(model_copy / "pytorch_model.bin", marker)
    for load in (load_causal_lm, SentenceEmbedder.from_pretrained):
        with pytest.raises(AssetError) as error:
            load(str(model_copy))
        assert "\n" not in str(error.value)
    adapter = tmp_path / "adapter"  # an adapter folder holding a pickle instead of adapter_model.safetensors
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}))
    pickled_weights(adapter / "adapter_model.bin", marker)
    with pytest.raises(Exception):  # torch's weights-only unpickler refuses the payload's global
        load_adapter(adapter, model=str(tiny_model_dir))
    assert not marker.exists()


@pytest.mark.fault
def test_trainer_checkpoints_load_weights_only(tmp_path, tiny_model_dir, pairs_file):
    """A planted payload in a checkpoint's trainer state stops a resume without running."""
    settings = train_settings(tiny_model_dir, pairs_file, tmp_path / "run", steps=2)
    train(from_dict(TrainConfig, settings), stop_after=2)
    checkpoint = next((tmp_path / "run" / "checkpoints").glob("step-*"))
    marker = tmp_path / "unpickled"
    torch.save({"step": 2, "payload": Payload(marker)}, checkpoint / "trainer_state.pt")
    with pytest.raises(Exception, match="[Ww]eights only|weights_only"):
        train(from_dict(TrainConfig, settings), resume=True)
    assert not marker.exists()


def test_no_unsafe_deserialisation_in_cpwb_source():
    calls = list(package_calls())
    torch_loads = [c for c in calls if c.name == "torch.load"]
    assert torch_loads and all(constant(c.keyword("weights_only")) is True for c in torch_loads), \
        [c.where for c in torch_loads]
    unpickling = [c for c in calls if re.search(r"pickle\.loads?$|Unpickler", c.name)]
    assert {(c.module, c.function) for c in unpickling} == {("engine.bilstm", "read_tokenizer_pickle")}, \
        [c.where for c in unpickling]
    np_loads = [c for c in calls if c.name in ("np.load", "numpy.load")]
    assert all(constant(c.keyword("allow_pickle")) is False for c in np_loads), [c.where for c in np_loads]
    trusting = [c.where for c in calls if constant(c.keyword("trust_remote_code")) is True]
    assert trusting == []
    source = "\n".join(p.read_text() for p in sorted((REPO / "cpwb").glob("*.py")))
    assert not re.search(r"""["']trust_remote_code["']\s*:\s*True""", source)


@pytest.mark.bad_input
def test_the_conversion_time_unpickler_admits_only_tokenizer_classes(tmp_path):
    import pickle

    from cpwb.engine.bilstm import read_tokenizer_pickle

    marker = tmp_path / "unpickled"
    (tmp_path / "tokenizer.pickle").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(CpwbError):
        read_tokenizer_pickle(tmp_path / "tokenizer.pickle")
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------ make lab


def lab_command() -> list[str]:
    """The command `make lab` runs (its recipe, printed by `make -n` without rebuilding the environment)."""
    printed = subprocess.run(["make", "-n", "-o", ".venv/.cpwb-installed", "lab"], cwd=REPO, capture_output=True,
                             text=True, check=True).stdout
    line = next(c for c in printed.replace("\\\n", " ").splitlines() if "jupyter" in c and " lab" in c)
    return shlex.split(line)


def test_make_lab_binds_localhost_and_keeps_its_token():
    command = lab_command()
    assert "--ServerApp.ip=127.0.0.1" in command
    unsafe = ("token", "password", "0.0.0.0", "disable_check_xsrf", "allow_origin", "allow_remote_access", "--ip=")
    assert not [arg for arg in command if any(word in arg for word in unsafe)]
    shown = subprocess.run([*command, "--show-config"], cwd=REPO, capture_output=True, text=True, timeout=120)
    config = shown.stdout
    assert shown.returncode == 0 and re.search(r"^\s+\.ip = '127\.0\.0\.1'$", config, re.M), shown.stderr[-2000:]
    assert not re.search(r"token|password|allow_remote_access", config), config
