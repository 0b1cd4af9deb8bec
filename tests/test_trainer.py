"""Joint training end to end on the tiny synthetic dataset (etegrec/rec/trainer.py, checkpoint.py, main.py)."""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tiny_data import make_tiny_dataset

from etegrec.config import dump_yaml
from etegrec.errors import ArtifactError, ConfigError, TrainingError
from etegrec.rec import trainer
from etegrec.rec.checkpoint import build_recommender, load_joint
from etegrec.runtime import make_accelerator, set_seed

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def accelerator():
    return make_accelerator()


def _initial_recommender(cfg, tokenizer_args):
    set_seed(cfg.train.seed)  # the trainer seeds like this right before building the recommender
    return build_recommender(cfg, tokenizer_args)


@pytest.mark.parametrize("ablation", ["none", "no_sia", "no_psa", "no_align", "no_alt", "no_ete"])
def test_two_epoch_smoke_run_of_every_ablation(tmp_path, accelerator, ablation) -> None:
    cfg = make_tiny_dataset(tmp_path, ablation=ablation, epochs=2, finetune_epochs=0)
    result = trainer.run(cfg, accelerator)

    assert set(result["test"]) == set(cfg.train.metrics)
    assert all(0.0 <= v <= 1.0 and math.isfinite(v) for v in result["test"].values())
    state = load_joint(Path(result["run_dir"]) / "last.pt")
    assert state.raw["trainer"]["epochs_done"] == 2
    assert all(math.isfinite(v) for v in state.raw["metrics"].values())

    init = _initial_recommender(cfg, state.tokenizer.model_args()).state_dict()
    # The adapters exist only for SIA (enc_adapter -> z_E) and PSA (dec_adapter -> h_D).
    unused = {
        "no_sia": ("enc_adapter",),
        "no_psa": ("dec_adapter",),
        "no_align": ("enc_adapter", "dec_adapter"),
        "no_ete": ("enc_adapter", "dec_adapter"),
    }.get(ablation, ())
    for name, value in state.model.state_dict().items():
        if name.startswith(unused):
            assert torch.equal(value, init[name]), f"{name} has no loss term but changed"
        else:
            assert not torch.equal(value, init[name]), f"recommender parameter {name} did not change"

    pretrained = torch.load(cfg.tokenizer.rqvae_path, weights_only=True)
    tok_changed = [not torch.equal(v, pretrained["state_dict"][k]) for k, v in state.tokenizer.state_dict().items()]
    if ablation == "no_ete":
        assert not any(tok_changed)
        assert torch.equal(state.item_codes.stored(), pretrained["item_codes"])
    else:
        assert all(tok_changed)


def test_gradient_accumulation_steps_once_per_group(tmp_path, accelerator) -> None:
    cfg = make_tiny_dataset(tmp_path, epochs=2, finetune_epochs=0, gradient_accumulation_steps=3)
    result = trainer.run(cfg, accelerator)
    n_records = len((Path(cfg.data.data_path) / "tiny" / "tiny.train.jsonl").read_text().splitlines())
    batches = math.ceil(n_records / cfg.train.batch_size)  # per epoch (one process, no token budget)
    last = torch.load(Path(result["run_dir"]) / "last.pt", weights_only=True)
    # One optimizer step per 3 batches (the last group of an epoch may be shorter), two epochs.
    assert last["trainer"]["global_step"] == 2 * math.ceil(batches / 3)
    # The schedules count the same optimizer steps: the rec cosine has run its 1 epoch of ceil(batches / 3) steps.
    assert last["schedulers"]["rec"]["last_epoch"] == math.ceil(batches / 3)


def _interrupt_after(monkeypatch, saves: int) -> None:
    """Make the run stop (like a crash) right after its ``saves``-th ``last.pt``."""
    original = trainer.JointTrainer._save
    count = {"n": 0}

    class Interrupted(Exception):
        pass

    def save(self, name, phase, metrics):
        original(self, name, phase, metrics)
        if name == "last.pt":
            count["n"] += 1
            if count["n"] == saves:
                raise Interrupted

    monkeypatch.setattr(trainer.JointTrainer, "_save", save)
    return Interrupted


