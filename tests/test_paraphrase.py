"""Hard-negative generation: config checks, anchors and few-shot data, the shared-prefix sampler, full runs, resume."""
from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from scipy.stats import chisquare

from cpwb.core.config import from_dict, load_yaml_config
from cpwb.core.errors import AssetError, ConfigError
from cpwb.data.pairs import read_pairs, validate_pairs_file
from cpwb.engine.generate import prompt_ids
from cpwb.engine.sampler import TransformersGenerator, _warpers, nucleus_sample, shared_prefix_length
from cpwb.steps.negatives.anchors import FEW_SHOT_POOL_ROWS, PROMPTS, few_shot_examples, load_anchors
from cpwb.steps.negatives.config import GenerateConfig
from cpwb.steps.negatives.hardness import edit_ratio
from cpwb.steps.negatives.run import LOG_FILE, GenerationModels, VLLMGenerator, run_generation

REPO = Path(__file__).resolve().parents[1]


class CrcScorer:
    """A deterministic stand-in toxicity scorer: a pseudo-random score per text, so filters pass some and fail some."""

    name = "crc"

    def score(self, texts, batch_size: int = 256, progress: bool = False) -> np.ndarray:
        return np.array([zlib.crc32(t.encode()) % 1000 / 1000 for t in texts])


@pytest.fixture(scope="module")
def embedder():
    from cpwb.engine.scoring import SentenceEmbedder

    return SentenceEmbedder.from_pretrained()


@pytest.fixture
def models(tiny_lm, embedder):
    model, tokenizer = tiny_lm
    generator = TransformersGenerator(model, tokenizer, "tiny-llama", temperature=1.0, top_p=1.0)
    return GenerationModels(generator, model, tokenizer, CrcScorer(), embedder)


def small_config(tmp_path: Path, **changes) -> GenerateConfig:
    """Six ParaDetox anchors, two paraphrases a side, thresholds that the stand-in scores pass about half the time."""
    settings = dict(n_anchors=6, paraphrases_per_anchor=2, n_examples=2, max_new_tokens=10, batch_size=2,
                    t_pos=0.45, t_neg=0.55, s_min=-1.0, min_edit=0.0, length_ratio_min=0.01, length_ratio_max=50.0,
                    delta=50.0, n_positives=1, n_negatives=1, output_dir=str(tmp_path / "run"), progress=False)
    return from_dict(GenerateConfig, {**settings, **changes})


# ------------------------------------------------------------------------------------------------ config


@pytest.mark.parametrize("changes, field", [
    ({"t_pos": 0.6, "t_neg": 0.5}, "t_neg"),
    ({"s_min": 1.0}, "s_min"),
    ({"length_ratio_min": 2.0, "length_ratio_max": 1.5}, "length_ratio_max"),
    ({"anchors": "toxigen"}, "human_fallback"),
    ({"human_fallback": False, "n_negatives": 9}, "n_negatives"),
    ({"temperature": 0}, "temperature"),
    ({"delta": -1.0}, "delta"),
    ({"anchors": "rtp"}, "anchors"),
    ({"paraphrase_per_anchor": 3}, "paraphrase_per_anchor"),
])
def test_bad_settings_name_their_field(changes, field):
    with pytest.raises(ConfigError) as error:
        from_dict(GenerateConfig, changes, "gen.yaml")
    assert error.value.field == field and str(error.value).startswith("gen.yaml: ")


def test_shipped_yaml_mirrors_the_dataclass():
    path = REPO / "configs" / "generate_default.yaml"
    config = load_yaml_config(GenerateConfig, path)
    assert set(yaml.safe_load(path.read_text())) == {f.name for f in dataclasses.fields(GenerateConfig)}
    assert dataclasses.replace(config, output_dir=GenerateConfig.output_dir) == GenerateConfig()


# ------------------------------------------------------------------------------------------ anchors, prompts


