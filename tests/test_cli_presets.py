"""Model presets: every configuration they produce is one their family accepts, they follow the
ops' own choices (query tile, Mamba2 tiling), --tp changes what it should; `jitkern presets`."""

import json
import subprocess
import sys

import pytest

from conftest import ROOT
from jitkern.family import get_family, registered
from jitkern.families.spec_dec_attention import pick_q_tile
from jitkern.presets import PRESETS, get_preset

TPS = (1, 2, 4, 8, 16)


def _valid_tps(preset):
    out = []
    for tp in TPS:
        try:
            preset.check_tp(tp)
        except ValueError:
            continue
        out.append(tp)
    return out


def test_the_issue_presets_exist():
    assert {"nemotron-h-8b", "nemotron-3-nano-30b", "llama-3.1-8b", "llama-3.1-70b"} <= set(PRESETS)
    assert get_preset("llama-3.1-70b").default_tp == 8
    with pytest.raises(ValueError, match="unknown preset 'x'; presets: nemotron-h-8b"):
        get_preset("x")


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_configuration_passes_its_family(name):
    preset = PRESETS[name]
    families = {f.name for f in registered()}
    tps = _valid_tps(preset)
    assert 1 in tps and preset.default_tp in tps
    checked = 0
    for tp in tps:
        configs = preset.configs(tp)
        assert configs and len({(f, tuple(sorted(c.items()))) for f, c in configs}) == len(configs)
        for fam_name, cfg in configs:
            if fam_name not in families:
                continue
            get_family(fam_name).canonical(cfg)  # raises for anything the family rejects
            checked += 1
    if not checked:
        pytest.skip(f"none of {name}'s families is registered yet")


def test_hybrid_presets_cover_both_layer_kinds():
    for name in ("nemotron-h-8b", "nemotron-3-nano-30b"):
        fams = {f for f, _ in PRESETS[name].configs()}
        assert fams == {"mamba2_mtp_ssm_update", "spec_dec_attention"}, name
    assert {f for f, _ in PRESETS["llama-3.1-8b"].configs()} == {"spec_dec_attention"}


def test_mamba2_configs_are_the_ones_the_op_builds():
    from jitkern.families.mamba2 import nemotron_config

    cfgs = [c for f, c in PRESETS["nemotron-h-8b"].configs() if f == "mamba2_mtp_ssm_update"]
    # N=128, P=64 is the Nemotron shape the family's nemotron_config describes exactly; the op
    # runs decode (T=1), one-token and multi-token chains with intermediate states, trees of
    # T > 1 (each also in its small-grid tiling, chains in their coarse one), and the commit with
    # nemotron_config(state dtype, tree=False)
    want = [nemotron_config(sd, tree=t, intermediate=i, T=T, small_grid=g, coarse=c)
            for sd in ("bf16", "fp32") for g, c in ((False, False), (True, False), (False, True))
            for t, i, T in ((False, False, 1), (False, True, 1), (False, True, None),
                            (True, True, None))]
    want += [nemotron_config(sd, tree=False) for sd in ("bf16", "fp32")]
    key = lambda c: tuple(sorted(c.items()))  # noqa: E731
    assert sorted(set(map(key, cfgs))) == sorted(set(map(key, want)))
    assert len(cfgs) == len(set(map(key, cfgs)))
    # the family's own warm-up set is part of every Nemotron preset's set
    from jitkern.families.mamba2 import MAMBA2

    assert set(map(key, MAMBA2.warmup_configs())) <= set(map(key, cfgs))


def test_presets_and_the_op_share_one_q_tile_chooser():
    import importlib

    op_module = importlib.import_module("jitkern.ops.spec_dec_attention")

    assert op_module.pick_q_tile is pick_q_tile
    assert [pick_q_tile(r) for r in (1, 16, 17, 64, 65, 128, 129, 2048)] == \
        [16, 16, 32, 64, 128, 128, 128, 128]


def test_tp_changes_the_group_and_the_query_tiles():
    p = get_preset("nemotron-3-nano-30b")  # 32 query heads, 2 KV heads
    assert [p.attention.group(tp) for tp in (1, 2, 4, 8)] == [16, 16, 8, 4]
    decode = lambda tp: {c["q_tile"] for f, c in p.configs(tp)  # noqa: E731
                         if f == "spec_dec_attention" and c["mode"] == "decode"}
    assert decode(1) == {16} and decode(8) == {16}
    chain = lambda tp: {c["q_tile"] for f, c in p.configs(tp)  # noqa: E731
                        if f == "spec_dec_attention" and c["mode"] == "chain"}
    assert chain(1) == {16, 32, 64, 128}  # G=16: 1..8 tokens -> 16..128 rows
    assert chain(8) == {16, 32}  # G=4: 8 tokens -> 32 rows
    with pytest.raises(ValueError, match="--tp 3 does not divide"):
        p.configs(3)
    with pytest.raises(ValueError, match="--tp must be a positive integer"):
        p.configs(0)


def cli(*args):
    return subprocess.run([sys.executable, "-m", "jitkern.cli", "presets", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_presets_command_lists_and_shows():
    proc = cli()
    assert proc.returncode == 0 and all(n in proc.stdout for n in PRESETS)
    listed = json.loads(cli("--json").stdout)
    assert [d["name"] for d in listed] == list(PRESETS)
    shown = json.loads(cli("llama-3.1-70b", "--json").stdout)
    assert shown["tp"] == 8 and shown["attention"]["group_per_rank"] == 8
    assert len(shown["configs"]) == len(PRESETS["llama-3.1-70b"].configs())
    at1 = json.loads(cli("llama-3.1-70b", "--tp", "1", "--json").stdout)
    assert at1["tp"] == 1
    bad = cli("llama-3.1-8b", "--tp", "5")
    assert bad.returncode == 2 and "--tp 5 does not divide the 32 attention query heads" in bad.stderr
    bad = cli("nope")
    assert bad.returncode == 2 and "unknown preset 'nope'" in bad.stderr
