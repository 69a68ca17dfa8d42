"""The trainer: config validation before loading, objectives run, resume reproduces, NaN stops cleanly."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from cpwb.core.config import from_dict
from cpwb.core.errors import ConfigError, InputError
from cpwb.data.pairs import PairRecord, PairText, write_pairs
from cpwb.steps.training.batches import anchor_order, build_anchor_batch
from cpwb.steps.training.checkpoints import latest_checkpoint
from cpwb.steps.training.config import TrainConfig
from cpwb.steps.training.objective import to_slots
from cpwb.steps.training.trainer import NonFiniteLossError, train
from tests.conftest import make_tiny_lm

NEUTRAL = ["thanks for the help", "the weather is nice today", "i disagree with this policy", "please stop that",
           "this movie was not good", "he made a mistake", "they are wrong about it", "i am annoyed by the noise"]
TOXIC = ["thanks for nothing, idiot", "this damn weather sucks", "this policy is crap, morons",
         "stop that, you jerk", "this movie was shit", "he is a stupid fool", "they are dumb as rocks",
         "shut the hell up with that noise"]


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory, default_lm):
    """A tiny random Llama saved as a local model folder, and a small pairs file."""
    root = tmp_path_factory.mktemp("tiny")
    tokenizer = default_lm[1]
    make_tiny_lm(tokenizer).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    records = [PairRecord(id=f"p{i}", anchor=n, positives=(PairText(n, "human"), PairText(n + ".", "human")),
                          negatives=(PairText(t, "human"),)) for i, (n, t) in enumerate(zip(NEUTRAL, TOXIC))]
    write_pairs(root / "pairs.jsonl", records)
    return root


def tiny_config(root, out, **overrides) -> TrainConfig:
    settings = dict(model=str(root / "model"), pairs=str(root / "pairs.jsonl"), holdout_fraction=0.0, steps=4,
                    anchors_per_step=2, lr=1e-3, warmup_steps=1, checkpoint_every=2, lora_r=4, lora_alpha=8,
                    lora_dropout=0.1, output_dir=str(out), progress=False, run_cache=False)
    return from_dict(TrainConfig, {**settings, **overrides})


@pytest.mark.parametrize("field, value, text", [
    ("tau", -0.5, "must be > 0"), ("tau", 0.0, "must be > 0"), ("alpha", -1.0, "must be >= 0"),
    ("max_positives", 0, "must be >= 1"), ("pairs", "/no/such/pairs.jsonl", "file not found"),
    ("objective", "ppo", "must be one of"), ("holdout_fraction", 1.0, "must be in [0, 1)"),
])
def test_bad_settings_fail_naming_the_field(field, value, text):
    with pytest.raises(ConfigError) as err:
        from_dict(TrainConfig, {field: value})
    assert err.value.field == field and text in str(err.value)


def test_unknown_target_module_fails_before_weights_load(tiny_setup, tmp_path, monkeypatch):
    import cpwb.steps.training.trainer as trainer

    monkeypatch.setattr(trainer, "build_model", lambda *a: pytest.fail("model loaded before the check"))
    with pytest.raises(ConfigError, match="unknown module.*qq_proj"):
        train(tiny_config(tiny_setup, tmp_path, target_modules=["q_proj", "qq_proj"]))


def test_anchor_stream_is_seeded_and_covers_each_epoch():
    first = anchor_order(5, seed=3, count=5)
    assert sorted(first) == list(range(5)) and first == anchor_order(5, seed=3, count=5)
    assert anchor_order(5, seed=3, count=3, offset=4) == (first + anchor_order(5, 3, 5, offset=5))[4:7]


def test_texts_land_in_their_anchor_slots():
    records = [PairRecord(id="a", anchor="x", positives=(PairText("p0", "human"),),
                          negatives=(PairText("n0", "human"), PairText("n1", "human"))),
               PairRecord(id="b", anchor="y", positives=(PairText("q0", "human"), PairText("q1", "human")),
                          negatives=(PairText("m0", "human"),))]
    import random

    batch = build_anchor_batch(records, [0, 1], TrainConfig(), random.Random(0))
    values = torch.arange(len(batch.texts), dtype=torch.float32)
    pos, pos_mask = to_slots(values, batch, "pos")
    neg, neg_mask = to_slots(values, batch, "neg")
    assert pos_mask.tolist() == [[True, False], [True, True]] and neg_mask.tolist() == [[True, True], [True, False]]
    assert [batch.texts[int(v)] for v in pos[pos_mask]] == ["p0", "q0", "q1"]
    assert [batch.texts[int(v)] for v in neg[neg_mask]] == ["n0", "n1", "m0"]


def test_general_kl_texts_join_the_batch_but_no_loss_slot():
    import random

    records = [PairRecord(id="a", anchor="x", positives=(PairText("p0", "human"),),
                          negatives=(PairText("n0", "human"),))]
    config = TrainConfig(kl_data="general", kl_texts_per_step=2)
    batch = build_anchor_batch(records, [0], config, random.Random(0), general=["g0", "g1", "g2"])
    assert batch.role == ["pos", "neg", "kl", "kl"] and set(batch.texts[2:]) <= {"g0", "g1", "g2"}
    values = torch.arange(len(batch.texts), dtype=torch.float32)
    assert to_slots(values, batch, "pos")[0].tolist() == [[0.0]]
    assert to_slots(values, batch, "neg")[0].tolist() == [[1.0]]


@pytest.mark.parametrize("objective", ["cp", "reference", "dpo", "simpo", "positives_only", "negatives_only"])
def test_every_objective_trains_and_writes_its_run(tiny_setup, tmp_path, objective):
    result = train(tiny_config(tiny_setup, tmp_path, objective=objective, steps=2, random_negatives=1))
    assert len(result.metrics) == 2 and all(torch.isfinite(torch.tensor(m["loss"])) for m in result.metrics)
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()
    assert (tmp_path / "config.yaml").is_file() and json.loads((tmp_path / "data.json").read_text())["n_train"] == 8
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2]


def test_directional_cp_pushes_negatives_up_relative_to_positives(tiny_setup, tmp_path):
    result = train(tiny_config(tiny_setup, tmp_path, steps=12, lr=3e-3, lora_dropout=0.0, anchor_weight=0.0))
    gap = [m["phi_neg"] - m["phi_pos"] for m in result.metrics]
    assert sum(gap[-3:]) / 3 > sum(gap[:3]) / 3


def test_resume_reaches_the_same_adapter(tiny_setup, tmp_path):
    straight = train(tiny_config(tiny_setup, tmp_path / "straight"))
    interrupted = tiny_config(tiny_setup, tmp_path / "resumed")
    train(interrupted, stop_after=2)
    assert latest_checkpoint(tmp_path / "resumed").name == "step-000002"
    assert not (tmp_path / "resumed" / "adapter").exists()
    resumed = train(interrupted, resume=True)
    a = load_file(str(straight.adapter_dir / "adapter_model.safetensors"))
    b = load_file(str(resumed.adapter_dir / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    assert [m["step"] for m in resumed.metrics] == [1, 2, 3, 4]
    assert [round(m["loss"], 6) for m in resumed.metrics] == [round(m["loss"], 6) for m in straight.metrics]


def test_non_finite_loss_stops_with_a_message_and_keeps_the_last_checkpoint(tiny_setup, tmp_path, monkeypatch):
    import cpwb.steps.training.trainer as trainer

    real = trainer.objective_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        value, metrics, tokens = real(*args, **kwargs)
        calls["n"] += 1
        return (value * float("nan") if calls["n"] == 3 else value), metrics, tokens

    monkeypatch.setattr(trainer, "objective_loss", poisoned)
    with pytest.raises(NonFiniteLossError, match="step 3.*step-000002"):
        train(tiny_config(tiny_setup, tmp_path))
    assert latest_checkpoint(tmp_path).name == "step-000002"
    assert not (tmp_path / "adapter").exists()


def test_resume_refuses_a_folder_started_with_other_settings_but_not_a_moved_one(tiny_setup, tmp_path):
    train(tiny_config(tiny_setup, tmp_path / "run"), stop_after=2)
    with pytest.raises(ConfigError, match="other settings.*tau"):
        train(tiny_config(tiny_setup, tmp_path / "run", tau=0.1), resume=True)
    (tmp_path / "run").rename(tmp_path / "moved")
    result = train(tiny_config(tiny_setup, tmp_path / "moved"), resume=True)
    assert [m["step"] for m in result.metrics] == list(range(1, len(result.metrics) + 1)) and len(result.metrics) > 2


def test_a_run_resumes_whatever_its_reuse_and_reporting_settings_hold(tiny_setup, tmp_path, monkeypatch):
    """What a run reuses or how it reports (config.NOT_FITTED) does not change what it fits: a folder resumes with
    them changed, and with `expert_cache`, run_cache's retired forerunner, in its record."""
    import yaml

    monkeypatch.setenv("CPWB_CACHE", str(tmp_path / "cache"))
    train(tiny_config(tiny_setup, tmp_path / "run"), stop_after=2)
    record = tmp_path / "run" / "config.yaml"
    record.write_text(yaml.safe_dump({**yaml.safe_load(record.read_text()), "expert_cache": True}, sort_keys=False))
    result = train(tiny_config(tiny_setup, tmp_path / "run", run_cache=True, embedding_cache=False, progress=True),
                   resume=True)
    assert [m["step"] for m in result.metrics] == [1, 2, 3, 4]


