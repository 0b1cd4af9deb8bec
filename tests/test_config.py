"""Config loading: YAML forms, overrides, unknown keys, wrong types, cross-field rules."""

from __future__ import annotations

from pathlib import Path

import pytest

from etegrec.config import (
    LEAVES,
    RANGE_OF,
    RANGES,
    REPO_ROOT,
    Config,
    ConfigError,
    config_from_dict,
    dump_yaml,
    given_values,
    load_config,
    load_from_argv,
    parse_overrides,
    resolve_path,
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
        (["--warm_phase=rec"], "warm_phase='rec'; use one of: tokenizer, recommender (command line)"),
        (["--lr_scheduler_type=step"], "lr_scheduler_type='step'; use one of: cosine, linear, constant"),
        (["--grpo_reward_type=dcg"], "grpo_reward_type='dcg'; use one of: prefix, cosine, none"),
        (["--grpo_rollout=greedy"], "grpo_rollout='greedy'; use one of: sample, beam"),
        (["--tokenizer_input=both"], "tokenizer_input='both'; use one of: dual, collab, text"),
        (["--raw_format=csv"], "raw_format='csv'; use one of: amazon2018, amazon2014, amazon2023, ml-100k"),
        (["--rq_device=gpu"], "rq_device='gpu'; use one of: auto, cpu, cuda, cuda:N (auto = CUDA when present)"),
        (["--metrics=hr@10", "--valid_metric=hr@10"], "metrics entry 'hr@10' is not recall@K or ndcg@K"),
        (["--sasrec_hidden_size=6"], "sasrec_hidden_size=6 must be divisible by sasrec_heads=4 (command line)"),
        (["lr_rec=0.1"], "overrides look like --key=value"),
        (["--warmup_ratio=0.1"], "warmup_ratio=0.1 and warmup_steps=8000 both set"),
        (["--warmup_ratio=1", "--warmup_steps=0"], "warmup_ratio=1.0 must be in [0, 1)"),
        (["--sia_tau=cold"], "sia_tau='cold'; use auto or a positive number"),
        (["--sia_tau=0"], "sia_tau='0'; use auto or a positive number"),
        (["--code_refresh_margin=-1"], "code_refresh_margin=-1.0 must be >= 0"),
    ],
)
def test_errors_name_the_key(argv: list[str], fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, argv)
    assert fragment in str(err.value)


def test_yaml_unknown_key_names_file(tmp_path: Path) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text("lr_recc: 0.1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:1\).*did you mean 'lr_rec'"):
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


# ---------------------------------------------------------------------------------------------- ranges
@pytest.mark.parametrize(
    "override, fragment",
    [
        ("--lr_rec=-1", "lr_rec=-1.0 must be > 0: recommender AdamW learning rate (command line)"),
        ("--finetune_lr=0", "finetune_lr=0.0 must be > 0"),
        ("--sasrec_lr=0", "sasrec_lr=0.0 must be > 0"),
        ("--rq_lr=-0.001", "rq_lr=-0.001 must be > 0"),
        ("--grpo_lr=0", "grpo_lr=0.0 must be > 0"),
        ("--weight_decay=-0.1", "weight_decay=-0.1 must be >= 0"),
        ("--rq_weight_decay=-1", "rq_weight_decay=-1.0 must be >= 0"),
        ("--dropout_rate=1", "dropout_rate=1.0 must be in [0, 1)"),
        ("--sasrec_dropout=-0.1", "sasrec_dropout=-0.1 must be in [0, 1)"),
        ("--dropout_prob=1.5", "dropout_prob=1.5 must be in [0, 1)"),
        ("--grpo_clip_range=1", "grpo_clip_range=1.0 must be in (0, 1)"),
        ("--batch_size=0", "batch_size=0 must be >= 1"),
        ("--rq_batch_size=0", "rq_batch_size=0 must be >= 1"),
        ("--d_model=0", "d_model=0 must be >= 1"),
        ("--seed=-1", "seed=-1 must be >= 0"),
        ("--min_interactions=2", "min_interactions=2 must be >= 3"),
        ("--grpo_group_size=1", "grpo_group_size=1 must be >= 2"),
        ("--layers=512,0", "layers=[512, 0] must be >= 1 (every entry)"),
        ("--sk_epsilons=0,0,-0.1", "sk_epsilons=[0.0, 0.0, -0.1] must be >= 0 (every entry)"),
    ],
)
def test_out_of_range_values_name_key_range_and_source(override: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert fragment in str(err.value) and str(err.value).endswith("(command line)")
    assert err.value.key == override[2:].partition("=")[0]


def test_range_boundaries_and_device_indices_are_accepted() -> None:
    cfg = load_config(None, ["--weight_decay=0", "--dropout_rate=0", "--seed=0", "--warmup_steps=0",
                             "--grpo_group_size=2", "--min_interactions=3", "--max_bad_line_share=0",
                             "--rq_device=cuda:1", "--text_device=cpu"])
    assert cfg.train.weight_decay == 0.0 and cfg.data.min_interactions == 3 and cfg.tokenizer.rq_device == "cuda:1"


def test_every_numeric_key_has_a_range() -> None:
    numeric = {int, float, list[int], list[float]}
    keys = {name for name, (_, f) in LEAVES.items() if f.type in numeric}
    assert keys == set(RANGE_OF), "declare the natural range of every numeric key in etegrec.config.RANGES"
    assert sum(len(k) for k in RANGES.values()) == len(RANGE_OF)  # no key listed under two ranges


def test_range_error_names_the_yaml_line(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("dataset: Foo\ntrain:\n  epochs: 3\n  lr_rec: -0.5\n")
    with pytest.raises(ConfigError, match=r"lr_rec=-0.5 must be > 0: .* \(.*c\.yaml:4\)$"):
        load_config(p)


def test_validate_catches_values_set_after_loading() -> None:
    cfg = load_config()
    cfg.train.lr_id = -1.0
    with pytest.raises(ConfigError, match=r"^lr_id=-1.0 must be > 0: tokenizer AdamW learning rate$"):
        cfg.validate()


# ------------------------------------------------------------------------------------------------ YAML
def test_empty_yaml_is_an_error_naming_the_file(tmp_path: Path) -> None:
    p = tmp_path / "empty.yaml"
    p.write_text("# only a comment\n")
    with pytest.raises(ConfigError, match=rf"config file {p} is empty \(no keys\); give at least one key"):
        load_config(p)


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("dataset: Foo\nlr_rec: 0.1\nepochs: 3\nlr_rec: 0.2\n", ":4: key 'lr_rec' is given twice (first on line 2)"),
        ("train:\n  lr_rec: 0.1\n  lr_rec: 0.2\n", ":3: key 'lr_rec' is given twice (first on line 2)"),
        ("train:\n  epochs: 1\ndata:\n  dataset: X\ntrain:\n  epochs: 2\n", ":5: key 'train' is given twice"),
        ("lr_rec: 0.1\ntrain:\n  lr_rec: 0.2\n", ": key 'lr_rec' is given twice (lines 1 and 3)"),
    ],
)
def test_duplicate_yaml_key_names_file_key_and_line(tmp_path: Path, text: str, fragment: str) -> None:
    p = tmp_path / "dup.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(p)
    assert str(err.value).startswith(f"config file {p}") and fragment in str(err.value)