@pytest.mark.parametrize("stop_after", [1, 4])  # after a tokenizer epoch; after the switch to finetuning
def test_resume_equals_uninterrupted_run(tmp_path, accelerator, monkeypatch, stop_after) -> None:
    cfg = make_tiny_dataset(tmp_path, epochs=4, finetune_epochs=2, warm_epoch=1)
    full = trainer.run(cfg, accelerator)

    interrupted = _interrupt_after(monkeypatch, stop_after)
    with pytest.raises(interrupted):
        trainer.run(cfg, accelerator)
    monkeypatch.undo()
    run_dirs = sorted(p for p in (Path(cfg.train.ckpt_dir) / cfg.data.dataset).iterdir() if p != Path(full["run_dir"]))
    last = run_dirs[-1] / "last.pt"
    assert torch.load(last, weights_only=True)["trainer"]["epochs_done"] == stop_after
    cfg.train.resume = str(last)
    resumed = trainer.run(cfg, accelerator)

    assert resumed["test"] == full["test"] and resumed["valid"] == full["valid"]
    a = torch.load(Path(full["run_dir"]) / "last.pt", weights_only=True)
    b = torch.load(last, weights_only=True)
    for part in ("model", "tokenizer"):
        for key, value in a[part].items():
            assert torch.equal(value, b[part][key]), f"{part}.{key} differs after resume"
    assert torch.equal(a["item_codes"], b["item_codes"])
    assert a["trainer"] == b["trainer"]


def test_a_passed_deadline_stops_at_the_first_epoch_boundary_and_tests_a_validated_model(tmp_path, accelerator) -> None:
    cfg = make_tiny_dataset(tmp_path, epochs=4, eval_step=2, finetune_epochs=2)
    result = trainer.run(cfg, accelerator, deadline=time.time())

    assert result["stopped_by_budget"] and result["epochs"] == 1
    assert result["stage_ends"] == {"alternating": "time budget after 1 epoch"}
    assert result["best_epoch"] == 0  # no validation was due after epoch 0: the stop validated that model
    assert all(0.0 <= v <= 1.0 and math.isfinite(v) for v in result["test"].values())
    last = torch.load(Path(result["run_dir"]) / "last.pt", weights_only=True)
    assert last["trainer"]["stage"] == "alternating" and last["trainer"]["epochs_done"] == 1  # resumable
    far = trainer.run(make_tiny_dataset(tmp_path / "far", epochs=2, finetune_epochs=0), accelerator,
                      deadline=time.time() + 3600)
    assert not far["stopped_by_budget"] and far["epochs"] == 2
    assert far["stage_ends"] == {"alternating": "epoch limit after 2 epochs"}


def test_the_result_says_how_each_stage_ended(tmp_path, accelerator, monkeypatch) -> None:
    # A validation score that never rises: each stage ends by its patience, not by its epoch limit.
    cfg = make_tiny_dataset(tmp_path, epochs=8, eval_step=1, early_stop=2, finetune_epochs=5, finetune_early_stop=1)
    flat = {m: 0.1 for m in cfg.train.metrics}
    monkeypatch.setattr(trainer.JointTrainer, "_evaluate", lambda self, split: dict(flat))
    result = trainer.run(cfg, accelerator)

    assert result["stage_ends"] == {"alternating": "early stop after 3 epochs", "finetune": "early stop after 1 epoch"}
    assert result["epochs"] == 4 and result["best_epoch"] == 0