def test_paradetox_anchors_are_normalised_neutral_sides_outside_the_few_shot_pool():
    from cpwb.data.corpora import load_paradetox, normalize_text
    from cpwb.data.paradetox import paradetox_heldout

    reserved = {r.id for r in paradetox_heldout()}  # the canonical held-out pairs are never anchors
    rows = [r for r in load_paradetox() if r.id not in reserved]
    anchors = load_anchors(GenerateConfig(n_anchors=5, anchor_offset=2))
    assert [a.id for a in anchors] == [r.id for r in rows[2:7]]  # the first rows all have a usable neutral side
    assert anchors[0].text == normalize_text(rows[2].neutrals[0])
    assert anchors[0].human_negatives == (normalize_text(rows[2].toxic),)
    assert not reserved & {a.id for a in load_anchors(GenerateConfig(n_anchors=200))}
    rows = load_paradetox()
    pool = {r.id for r in rows[-FEW_SHOT_POOL_ROWS:]}
    with pytest.raises(ConfigError, match="available") as error:
        load_anchors(GenerateConfig(n_anchors=5, anchor_offset=len(rows) - FEW_SHOT_POOL_ROWS - 3))
    assert error.value.field == "n_anchors"
    assert not pool & {a.id for a in load_anchors(GenerateConfig(n_anchors=20))}


def test_toxigen_anchors_carry_their_group():
    anchors = load_anchors(GenerateConfig(anchors="toxigen", human_fallback=False, n_anchors=4,
                                          toxigen_groups=["women"]))
    assert {a.group for a in anchors} == {"women"} and all(a.id.startswith("neutral-") for a in anchors)
    assert len({a.text for a in anchors}) == 4 and not anchors[0].human_negatives


def test_few_shot_examples_are_seeded_rewrites_that_the_scorer_separates():
    from cpwb.engine.scoring import load_toxicity_scorer

    scorer = load_toxicity_scorer()
    examples = few_shot_examples(GenerateConfig(n_examples=4), scorer)
    assert set(examples) == set(PROMPTS) and all(len(v) == 4 for v in examples.values())
    toxic = examples["toxic-v1"]
    assert (scorer.score([t for _, t in toxic]) >= 0.9).all() and (scorer.score([s for s, _ in toxic]) <= 0.1).all()
    assert all(0.3 <= edit_ratio(s, t) <= 0.7 for s, t in examples["neutral-v1"])  # clear rewordings, no copies
    assert few_shot_examples(GenerateConfig(n_examples=4), scorer) == examples
    assert few_shot_examples(GenerateConfig(n_examples=4, seed=1), scorer) != examples


# --------------------------------------------------------------------------------------------- the sampler


def testshared_prefix_length_leaves_every_row_a_token():
    assert shared_prefix_length([[1, 2, 3], [1, 2, 3]]) == 2
    assert shared_prefix_length([[1, 2, 3, 4], [1, 2, 5]]) == 2
    assert shared_prefix_length([[7, 2], [1, 2]]) == 0
    assert shared_prefix_length([[1, 2, 3]]) == 2


def test_greedy_rows_match_plain_generate_while_finished_rows_leave_the_batch(default_lm):
    model, tokenizer = default_lm
    prompts = ["Say hello.", "Name three fruits, separated by commas.", "Write one long sentence about rain."]
    rows = [prompt_ids(tokenizer, p, chat=True, system="Be brief.", examples=[("Say yes.", "Yes.")]) for p in prompts]
    generator = TransformersGenerator(model, tokenizer, "default", temperature=1.0, top_p=1.0, top_k=1)  # = greedy
    ours = generator.sample(rows, k=2, seed=0, max_new_tokens=16)

    width = max(map(len, rows))
    ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    with torch.no_grad():
        plain = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=16, do_sample=False,
                               pad_token_id=tokenizer.pad_token_id)
    expected = tokenizer.batch_decode(plain[:, width:], skip_special_tokens=True)
    assert ours == [[text, text] for text in expected]
    ended = [(row[width:] == tokenizer.eos_token_id).any().item() for row in plain]
    assert ended[0] and not ended[2]  # rows finished at different steps: the batch shrank on the way


