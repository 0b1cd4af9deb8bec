"""Config loading: YAML forms, overrides, unknown keys, wrong types, cross-field rules."""

from __future__ import annotations

from pathlib import Path

import pytest

from etegrec.config import (
    REPO_ROOT,
    Config,
    ConfigError,
    config_from_dict,
    dump_yaml,
    load_config,
    load_from_argv,
    parse_overrides,
)


def test_defaults_validate() -> None:
    cfg = load_config()
    assert cfg.train.lr_rec == 0.005 and cfg.model.code_length == len(cfg.tokenizer.num_emb_list) + 1


def test_flat_and_nested_yaml(tmp_path: Path) -> None:
    flat = tmp_path / "flat.yaml"
    flat.write_text("dataset: Foo\nlr_rec: 0.003\nnum_emb_list: [64, 64, 64]\ncode_num: 64\n")
    nested = tmp_path / "nested.yaml"
    nested.write_text(
        "data:\n  dataset: Foo\ntrain:\n  lr_rec: 0.003\ntokenizer:\n  num_emb_list: [64, 64, 64]\nmodel:\n  code_num: 64\n"
    )
    a, b = load_config(flat), load_config(nested)
    assert a.to_dict() == b.to_dict()
    assert a.data.dataset == "Foo" and a.train.lr_rec == 0.003 and a.tokenizer.num_emb_list == [64, 64, 64]


def test_override_forms() -> None:
    cfg = load_config(
        None,
        [
            "--lr_rec=0.001",  # the user's run.sh form
            "--train.lr_id",
            "1e-5",  # section-qualified, YAML float without a dot
            "--num_emb_list",
            "128",
            "128",
            "--code_num=128",
            "--code_length=3",
            "--sk_epsilons=0,0.003",
            "--metrics=recall@5,ndcg@10",
            "--dedup=false",
        ],
    )
    assert cfg.train.lr_rec == 0.001 and cfg.train.lr_id == 1e-5
    assert cfg.tokenizer.num_emb_list == [128, 128] and cfg.tokenizer.sk_epsilons == [0.0, 0.003]
    assert cfg.train.metrics == ["recall@5", "ndcg@10"] and cfg.data.dedup is False


def test_overrides_beat_yaml(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("epochs: 7\n")
    assert load_config(p, ["--epochs=9"]).train.epochs == 9


def test_aliases() -> None:
    out = parse_overrides(["--batch_size", "64", "--epochs=3"], aliases={"batch_size": "rq_batch_size", "epochs": "rq_epochs"})
    assert out == {"rq_batch_size": 64, "rq_epochs": 3}


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--lr_recc=0.1"], "did you mean 'lr_rec'"),
        (["--model.lr_rec=0.1"], "unknown config key 'model.lr_rec'"),
        (["--lr_rec=fast"], "'lr_rec' (command line) must be float"),
        (["--epochs=1.5"], "'epochs' (command line) must be int"),
        (["--dedup=3"], "'dedup' (command line) must be bool"),
        (["--code_length=5"], "set code_length=4"),
        (["--valid_metric=ndcg@20"], "valid_metric='ndcg@20' must be one of"),
        (["--cycle=3", "--eval_step=2"], "not a multiple of eval_step=2"),
        (["--eval_step=0"], "eval_step=0 must be >= 1"),  # a range error, not a modulo-by-zero traceback
        (["--num_emb_list", "256", "128", "256"], "every codebook must have code_num"),
        (["--ablation=no_rec"], "ablation='no_rec'; use one of"),
        (["--warm_phase=rec"], "warm_phase='rec'; use tokenizer or recommender"),
        (["lr_rec=0.1"], "overrides look like --key=value"),
    ],
)
def test_errors_name_the_key(argv: list[str], fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, argv)
    assert fragment in str(err.value)


def test_yaml_unknown_key_names_file(tmp_path: Path) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text("lr_recc: 0.1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml\).*did you mean 'lr_rec'"):
        load_config(p)


def test_missing_config_file() -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_from_argv(["--config", "config/nope.yaml"], None)


def test_dump_roundtrip_every_key_commented(tmp_path: Path) -> None:
    cfg = load_config(None, ["--lr_rec=0.002", "--text_fields", "title", "brand"])
    text = dump_yaml(cfg, header="test")
    for line in text.splitlines():
        if line and not line.startswith("#"):
            assert "# (" in line, line  # every key carries "# (type) meaning"
    p = tmp_path / "dump.yaml"
    p.write_text(text)
    assert load_config(p).to_dict() == cfg.to_dict()
    assert config_from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()


def test_paths_resolve_against_repo_root() -> None:
    cfg = Config()
    assert cfg.dataset_dir == REPO_ROOT / "RecBole" / "dataset" / cfg.data.dataset
    assert cfg.path("/abs/x") == Path("/abs/x")


@pytest.mark.parametrize("path", sorted((REPO_ROOT / "config").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load_and_are_commented(path: Path) -> None:
    load_config(path)
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            assert "# (" in line, f"{path.name}: key without a '# (type) meaning' comment: {line}"