@pytest.mark.parametrize("history_suffix", [True, False])
def test_checkpoint_rebuilds_the_model_alone(tmp_path, accelerator, history_suffix) -> None:
    cfg = make_tiny_dataset(tmp_path, epochs=2, finetune_epochs=0, history_suffix=history_suffix)
    result = trainer.run(cfg, accelerator)  # trains and evaluates (false: encoder histories without the suffix)
    assert all(0.0 <= v <= 1.0 and math.isfinite(v) for v in result["test"].values())
    raw = torch.load(result["best_checkpoint"], weights_only=True)  # plain tensors and containers only
    assert raw["format"] == "etegrec.joint/1" and raw["phase"] == "recommender"
    state = load_joint(result["best_checkpoint"])
    assert state.cfg.to_dict() == cfg.to_dict()
    assert state.model.history_tokens_per_item == (4 if history_suffix else 3)
    history = state.item_codes.history_table(history_suffix)[[1, 2, 0]].reshape(1, -1)  # items 1, 2 and padding
    target = state.item_codes.table[1:2]  # codes of item 1
    out = state.model(history, target)
    assert out.logits.shape == (1, 4, 8) and torch.isfinite(out.loss_rec)


def test_non_finite_loss_names_step_and_part(tmp_path, accelerator, monkeypatch) -> None:
    cfg = make_tiny_dataset(tmp_path, epochs=2)
    monkeypatch.setattr(trainer, "psa_loss", lambda pref, recon, tau: pref.sum() * float("nan"))
    with pytest.raises(TrainingError, match=r"epoch 0 \(tokenizer phase\), step 0 .*non-finite parts: \['psa'\]"):
        trainer.run(cfg, accelerator)


def test_a_nan_between_loss_reads_is_reported_with_the_step_range_it_fell_in(tmp_path, accelerator, monkeypatch):
    cfg = make_tiny_dataset(tmp_path, epochs=2, sync_every=3)  # as on CUDA: the host reads the losses every 3 steps
    calls = {"n": 0}
    original = trainer.psa_loss

    def psa_nan_at_step_4(pref, recon, tau):
        calls["n"] += 1
        loss = original(pref, recon, tau)
        return loss * float("nan") if calls["n"] == 5 else loss  # the 5th batch: step 4 of epoch 0

    monkeypatch.setattr(trainer, "psa_loss", psa_nan_at_step_4)
    # the NaN update at step 4 spreads NaN to every part by step 5; the message still names where it began
    with pytest.raises(TrainingError, match=r"epoch 0 \(tokenizer phase\), steps 3-5 of the epoch .*"
                                                 r"first non-finite: psa at step 4\."):
        trainer.run(cfg, accelerator)