@pytest.mark.parametrize("temperature, top_p, top_k", [(1.0, 0.9, 0), (0.8, 0.95, 0), (1.3, 0.5, 0), (1.0, 0.9, 5),
                                                         (1.0, 1.0, 0), (0.7, 0.9, 50)])
def test_nucleus_sampling_draws_from_the_transformers_warped_distribution(temperature, top_p, top_k):
    generator = torch.Generator().manual_seed(0)
    sharp, peaked, flat = (torch.randn(200, generator=generator) * 0.3 for _ in range(3))
    sharp[:2] += 9  # its nucleus lies in the top 3: the first width
    peaked[:6] += 7  # in the top 8 but not the top 3: the second width
    flat *= 0.5  # in neither: the warpers' full path
    draws, widths = 20000, (3, 8)
    logits = torch.stack([sharp, peaked, flat])
    warpers = _warpers(temperature, top_p, top_k)
    tokens = nucleus_sample(logits.repeat_interleave(draws, 0), temperature, top_p, top_k, warpers, generator,
                            widths).view(3, draws)
    expected = torch.softmax(warpers(None, logits), dim=-1)
    for row in range(3):
        seen = torch.bincount(tokens[row], minlength=200).double()
        kept = expected[row] > 0
        assert (seen[~kept] == 0).all()  # never a token the warpers cut
        expected_counts = expected[row][kept].double().numpy() * draws
        if kept.sum() > 1:  # sampling noise only
            assert chisquare(seen[kept].numpy(), expected_counts * draws / expected_counts.sum()).pvalue > 1e-3
    again = [nucleus_sample(logits, temperature, top_p, top_k, warpers, torch.Generator().manual_seed(1), widths)
             for _ in range(2)]
    assert torch.equal(*again)


def test_sampling_is_seeded_and_leaves_the_model_as_it_was(tiny_lm):
    model, tokenizer = tiny_lm
    rows = [prompt_ids(tokenizer, a, chat=True, system="Paraphrase.") for a in ("you are kind.", "hi there")]
    generator = TransformersGenerator(model, tokenizer, "tiny", temperature=0.9, top_p=0.95, top_k=20)
    global_rng = torch.get_rng_state()
    first = generator.sample(rows, k=3, seed=5, max_new_tokens=6)
    assert torch.get_rng_state().equal(global_rng)  # a generator of its own: callers' random streams are untouched
    assert [len(samples) for samples in first] == [3, 3] and len(set(first[0])) > 1
    assert generator.sample(rows, k=3, seed=5, max_new_tokens=6) == first
    assert generator.sample(rows, k=3, seed=6, max_new_tokens=6) != first
    assert not model.training


def test_vllm_backend_without_vllm_says_how_to_get_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(AssetError, match="pip install vllm"):
        VLLMGenerator(GenerateConfig(backend="vllm"))


# ------------------------------------------------------------------------------------------------ full runs


def _log(config: GenerateConfig) -> list[dict]:
    return [json.loads(line) for line in (Path(config.output_dir) / LOG_FILE).read_text().splitlines()]