@pytest.mark.parametrize("kl_data", ["positives", "general"])
def test_kl_term_is_zero_at_start_and_logged(tiny_setup, tmp_path, kl_data):
    result = train(tiny_config(tiny_setup, tmp_path, steps=3, lr=1e-2, kl_weight=1.0, lora_dropout=0.0,
                               kl_data=kl_data))
    kls = [m["kl"] for m in result.metrics]
    assert abs(kls[0]) < 1e-6 and kls[-1] > 1e-6  # LoRA starts as the identity: the model equals its base


def test_an_empty_pairs_file_is_refused_before_weights_load(tmp_path, monkeypatch):
    import cpwb.steps.training.trainer as trainer

    monkeypatch.setattr(trainer, "build_model", lambda *a: pytest.fail("model loaded before the check"))
    monkeypatch.setattr(trainer, "check_target_modules", lambda *a: pytest.fail("model resolved before the check"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n   \n")
    with pytest.raises(InputError, match="holds no records"):
        train(from_dict(TrainConfig, {"pairs": str(empty), "output_dir": str(tmp_path / "out")}))
    assert not (tmp_path / "out").exists()


def test_a_pairs_file_trains_with_paradetox_and_no_run_trains_on_the_canonical_held_out_pairs(tiny_setup, tmp_path):
    from cpwb.data.pairs import read_pairs
    from cpwb.data.paradetox import paradetox_heldout
    from cpwb.steps.training.batches import load_training_pairs

    reserved = [r.id for r in paradetox_heldout()]
    file_records = list(read_pairs(tiny_setup / "pairs.jsonl"))
    leaked = PairRecord(id=reserved[0], anchor="a held-out anchor", positives=(PairText("fine words", "human"),),
                        negatives=(PairText("rude words", "human"),))
    write_pairs(tmp_path / "pairs.jsonl", [*file_records, leaked])
    only_file, file_heldout, source = load_training_pairs(tiny_config(tiny_setup, tmp_path, pairs=str(
        tmp_path / "pairs.jsonl")))
    assert [r.id for r in only_file] == [r.id for r in file_records] and not file_heldout
    assert source["n_reserved_left_out"] == 1  # the file's record of a canonical held-out anchor never trains
    mixed, heldout, source = load_training_pairs(tiny_config(tiny_setup, tmp_path, with_paradetox=True,
                                                             holdout_fraction=0.1, pairs=str(tmp_path / "pairs.jsonl")))
    assert [r.id for r in mixed[:len(file_records)]] == [r.id for r in file_records]
    assert len(mixed) > 3000 and source["with_paradetox"] and source["n_file"] == len(file_records) + 1
    assert [r.id for r in heldout] == reserved[1:]  # ParaDetox's held-out pairs, less the one the file claimed
    assert not {r.id for r in mixed} & set(reserved)
    paradetox_only, default_heldout, _ = load_training_pairs(TrainConfig())
    assert [r.id for r in default_heldout] == reserved and not {r.id for r in paradetox_only} & set(reserved)


def test_a_setting_added_since_a_run_started_is_no_change_at_its_default_only(tmp_path):
    from cpwb.core.config import require_same_settings, to_dict, yaml_text

    now = to_dict(TrainConfig(output_dir=str(tmp_path)))
    before = {k: v for k, v in now.items() if k != "run_cache"}  # recorded before run_cache existed
    (tmp_path / "config.yaml").write_text(yaml_text(before))
    require_same_settings(tmp_path / "config.yaml", now, config_type=TrainConfig)
    with pytest.raises(ConfigError, match="run_cache"):
        require_same_settings(tmp_path / "config.yaml", {**now, "run_cache": True}, config_type=TrainConfig)
    with pytest.raises(ConfigError, match="run_cache"):  # without the dataclass, a missing setting is a change
        require_same_settings(tmp_path / "config.yaml", now)