def test_a_training_epoch_synchronises_with_the_device_only_to_read_the_losses(tmp_path, accelerator, monkeypatch):
    # What a CUDA step would wait for, found on the CPU: every operation that copies a device value to the host
    # (item/bool/tolist) or whose output size depends on the data (unique, nonzero, masked_select).
    import traceback

    from torch.utils._python_dispatch import TorchDispatchMode

    from etegrec.rec.schedule import plan_epoch

    waits = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten._unique2.default",
             "aten.unique_dim.default", "aten.masked_select.default", "aten.unique_consecutive.default"}

    class SyncProbe(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.sites: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if str(func) in waits:
                stack = traceback.extract_stack()[:-1]
                if not any(f.filename.endswith("rec/data.py") or "torch/utils/data" in f.filename for f in stack):
                    ours = [f for f in stack if "site-packages/torch/" not in f.filename][-1]  # batches are built
                    self.sites.append(f"{Path(ours.filename).name}:{ours.lineno} {ours.line} ({func})")  # on the host
            return func(*args, **(kwargs or {}))

    built_for_cuda = trainer.adamw  # the optimisers as built on a CUDA device (fused)
    monkeypatch.setattr(trainer, "adamw", lambda params, lr, wd, device: built_for_cuda(params, lr, wd,
                                                                                          torch.device("cuda")))
    cfg = make_tiny_dataset(tmp_path, epochs=2, warm_epoch=0, sync_every=1000)
    joint = trainer.JointTrainer(cfg, accelerator)
    assert all(opt.defaults["fused"] for opt in (joint.rec_opt, joint.id_opt))
    for epoch in (0, 1):  # a tokenizer and a recommender epoch, every alignment loss on
        plan = plan_epoch(epoch, cycle=2, warm_epoch=0, ablation="none", converged=False, weights=joint.weights)
        probe = SyncProbe()
        with probe:
            joint._train_epoch(plan)  # the one read of the loss sums (tolist) at the epoch's end is not dispatched
        assert len(joint.train_loader) > 3 and probe.sites == [], probe.sites
    with probe:
        float(torch.ones(2).sum())  # the probe does see a host read
    assert len(probe.sites) == 1


def test_bf16_autocast_keeps_fp32_master_weights(tmp_path, accelerator) -> None:
    cfg = make_tiny_dataset(tmp_path, epochs=2, finetune_epochs=0, bf16="true")  # the CUDA default, on the CPU
    result = trainer.run(cfg, accelerator)
    state = torch.load(Path(result["run_dir"]) / "last.pt", weights_only=True)
    assert all(v.dtype == torch.float32 for v in state["model"].values() if v.is_floating_point())
    assert all(0.0 <= v <= 1.0 for v in result["test"].values())


def _compiled_and_eager_runs(tmp_path, accelerator, monkeypatch, backend: str) -> tuple[dict, dict, list[str]]:
    compiled: list[str] = []
    original = torch.nn.Module.compile

    def compile_with(self, *args, **kwargs):
        compiled.append(type(self).__name__)
        return original(self, *args, backend=backend, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "compile", compile_with)
    eager = trainer.run(make_tiny_dataset(tmp_path / "eager", epochs=2, finetune_epochs=0), accelerator)
    fast = trainer.run(make_tiny_dataset(tmp_path / "compiled", epochs=2, finetune_epochs=0, compile=True), accelerator)
    return eager, fast, compiled


def test_compile_switch_trains_the_compiled_recommender_to_the_eager_result(tmp_path, accelerator, monkeypatch):
    # inductor's C++ code generation took minutes per batch shape on the 2-core dev machine, so this test compiles
    # with the aot_eager backend: the same graph capture and compiled autograd, without generated kernels
    eager, fast, compiled = _compiled_and_eager_runs(tmp_path, accelerator, monkeypatch, "aot_eager")
    assert compiled == ["GenerativeRecommender"]
    assert fast["test"] == pytest.approx(eager["test"]) and fast["valid"] == pytest.approx(eager["valid"])
    eager_keys = torch.load(eager["best_checkpoint"], weights_only=True)["model"].keys()
    assert torch.load(fast["best_checkpoint"], weights_only=True)["model"].keys() == eager_keys  # no _orig_mod.


@pytest.mark.slow
def test_compile_switch_with_inductor(tmp_path, accelerator, monkeypatch) -> None:
    import torch._inductor.config

    # inductor draws random numbers (dropout masks) with its own generator unless told to use torch's: with other
    # draws the tiny runs differ by more than the tolerance (2 of 24 test users)
    monkeypatch.setattr(torch._inductor.config, "fallback_random", True)
    eager, fast, compiled = _compiled_and_eager_runs(tmp_path, accelerator, monkeypatch, "inductor")
    assert compiled == ["GenerativeRecommender"] and fast["test"] == pytest.approx(eager["test"], abs=0.05)


def test_fast_path_switches_follow_the_device(monkeypatch) -> None:
    from etegrec.runtime import cuda_tf32

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not trainer.bf16_enabled("auto", cpu) and trainer.bf16_enabled("true", cpu)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert trainer.bf16_enabled("auto", cuda) and not trainer.bf16_enabled("false", cuda)
    params = [torch.nn.Parameter(torch.zeros(2))]
    assert trainer.adamw(params, 1e-3, 0.0, cuda).defaults["fused"]
    assert not trainer.adamw(params, 1e-3, 0.0, cpu).defaults["fused"]
    before = torch.backends.cuda.matmul.allow_tf32
    with cuda_tf32(True):
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    assert torch.backends.cuda.matmul.allow_tf32 == before


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"code_num": 16, "num_emb_list": [16, 16, 16]}, "num_emb_list"),  # codebooks of the checkpoint differ
        ({"tokenizer_input": "collab"}, "in_dim"),  # 16-d input for a tokenizer trained on 24-d
        ({"layers": [32]}, "layers"),
    ],
)
def test_inconsistent_config_fails_at_start_up(tmp_path, accelerator, overrides, message) -> None:
    cfg = make_tiny_dataset(tmp_path)
    for key, value in overrides.items():
        section = "model" if key == "code_num" else "tokenizer"
        setattr(getattr(cfg, section), key, value)
    with pytest.raises(ArtifactError, match=message):
        trainer.run(cfg.validate(), accelerator)


