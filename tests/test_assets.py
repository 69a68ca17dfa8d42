"""Embedded assets: conversion into a checksummed cache, reuse, rebuild on tampering, clear failures."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from cpwb.core.errors import AssetError
from cpwb.engine import assets


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CPWB_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def counting_build(calls: list):
    def build(out):
        calls.append(1)
        (out / "weights.bin").write_bytes(b"weights")
        (out / "config.json").write_text("{}")
    return build


def test_conversion_runs_once_then_reuses_the_cache(cache, tmp_path):
    source = tmp_path / "source.bin"
    source.write_bytes(b"v1")
    calls: list = []
    first = assets.cached_conversion("thing", source, counting_build(calls))
    second = assets.cached_conversion("thing", source, counting_build(calls))
    assert first == second == cache / "thing" and len(calls) == 1
    manifest = json.loads((first / assets.MANIFEST).read_text())
    assert set(manifest["files"]) == {"weights.bin", "config.json"}


def test_tampered_or_stale_cache_is_rebuilt(cache, tmp_path):
    source = tmp_path / "source.bin"
    source.write_bytes(b"v1")
    calls: list = []
    folder = assets.cached_conversion("thing", source, counting_build(calls))
    (folder / "weights.bin").write_bytes(b"evil!!!")
    assets.cached_conversion("thing", source, counting_build(calls))
    assert len(calls) == 2 and (folder / "weights.bin").read_bytes() == b"weights"
    source.write_bytes(b"v2")  # a new package version
    assets.cached_conversion("thing", source, counting_build(calls))
    assert len(calls) == 3


def test_failed_conversion_leaves_nothing_behind(cache, tmp_path):
    source = tmp_path / "source.bin"
    source.write_bytes(b"v1")

    def broken(out):
        (out / "weights.bin").write_bytes(b"half")
        raise RuntimeError("killed mid-way")

    with pytest.raises(RuntimeError):
        assets.cached_conversion("thing", source, broken)
    assert not (cache / "thing").exists()
    assert not any(p.name.startswith(".thing") for p in cache.iterdir())


def test_default_lm_loads_from_the_cache_without_converting_again(default_lm):
    folder = Path(assets.resolve_model("default"))
    assert folder == assets.cache_dir() / assets.DEFAULT_LM
    built = (folder / assets.MANIFEST).stat().st_mtime_ns
    model = assets.load_causal_lm("default")
    assert (folder / assets.MANIFEST).stat().st_mtime_ns == built
    assert model.config.model_type == "llama" and model.num_parameters() > 100e6
    assert getattr(model, "hf_quantizer", None) is None


def test_unknown_model_fails_fast_naming_the_embedded_defaults():
    with pytest.raises(AssetError, match="smollm2-135m-instruct"):
        assets.load_causal_lm("no-such-org/no-such-model")


def test_model_folder_with_custom_code_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"auto_map": {"AutoModelForCausalLM": "modeling.Evil"}}))
    (tmp_path / "modeling.py").write_text("raise SystemExit('ran remote code')\n")
    with pytest.raises(AssetError, match="trust_remote_code"):
        assets.load_causal_lm(str(tmp_path))


def test_asset_table_lists_license_and_checksum():
    rows = {row["name"]: row for row in assets.asset_table()}
    assert {assets.DEFAULT_LM, assets.DEFAULT_EMBEDDER, "bilstm-toxblock"} <= set(rows)
    for row in rows.values():
        assert row["license"] in {"Apache-2.0", "MIT"} and len(row["sha256"]) == 64
