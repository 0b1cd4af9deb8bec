"""Entry scripts (etegrec/cli.py): --help, one-line errors with exit status 2, resuming with the run's own config."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_data import make_tiny_dataset

from etegrec.cli import run_script, usage
from etegrec.errors import ArtifactError, ConfigError, EtegrecError, PrepError, TrainingError

REPO = Path(__file__).resolve().parent.parent
ENTRY_SCRIPTS = {  # command -> (a key its --help lists with its default, the first words of its docstring)
    "main.py": ("--lr_rec=0.005", "Step 4: joint training"),
    "train_grpo.py": ("--grpo_group_size=4", "Step 5 of the README: GRPO"),
    "RQVAE/main.py": ("--rq_eval_step=10", "Step 3: pretrain the RQ-VAE"),
    "RecBole/prepare_data.py": ("--min_interactions=5", "Step 1, generic"),
    "RecBole/prepare_data_2014.py": ("--max_his_len=50", "Step 1 for the Amazon 2014 dump"),
    "RecBole/prepare_data_2018.py": ("--dedup=True", "Step 1: raw Amazon 2018 reviews"),
    "RecBole/train_sasrec.py": ("--sasrec_lr=0.001", "Step 2.1: train RecBole's SASRec"),
    "RecBole/generate_text_embeddings.py": ("--text_fields=title brand categories description", "Step 2.2"),
    "-m etegrec.config": ("--grpo_reward_type=prefix", "``python -m etegrec.config"),
}


def _run(command: str, *args: str, cwd: Path = REPO, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), *sys.path])}
    argv = command.split() if command.startswith("-m ") else [str(REPO / command)]
    return subprocess.run([sys.executable, *argv, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


@pytest.mark.parametrize("command", [*ENTRY_SCRIPTS, "-m etegrec.bench quality"])
def test_bad_key_is_one_error_line_and_exit_2(command: str) -> None:
    proc = _run(command, "--lr_recc=0.1")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == ["error: unknown config key 'lr_recc' (command line); did you mean 'lr_rec'?"]


@pytest.mark.parametrize("command", ENTRY_SCRIPTS)
def test_help_lists_purpose_overrides_and_keys(command: str) -> None:
    key, purpose = ENTRY_SCRIPTS[command]
    for flag in ("--help", "-h"):
        proc = _run(command, "--dataset=X", flag)
        assert proc.returncode == 0 and proc.stderr == "", proc.stderr
        assert proc.stdout.startswith(purpose)
        assert "--train.lr_rec=0.005" in proc.stdout  # how overrides work
        assert f"\n  {key}  (" in proc.stdout


def test_help_shows_type_range_choices_and_meaning() -> None:
    text = usage("Purpose.", ["train", "tokenizer"], "config/ml-100k.yaml")
    assert "  --lr_rec=0.005  (float > 0)\n      recommender AdamW learning rate" in text
    assert "  --ablation=none  (str: none | no_sia | no_psa | no_align | no_alt | no_ete)" in text
    assert "  --rq_device=auto  (str: auto | cpu | cuda | cuda:N)" in text
    assert "  --num_emb_list=256 256 256  (list[int] >= 1)" in text
    assert "reads config/ml-100k.yaml" in text and "[data]" not in text


def test_benchmark_help_is_its_own_and_mentions_overrides() -> None:
    proc = _run("-m etegrec.bench", "--help")
    assert proc.returncode == 0 and "{quality,gpu,speed}" in proc.stdout and "--train.lr_rec=0.005" in proc.stdout


@pytest.mark.parametrize(
    "error, status",
    [(ConfigError("c"), 2), (ArtifactError("a"), 2), (PrepError("p"), 2), (TrainingError("t"), 2)],
)
def test_every_error_kind_is_one_line_and_exit_2(capsys, error: EtegrecError, status: int) -> None:
    def main(argv: list[str]) -> None:
        raise type(error)(f"{error} spans\ntwo lines")

    with pytest.raises(SystemExit) as exit_info:
        run_script(main, "doc", ("data",), argv=["--x=1"])
    assert exit_info.value.code == status
    assert capsys.readouterr().err == f"error: {error} spans two lines\n"


def test_error_kinds_share_one_base_and_keep_their_builtin_kinds() -> None:
    for kind, builtin in ((ConfigError, ValueError), (ArtifactError, RuntimeError), (PrepError, ValueError),
                          (TrainingError, RuntimeError)):
        assert issubclass(kind, EtegrecError) and issubclass(kind, builtin)
    assert ConfigError("bad", "lr_rec").key == "lr_rec"


def test_a_bug_keeps_its_traceback() -> None:
    def main(argv: list[str]) -> None:
        raise KeyError("bug")

    with pytest.raises(KeyError):
        run_script(main, "doc", ("data",), argv=[])


def test_out_of_range_value_fails_before_any_folder_exists(tmp_path: Path) -> None:
    proc = _run("main.py", "--lr_rec=-1", f"--ckpt_dir={tmp_path / 'ckpt'}", f"--log_dir={tmp_path / 'logs'}",
                f"--data_path={tmp_path / 'data'}")
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == ["error: lr_rec=-1.0 must be > 0: recommender AdamW learning rate (command line)"]
    assert list(tmp_path.iterdir()) == []


def test_empty_and_duplicated_yaml_through_a_script(tmp_path: Path) -> None:
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    proc = _run("RecBole/train_sasrec.py", "--config", str(empty))
    assert proc.returncode == 2 and proc.stderr.startswith(f"error: config file {empty} is empty")
    dup = tmp_path / "dup.yaml"
    dup.write_text("dataset: A\nsasrec_lr: 0.1\nsasrec_lr: 0.2\n")
    proc = _run("RecBole/train_sasrec.py", "--config", str(dup))
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        f"error: config file {dup}:3: key 'sasrec_lr' is given twice (first on line 2); keep one"]


def test_missing_resume_checkpoint_is_one_line(tmp_path: Path) -> None:
    proc = _run("main.py", f"--resume={tmp_path / 'run' / 'last.pt'}")
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        f"error: joint checkpoint {tmp_path / 'run' / 'last.pt'} does not exist; it is made by step 4: `bash run.sh`."]


def test_resume_alone_continues_the_run_with_its_own_config(tmp_path: Path) -> None:
    from etegrec.rec import trainer
    from etegrec.runtime import make_accelerator

    cfg = make_tiny_dataset(tmp_path, epochs=2, finetune_epochs=0)
    first = trainer.run(cfg, make_accelerator())
    run_dir = Path(first["run_dir"])
    # Relative to the working directory, with a value that differs from the run's: ignored with a warning.
    proc = _run("main.py", f"--resume={run_dir.name}/last.pt", "--epochs=7", cwd=run_dir.parent, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "building missing artifact" not in out  # the default config's steps 1-3 are not built
    assert f"resumed from {run_dir / 'last.pt'}: stage done" in out
    assert "values are ignored: {'epochs': 7}" in out
    assert f"test recall@1={first['test']['recall@1']:.4f}" in out  # the run's own model and data
    assert sorted(p.name for p in run_dir.parent.iterdir()) == [run_dir.name]  # no new run folder

    grpo_like = torch.load(run_dir / "last.pt", weights_only=True)
    grpo_like.update(phase="grpo", optimizers={"grpo": {}})
    torch.save(grpo_like, tmp_path / "grpo_like.pt")
    proc = _run("main.py", f"--resume={tmp_path / 'grpo_like.pt'}", timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {tmp_path / 'grpo_like.pt'} is a GRPO checkpoint")