@pytest.mark.parametrize("key, value", [("epochs", 0), ("psa_tau", 0.0), ("rec_code_loss", 0.0), ("id_kl_loss", -1.0)])
def test_out_of_range_training_keys_fail_at_start_up(tmp_path, accelerator, key, value) -> None:
    cfg = make_tiny_dataset(tmp_path)
    setattr(cfg.train, key, value)
    with pytest.raises(ConfigError, match=key):
        trainer.run(cfg, accelerator)


def test_two_process_cpu_run(tmp_path) -> None:
    cfg = make_tiny_dataset(tmp_path, epochs=2, finetune_epochs=1)
    config = tmp_path / "tiny.yaml"
    config.write_text(dump_yaml(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), *sys.path])}
    with socket.socket() as s:  # a free rendezvous port, so parallel runs do not clash on 33211
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.time()
    # The user's launcher file (MULTI_GPU, 2 processes); on a CPU-only machine the processes form a gloo group.
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(REPO / "accelerate_config_ddp.yaml"),
            "--main_process_port",
            str(port),
            str(REPO / "main.py"),
            "--config",
            str(config),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout and "test recall@1=" in proc.stdout
    run_dirs = list((tmp_path / "ckpt" / "tiny").iterdir())
    assert len(run_dirs) == 1  # both processes share one run folder
    last = torch.load(run_dirs[0] / "last.pt", weights_only=True)
    assert last["trainer"]["stage"] == "done" and last["trainer"]["epochs_done"] == 3
    print(f"2-process run: {time.time() - start:.1f} s")


def test_code_refresh_logs_the_level_where_each_id_first_changes(tmp_path, accelerator) -> None:
    cfg = make_tiny_dataset(tmp_path)
    joint = trainer.JointTrainer(cfg, accelerator)
    logged = {}
    joint.tb.scalars = lambda step, values, prefix="": logged.update(values)
    level2 = joint.tokenizer.rq.codebooks[1].weight
    with torch.no_grad():
        level2.copy_(level2.roll(1, dims=0))  # same vectors, every index shifted: level-2 codes change, nothing else
    joint._refresh_codes()
    assert logged["churn_first_level1"] == 0.0 and logged["churn_first_level3"] == 0.0
    assert logged["churn_first_level2"] == logged["prefix_churn"] == 1.0


def test_code_refresh_margin_keeps_ids_the_tokenizer_barely_moved(tmp_path, accelerator) -> None:
    cfg = make_tiny_dataset(tmp_path, code_refresh_margin=1e6)  # margin far above any distance difference
    joint = trainer.JointTrainer(cfg, accelerator)
    logged = {}
    joint.tb.scalars = lambda step, values, prefix="": logged.update(values)
    before = joint.codes.stored()
    level2 = joint.tokenizer.rq.codebooks[1].weight
    with torch.no_grad():
        level2.copy_(level2.roll(1, dims=0))  # with margin 0 every ID changes at level 2 (test above)
    joint._refresh_codes()
    assert logged["churn"] == 0.0 and torch.equal(joint.codes.stored(), before)