def test_a_run_writes_valid_pairs_with_provenance_a_log_and_a_card(tmp_path, models):
    config = small_config(tmp_path)
    path = run_generation(config, models)
    assert path == tmp_path / "run" / "pairs.jsonl" and validate_pairs_file(path) == []
    log, records = _log(config), list(read_pairs(path))
    assert [r["id"] for r in log] == [a.id for a in load_anchors(config)]
    assert 0 < len(records) < len(log)  # the stand-in scores keep some anchors and drop others
    assert [r.id for r in records] == [r["id"] for r in log if r["kept"]]
    texts = [t for r in records for t in (*r.positives, *r.negatives)]
    generated = [t for t in texts if t.source == "generated"]
    assert generated and all(t.generator == "tiny-llama" and t.prompt_id in PROMPTS for t in generated)
    assert all(t.generator is None for t in texts if t.source == "human")
    for record in records:
        assert all(t.scores["toxicity"] <= 0.45 for t in record.positives)
        assert all(t.scores["toxicity"] >= 0.55 for t in record.negatives)
        assert record.meta["prototype_phi"] == pytest.approx(np.mean([t.scores["phi"] for t in record.positives]))
    card = json.loads((tmp_path / "run" / "pairs_card.json").read_text())
    assert card["counts"]["anchors"] == 6 and card["counts"]["anchors_kept"] == len(records)
    assert card["funnel"]["positives (generated)"]["offered"] == 6 * 2
    assert card["prompts"]["toxic-v1"]["examples"] and card["config"]["seed"] == 0
    assert "Filter funnel" in (tmp_path / "run" / "pairs_card.md").read_text()
    assert 'src="plotly.min.js"' in (tmp_path / "run" / "figures" / "hard_negatives.html").read_text()
    assert (tmp_path / "run" / "figures" / "plotly.min.js").stat().st_size > 1_000_000


class Stop(Exception):
    """Raised by the test hook to interrupt a run."""


def test_an_interrupted_run_resumes_without_duplicated_or_lost_anchors(tmp_path, models):
    whole = small_config(tmp_path / "whole")
    run_generation(whole, models)
    stopped = small_config(tmp_path / "stopped")
    seen = []

    def stop_after_three(record):
        seen.append(record["id"])
        if len(seen) == 3:  # mid-way through the second chunk of two
            raise Stop

    with pytest.raises(Stop):
        run_generation(stopped, models, on_anchor=stop_after_three)
    assert len(_log(stopped)) == 3
    run_generation(stopped, models, on_anchor=lambda record: seen.append(record["id"]))
    assert len(seen) == 6 == len(set(seen))  # the resumed run wrote only the three missing anchors
    for name in ("pairs.jsonl", LOG_FILE):
        assert (tmp_path / "stopped" / "run" / name).read_text() == (tmp_path / "whole" / "run" / name).read_text()


@pytest.mark.parametrize("torn", ["log line", "pair line"])
def test_a_crash_while_appending_is_repaired_on_resume(tmp_path, models, torn):
    config = small_config(tmp_path)
    run_generation(config, models)
    pairs_path, log_path = tmp_path / "run" / "pairs.jsonl", tmp_path / "run" / LOG_FILE
    complete_pairs, complete_log = pairs_path.read_text(), log_path.read_text()
    last_kept = max(i for i, r in enumerate(_log(config)) if r["kept"])
    log_lines, pair_lines = complete_log.splitlines(keepends=True), complete_pairs.splitlines(keepends=True)
    if torn == "log line":  # the last kept anchor's pair is on file, its log line half written
        log_path.write_text("".join(log_lines[:last_kept]) + log_lines[last_kept][:40])
    else:  # its pair line half written, its log line never started
        log_path.write_text("".join(log_lines[:last_kept]))
        pairs_path.write_text("".join(pair_lines[:-1]) + pair_lines[-1][:40])
    run_generation(config, models)
    assert pairs_path.read_text() == complete_pairs and log_path.read_text() == complete_log


def test_resuming_with_other_settings_is_refused_but_a_moved_folder_resumes(tmp_path, models):
    run_generation(small_config(tmp_path, n_anchors=2), models)
    shutil.copytree(tmp_path / "run", tmp_path / "moved")
    run_generation(small_config(tmp_path, n_anchors=2, output_dir=str(tmp_path / "moved")), models,
                   on_anchor=lambda record: pytest.fail("a finished run generated again"))
    with pytest.raises(ConfigError, match="other settings") as error:
        run_generation(small_config(tmp_path, n_anchors=2, t_neg=0.6), models)
    assert error.value.field == "t_neg"
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "pairs.jsonl").write_text("")
    with pytest.raises(ConfigError, match="not a run of cpwb generate"):
        run_generation(small_config(tmp_path, output_dir=str(foreign)), models)