def test_invalid_yaml_is_one_line_with_its_line_number(tmp_path: Path) -> None:
    p = tmp_path / "broken.yaml"
    p.write_text("dataset: Foo\nlr_rec: [0.1\nepochs: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(p)
    assert str(err.value).startswith(f"config file {p}:") and "is not valid YAML" in str(err.value)
    assert "\n" not in str(err.value)


def test_yaml_merge_keys_are_not_duplicates(tmp_path: Path) -> None:
    p = tmp_path / "merge.yaml"
    p.write_text("base: &b {lr_rec: 0.1, epochs: 3}\n")  # an anchor alone is fine; 'base' is not a key
    with pytest.raises(ConfigError, match="unknown config key 'base'"):
        load_config(p)
    p.write_text("train:\n  <<: {lr_rec: 0.1, epochs: 3}\n  epochs: 4\n")
    cfg = load_config(p)
    assert (cfg.train.lr_rec, cfg.train.epochs) == (0.1, 4)


# ----------------------------------------------------------------------------------------------- paths
def test_paths_typed_on_the_command_line_may_be_relative_to_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "vectors.npy").write_bytes(b"")
    (tmp_path / "mine.yaml").write_text("dataset: Mine\n")
    monkeypatch.chdir(tmp_path)
    cfg = load_from_argv(["--config", "mine.yaml", "--collab_emb_path=vectors.npy", "--text_emb_path=other.npy",
                          "--ckpt_dir=vectors.npy"], None)
    assert cfg.data.dataset == "Mine"
    assert cfg.tokenizer.collab_emb_path == str(tmp_path / "vectors.npy")  # exists here: this file
    assert cfg.tokenizer.text_emb_path == "other.npy"  # not here: the config rule applies later
    assert cfg.train.ckpt_dir == "vectors.npy"  # an output folder is always under the repository root
    assert cfg.path(cfg.train.ckpt_dir) == REPO_ROOT / "vectors.npy"
    assert resolve_path("mine.yaml", working_dir_first=True) == tmp_path / "mine.yaml"
    assert resolve_path("mine.yaml") == REPO_ROOT / "mine.yaml"
    assert resolve_path("~/x") == Path.home() / "x"


def test_dataset_input_looks_in_the_dataset_folder_then_the_repository_root(tmp_path: Path) -> None:
    cfg = load_config(None, [f"--data_path={tmp_path}", "--dataset=toy"])
    assert cfg.dataset_input("toy_emb.npy") == tmp_path / "toy" / "toy_emb.npy"
    assert cfg.dataset_input("config/ml-100k.yaml") == REPO_ROOT / "config" / "ml-100k.yaml"
    assert cfg.dataset_input("/abs/v.npy") == Path("/abs/v.npy")
    (tmp_path / "toy" / "config").mkdir(parents=True)
    (tmp_path / "toy" / "config" / "ml-100k.yaml.gz").touch()  # the dataset folder wins, compressed or not
    assert cfg.dataset_input("config/ml-100k.yaml") == tmp_path / "toy" / "config" / "ml-100k.yaml"


def test_given_values_are_only_what_the_user_set(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("epochs: 7\n")
    assert given_values(["--config", str(p), "--lr_rec=0.5"]) == {"epochs": 7, "lr_rec": 0.5}
    assert given_values([]) == {}


def test_bf16_takes_auto_or_a_boolean() -> None:
    assert load_config().train.bf16 == "false"  # measured: bf16 NaN twice on an H200, no faster than TF32
    assert load_config(None, ["--bf16=true"]).train.bf16 == "true"  # YAML reads true as a boolean
    assert config_from_dict({"bf16": False}).train.bf16 == "false"  # checkpoints written when bf16 was a bool
    with pytest.raises(ConfigError, match="bf16='maybe'; use one of: auto, true, false"):
        load_config(None, ["--bf16=maybe"])
    with pytest.raises(ConfigError, match="'dataset' .* must be str, got True"):  # other keys take no booleans
        load_config(None, ["--dataset=true"])