def test_code_distance_unit_is_measured_only_where_sia_tau_or_the_margin_uses_it(tmp_path, accelerator) -> None:
    fixed = trainer.JointTrainer(make_tiny_dataset(tmp_path / "a", sia_tau="1", code_refresh_margin=0.0), accelerator)
    assert fixed.code_gap is None  # no catalogue pass at start-up
    fixed._refresh_codes()  # a free refresh needs no unit
    assert fixed.code_gap is None
    levels = len(fixed.cfg.tokenizer.num_emb_list)
    for name, overrides in {"auto": {"sia_tau": "auto", "code_refresh_margin": 0.0},
                            "margin": {"sia_tau": "1", "code_refresh_margin": 1.0}}.items():
        used = trainer.JointTrainer(make_tiny_dataset(tmp_path / name, **overrides), accelerator)
        assert used.code_gap.shape == (levels,) and bool((used.code_gap > 0).all())


def test_warmup_ratio_is_a_share_of_each_optimisers_steps(tmp_path, accelerator) -> None:
    cfg = make_tiny_dataset(tmp_path, epochs=8, warmup_steps=0, warmup_ratio=0.25)
    joint = trainer.JointTrainer(cfg, accelerator)
    steps = joint.steps_per_epoch  # cycle 2: 4 tokenizer and 4 recommender epochs
    assert joint.rec_sched.lr_lambdas[0].warmup_steps == round(0.25 * 4 * steps)
    assert joint.id_sched.lr_lambdas[0].warmup_steps == round(0.25 * 4 * steps)
    assert joint.rec_sched.lr_lambdas[0].total_steps == 4 * steps


def test_tokenizer_epoch_logs_sia_entropies_and_encoder_gradient(tmp_path, accelerator) -> None:
    cfg = make_tiny_dataset(tmp_path, id_kl_loss=1.0, sia_tau="auto")
    joint = trainer.JointTrainer(cfg, accelerator)
    logged = {}
    joint.tb.scalars = lambda step, values, prefix="": logged.update({prefix + k: v for k, v in values.items()})
    plan = joint._plan(converged=False)
    assert plan.phase == "tokenizer" and plan.weights.sia > 0
    joint._train_epoch(plan)
    levels = len(cfg.tokenizer.num_emb_list)
    for side in ("target", "sequence"):
        for level in range(1, levels + 1):
            assert 0.0 <= logged[f"sia/entropy_{side}_l{level}"] <= math.log(cfg.model.code_num) + 1e-6
    assert logged["sia/grad_norm_encoder_sia"] > 0.0 and logged["sia/grad_norm_encoder_total"] > 0.0
    gap = [logged[f"sia/tau_l{level}"] for level in range(1, levels + 1)]  # sia_tau=auto: the measured gaps
    torch.testing.assert_close(torch.tensor(gap), joint.code_gap)


def test_tokenizer_freeze_epoch_keeps_the_ids_of_the_freeze_point_while_the_recommender_trains(
        tmp_path, accelerator, monkeypatch) -> None:
    cfg = make_tiny_dataset(tmp_path, epochs=4, finetune_epochs=0, tokenizer_freeze_epoch=2)
    joint = trainer.JointTrainer(cfg, accelerator)
    seen = []  # (phase, tokenizer weights) after each trained epoch
    train_epoch = joint._train_epoch

    def recording_train_epoch(plan):
        out = train_epoch(plan)
        seen.append((plan.phase, [p.detach().clone() for p in joint.tokenizer.parameters()]))
        return out

    joint._train_epoch = recording_train_epoch
    refreshed = []
    refresh = joint._refresh_codes
    joint._refresh_codes = lambda: (refreshed.append(joint.state.epoch), refresh())
    messages = []
    monkeypatch.setattr(trainer.logger, "info", lambda msg, *args: messages.append(msg % args))
    joint.fit()
    # epoch 0 trains the tokenizer and refreshes; epoch 2 is a skipped slot; epochs 1 and 3 train the recommender
    assert [phase for phase, _ in seen] == ["tokenizer", "recommender", "recommender"]
    assert refreshed == [0]
    assert all(torch.equal(a, b) for a, b in zip(seen[1][1], seen[2][1]))  # tokenizer unchanged after the freeze
    assert sum(m.startswith("tokenizer frozen from epoch 2 ") for m in messages) == 1
    assert joint.state.epochs_done == 4
