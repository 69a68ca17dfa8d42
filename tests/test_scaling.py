"""Training beyond one process, on the CPU: data parallel and FSDP under a real launcher (gloo), a killed rank and a
resume, QLoRA through bitsandbytes, a tracker's event file, and adapters that load on another machine."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from cpwb.core.config import from_dict
from cpwb.steps.training.config import TrainConfig
from cpwb.steps.training.trainer import train
from tests.reliability.jobs import driver_env, job_args

REPO = Path(__file__).resolve().parents[1]
# Two processes and one see the same global batches; their adapters differ only by float32 summation order (a
# batch of 4 anchors against two of 2 averaged by the all-reduce): measured 4e-8 after 4 steps, so 1e-5 is wide.
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, default_lm):
    """A tiny random Llama as a local model folder, and a pairs file of 8 anchors."""
    from cpwb.data.pairs import PairRecord, PairText, write_pairs
    from tests.conftest import make_tiny_lm
    from tests.test_train import NEUTRAL, TOXIC

    root = tmp_path_factory.mktemp("scaling")
    make_tiny_lm(default_lm[1]).save_pretrained(root / "model")
    default_lm[1].save_pretrained(root / "model")
    records = [PairRecord(f"p{i}", n, (PairText(n, "human"), PairText(n + ".", "human")), (PairText(t, "human"),))
               for i, (n, t) in enumerate(zip(NEUTRAL, TOXIC))]
    write_pairs(root / "pairs.jsonl", records)
    return root


def settings(tiny: Path, out: Path, **changes) -> dict:
    return {"model": str(tiny / "model"), "pairs": str(tiny / "pairs.jsonl"), "holdout_fraction": 0.0, "steps": 4,
            "anchors_per_step": 4, "lr": 1e-3, "warmup_steps": 1, "checkpoint_every": 2, "lora_r": 4,
            "lora_alpha": 8, "device": "cpu", "progress": False, "output_dir": str(out), **changes}


def _free_port() -> int:
    with socket.socket() as handle:
        handle.bind(("127.0.0.1", 0))
        return handle.getsockname()[1]


def launch(args: list[str], processes: int = 2, log: Path | None = None, wait: bool = True):
    """`accelerate launch` of N CPU processes (gloo): its multi-process launcher is torchrun; `device: cpu` in the
    settings makes each process use the CPU."""
    command = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes",
               str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(_free_port()), *args]
    output = open(log or os.devnull, "wb")
    process = subprocess.Popen(command, cwd=REPO, env=driver_env(), stdout=output, stderr=subprocess.STDOUT,
                               start_new_session=True)
    if wait:
        assert process.wait(timeout=900) == 0, (log.read_text()[-4000:] if log else "launch failed")
    return process


def cli_args(config: dict) -> list[str]:
    return [f"--{key.replace('_', '-')}={json.dumps(value) if not isinstance(value, str) else value}"
            for key, value in config.items()]


def max_difference(a: Path, b: Path) -> float:
    left, right = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    assert left.keys() == right.keys()
    return max((left[k] - right[k]).abs().max().item() for k in left)


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def one_process(tiny, tmp_path_factory):
    """The reference: the same settings trained in this process."""
    out = tmp_path_factory.mktemp("one") / "run"
    return train(from_dict(TrainConfig, settings(tiny, out)))


@pytest.mark.slow
@pytest.mark.parametrize("distributed", ["ddp", "fsdp"])
def test_two_processes_train_the_adapter_of_one(tiny, one_process, tmp_path, distributed):
    out = tmp_path / "run"
    launch(["-m", "cpwb", "train", *cli_args(settings(tiny, out, distributed=distributed))], log=tmp_path / "log")
    assert max_difference(out / "adapter", one_process.adapter_dir) < TOLERANCE
    # the logged loss is the mean over the processes' shares: the loss of the whole micro-batch
    assert losses(out) == pytest.approx([m["loss"] for m in one_process.metrics], abs=TOLERANCE)
    # one set of files, written by the main process only
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "checkpoints", "config.yaml", "data.json",
                                                      "metrics.jsonl"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002", "step-000004"]
    assert len(losses(out)) == 4
    data = json.loads((out / "data.json").read_text())
    assert data["processes"] == 2 and data["distributed"] == distributed


@pytest.mark.slow
@pytest.mark.parametrize("distributed", ["ddp", "fsdp"])
def test_a_killed_rank_stops_the_launcher_and_the_run_resumes_to_the_same_adapter(tiny, one_process, tmp_path,
                                                                                  distributed):
    """DDP checkpoints hold the optimizer's own state, FSDP checkpoints the state gathered whole: both resume under
    any number of processes, here in one."""
    out = tmp_path / "run"
    marker = tmp_path / "hung"
    config = settings(tiny, out, distributed=distributed)
    launcher = launch(["-m", "tests.reliability.driver", "train",
                       job_args(settings=config, hang_at_call=3, marker=marker, marker_per_rank=True)],
                      log=tmp_path / "log", wait=False)
    deadline = time.monotonic() + 600
    while not all(Path(f"{marker}.{rank}").exists() for rank in (0, 1)):
        assert launcher.poll() is None and time.monotonic() < deadline, (tmp_path / "log").read_text()[-3000:]
        time.sleep(0.1)
    os.kill(int(Path(f"{marker}.1").read_text()), signal.SIGKILL)  # one rank, mid-step 3
    assert launcher.wait(timeout=300) != 0  # the launcher notices and stops the other rank
    assert [p.name for p in (out / "checkpoints").glob("step-*")] == ["step-000002"]
    resumed = train(from_dict(TrainConfig, config), resume=True)  # resumes in one process
    assert [m["step"] for m in resumed.metrics] == [1, 2, 3, 4]
    assert losses(out) == pytest.approx([m["loss"] for m in one_process.metrics], abs=TOLERANCE)
    assert max_difference(out / "adapter", one_process.adapter_dir) < TOLERANCE


def test_anchors_per_step_below_the_process_count_is_refused(tiny, tmp_path):
    log = tmp_path / "log"
    process = launch(["-m", "cpwb", "train", *cli_args(settings(tiny, tmp_path / "run", anchors_per_step=1))],
                     log=log, wait=False)
    assert process.wait(timeout=600) != 0
    assert "anchors_per_step: must be at least the number of processes (2)" in log.read_text()
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_the_adapter_loads_elsewhere_and_the_merged_model_alone(tiny, one_process, tmp_path):
    from cpwb.steps.training.export import export

    copied = tmp_path / "elsewhere" / "adapter"
    copied.parent.mkdir()
    subprocess.run(["cp", "-r", str(one_process.adapter_dir), str(copied)], check=True)
    assert json.loads((copied / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny / "model")
    merged = export(one_process.run_dir, tmp_path / "merged", merge=True)
    check = (
        "import sys, torch\n"
        "from peft import PeftModel\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"base = AutoModelForCausalLM.from_pretrained({str(tiny / 'model')!r})\n"
        f"peft = PeftModel.from_pretrained(base, {str(copied)!r}).eval()\n"
        f"alone = AutoModelForCausalLM.from_pretrained({str(merged)!r}).eval()\n"
        f"ids = AutoTokenizer.from_pretrained({str(merged)!r})('thanks for the help', return_tensors='pt').input_ids\n"
        "a = peft.generate(input_ids=ids, max_new_tokens=8, do_sample=False)\n"
        "b = alone.generate(input_ids=ids, max_new_tokens=8, do_sample=False)\n"
        "gap = (peft(input_ids=ids).logits - alone(input_ids=ids).logits).abs().max()\n"
        "print(a.tolist() == b.tolist(), float(gap))\n")
    result = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, env=driver_env(), capture_output=True,
                            text=True, timeout=300)
    same, difference = result.stdout.split()[-2:]
    assert same == "True" and float(difference) < 1e-4, result.stderr[-2000:]


def test_the_embedded_default_s_adapter_names_it_by_its_own_name(tmp_path):
    from cpwb.engine.assets import DEFAULT_LM, model_label

    assert model_label("default") == DEFAULT_LM == "smollm2-135m-instruct"
    assert model_label("HuggingFaceTB/SmolLM2-360M") == "HuggingFaceTB/SmolLM2-360M"


def test_qlora_trains_saves_reloads_and_resumes_on_the_cpu(tiny, tmp_path):
    pytest.importorskip("bitsandbytes")  # in the dev set-up; absent only where a user installed cpwb bare
    from peft import PeftModel

    from cpwb.engine.assets import load_causal_lm

    config = from_dict(TrainConfig, settings(tiny, tmp_path / "run", load_in_4bit=True, steps=3))
    first = train(config, stop_after=2)
    assert type(first.model.get_base_model().model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear4bit"
    resumed = train(config, resume=True)
    straight = train(from_dict(TrainConfig, {**settings(tiny, tmp_path / "straight", load_in_4bit=True, steps=3)}))
    assert max_difference(resumed.adapter_dir, straight.adapter_dir) < 1e-6
    base = load_causal_lm(str(tiny / "model"), load_in_4bit=True)
    reloaded = PeftModel.from_pretrained(base, str(resumed.adapter_dir))
    assert reloaded.peft_config["default"].r == 4


def test_tensorboard_holds_the_logged_loss(tiny, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = train(from_dict(TrainConfig, settings(tiny, tmp_path / "run", steps=2, report_to=["tensorboard"])))
    events = next((tmp_path / "run" / "tracking").rglob("events.out.tfevents.*"))
    scalars = EventAccumulator(str(events.parent)).Reload()
    logged = [event.value for event in scalars.Scalars("loss")]
    assert logged == pytest.approx([m["loss"] for m in result.metrics], rel=1e-6)
    assert (tmp_path / "run" / "metrics.jsonl").is_file()  # JSONL stays the record of truth


def test_an_uninstalled_tracker_is_refused_in_one_line():
    from cpwb.core.errors import ConfigError

    with pytest.raises(ConfigError, match="report_to: unknown tracker 'wandb'"):
        from_dict(TrainConfig, {"report_to": ["wandb"]})
