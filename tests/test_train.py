"""End-to-end runs in this process: outputs, phases, debug mode, and every bad input."""

import json
import math
import os

import pytest
import torch
from conftest import ROOT, tiny_args, write_idx_mnist

METRIC_KEYS = {"step", "kimg", "Loss/D", "Loss/G", "Logits/real", "Logits/fake", "GradNorm/D", "GradNorm/G",
               "Speed/img_per_s", "Speed/data_wait_fraction"}


def test_tiny_run_writes_every_output(train_main, digits_dir, tmp_path):
    code, out, err = train_main(*tiny_args(digits_dir, "train.max_steps=25", "log.every_steps=10"))
    assert code == 0, err
    run = tmp_path / "runs" / "tiny"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [10, 20, 25]
    assert METRIC_KEYS <= set(records[0])
    assert not any(math.isnan(v) for r in records for v in r.values()), "NaN in metrics"
    provenance = json.loads((run / "run.json").read_text())
    assert provenance["world_size"] == 1 and provenance["versions"]["torch"] == torch.__version__
    assert "total_kimg: 1.0" in (run / "config.yaml").read_text()
    assert (run / "samples" / "final.png").is_file() and len(list((run / "samples").glob("*.png"))) >= 2
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000025"
    assert "samples:" in out and "metrics:" in out


def test_run_json_records_the_package_version(tmp_path):
    """One version source: gan_dist.__version__, which the installed metadata and run.json repeat."""
    from importlib.metadata import version
    from types import SimpleNamespace

    import gan_dist
    from gan_dist.run import RUN_MARKER, write_provenance

    accelerator = SimpleNamespace(num_processes=1, distributed_type="DistributedType.NO", device=torch.device("cpu"))
    write_provenance(tmp_path, accelerator, "no")
    record = json.loads((tmp_path / RUN_MARKER).read_text())
    assert gan_dist.__version__ and record["versions"]["gan_dist"] == gan_dist.__version__
    assert version("gan_dist") == gan_dist.__version__, "reinstall: pip install -e . --no-deps"
    assert 'dynamic = ["version"]' in (ROOT / "pyproject.toml").read_text()


def test_resolved_config_includes_overrides(train_main, digits_dir, tmp_path):
    code, _, err = train_main(*tiny_args(digits_dir, "train.max_steps=2", "optim.discriminator.lr=4e-4"))
    assert code == 0, err
    from gan_dist.config import load_config

    saved = load_config(str(tmp_path / "runs" / "tiny" / "config.yaml"), [])
    assert saved.optim.discriminator.lr == 4e-4 and saved.data.path == str(digits_dir)


@pytest.mark.parametrize("extra", [
    ["loss.name=hinge", "train.n_critic=2", "train.num_micro_batches=2"],
    ["loss.name=wasserstein", "loss.gp_weight=10", "optim.generator.grad_clip_norm=1.0"],
    ["loss.r1_gamma=1", "loss.r1_interval=2", "optim.discriminator.warmup_kimg=0.5"],
    ["model.conditional=true", "loss.name=least_squares"],
    ["train.mixed_precision=bf16", "loss.r1_gamma=0.1", "loss.r1_interval=1"],
    ["log.tensorboard=true"],
    ["data.hflip=true", "data.diffaugment=color,translation,cutout", "loss.r1_gamma=1", "data.num_workers=2"],
])
def test_variants_train_with_finite_losses(train_main, digits_dir, tmp_path, extra):
    code, _, err = train_main(*tiny_args(digits_dir, "train.max_steps=6", "log.every_steps=3", *extra))
    assert code == 0, err
    records = [json.loads(line) for line in (tmp_path / "runs" / "tiny" / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["Loss/D"])) and torch.isfinite(torch.tensor(r["Loss/G"])) for r in records)
    if "loss.gp_weight=10" in extra:
        assert "Loss/D/gp" in records[0]
    if "loss.r1_gamma=1" in extra:
        assert "Loss/D/r1" in records[0]
    if "log.tensorboard=true" in extra:
        assert list((tmp_path / "runs" / "tiny").rglob("events.out.tfevents*"))


def test_code_loss_teaches_g_and_d_the_latent_code(train_main, digits_dir, tmp_path):
    code, _, err = train_main(*tiny_args(digits_dir, "model.num_latent_categories=4", "loss.info_weight=1",
                                         "train.total_kimg=10", "train.max_steps=150", "log.every_steps=50",
                                         "optim.generator.lr=1e-3", "optim.discriminator.lr=1e-3"))
    assert code == 0, err
    records = [json.loads(line) for line in (tmp_path / "runs" / "tiny" / "metrics.jsonl").read_text().splitlines()]
    # ln 4 = 1.39 is the loss of a head that cannot tell the codes apart in G's images.
    # Measured: 0.10 and 0.10 at step 150 (2026-11-29).
    assert records[-1]["Loss/G/info"] < 0.5 * math.log(4) and records[-1]["Loss/D/info"] < 0.5 * math.log(4)
    for r in records:  # D's loss is the adversarial loss plus info_weight (1 here) times the code loss
        assert r["Loss/D"] == pytest.approx(r["Loss/D/adversarial"] + r["Loss/D/info"], abs=1e-5)


def test_dcgan_trains_on_32px_mnist(train_main, tmp_path):
    root = write_idx_mnist(tmp_path / "raw_root", num_train=96)
    from gan_dist.cli import main as cli_main

    assert cli_main(["prepare", "torchvision", "MNIST", "--root", str(root), "--resolution", "32",
                     "--out", str(tmp_path / "mnist32")]) == 0
    code, _, err = train_main("--config", str(ROOT / "configs" / "tiny.yaml"), f"data.path={tmp_path / 'mnist32'}",
                              "model.name=dcgan", "model.width_mult=0.125", "model.d_norm=spectral",
                              "train.max_steps=3")
    assert code == 0, err


def test_mlp_mnist_config_prepares_mnist_from_raw_files(train_main, tmp_path):
    root = write_idx_mnist(tmp_path / "raw_root", num_train=64)
    code, out, err = train_main("--config", str(ROOT / "configs" / "mlp_mnist.yaml"), f"data.root={root}",
                                "train.max_steps=3", "data.num_workers=0")
    assert code == 0, err
    index = json.loads((tmp_path / "data" / "mnist" / "index.json").read_text())
    assert index["count"] == 64 and index["shape"] == [1, 28, 28]
    assert "G 1,486,352 params" in out  # the tutorial's MLP: 100-256-512-1024-784


@pytest.mark.parametrize("extra", [[], ["model.num_latent_categories=4"],
                                   ["loss.name=relativistic", "loss.r1_gamma=1", "loss.r2=true", "loss.r1_interval=1"],
                                   ["train.reuse_fakes=true", "train.n_critic=2"]])
def test_g_phase_leaves_d_gradients_untouched(digits_dir, tmp_path, monkeypatch, extra):
    """D is frozen during the G step: G's loss must not accumulate into D's gradients."""
    from gan_dist import trainer as trainer_mod

    seen = {}
    original = trainer_mod.Trainer.g_phase

    def spy(self, *args):
        before = [None if p.grad is None else p.grad.clone() for p in self.D.parameters()]
        original(self, *args)
        after = [p.grad for p in self.D.parameters()]
        seen["unchanged"] = all(torch.equal(a, b) for a, b in zip(before, after))
        seen["g_grads"] = all(p.grad is not None for p in self.G.parameters())

    monkeypatch.setattr(trainer_mod.Trainer, "g_phase", spy)
    monkeypatch.chdir(tmp_path)
    from gan_dist.train import main

    assert main(tiny_args(digits_dir, "train.max_steps=2", *extra)) == 0
    assert seen == {"unchanged": True, "g_grads": True}


def test_d_phase_trains_the_code_head_and_leaves_g_alone(digits_dir, tmp_path, monkeypatch):
    """The code loss reaches D's code head in the D phase; the fakes are detached from G."""
    from gan_dist import trainer as trainer_mod

    seen = {}
    original = trainer_mod.Trainer.d_phase

    def spy(self, real, labels, **kwargs):
        for p in self.G.parameters():
            p.grad = None
        original(self, real, labels, **kwargs)
        seen["head"] = bool(self.D.code_head.weight.grad.abs().sum() > 0)
        seen["g_untouched"] = all(p.grad is None for p in self.G.parameters())

    monkeypatch.setattr(trainer_mod.Trainer, "d_phase", spy)
    monkeypatch.chdir(tmp_path)
    from gan_dist.train import main

    # The adversarial logits do not use the code head: its gradient can only come from the code loss.
    assert main(tiny_args(digits_dir, "train.max_steps=2", "model.num_latent_categories=4")) == 0
    assert seen == {"head": True, "g_untouched": True}


def test_existing_run_is_not_overwritten_by_default(train_main, digits_dir, tmp_path):
    assert train_main(*tiny_args(digits_dir, "train.max_steps=1"))[0] == 0
    code, _, err = train_main(*tiny_args(digits_dir, "train.max_steps=1", "train.resume=none"))
    assert code == 2 and "already holds a run; choose another run.name, or pass run.overwrite=true" in err
    assert (tmp_path / "runs" / "tiny" / "metrics.jsonl").is_file(), "refusal must not delete anything"
    assert train_main(*tiny_args(digits_dir, "train.max_steps=1", "run.overwrite=true"))[0] == 0


def test_no_config_trains_what_the_quickstart_trains():
    """`python train.py` / `accelerate launch train.py` with no arguments: the quickstart's
    config (shipped in the package; configs/default.yaml links to it), not the bare schema."""
    from gan_dist.config import DEFAULT_CONFIG, load_config, to_dict
    from gan_dist.train import build_parser

    args = build_parser().parse_args([])
    assert args.config == str(DEFAULT_CONFIG) and args.overrides == []
    assert (ROOT / "configs" / "default.yaml").resolve() == DEFAULT_CONFIG
    quickstart = load_config(str(ROOT / "configs" / "default.yaml"), ["run.overwrite=true"])  # launch/quickstart.sh
    literal = load_config(args.config, args.overrides)
    assert {k: v for k, v in to_dict(literal).items() if k != "run"} == \
        {k: v for k, v in to_dict(quickstart).items() if k != "run"}
    assert literal.run.name == quickstart.run.name == "default"
    assert to_dict(literal) != to_dict(load_config(None, [])), "the schema's defaults are another model"


def test_a_finished_run_says_so_in_one_line_and_changes_nothing(train_main, digits_dir, tmp_path):
    assert train_main(*tiny_args(digits_dir))[0] == 0
    run_dir = tmp_path / "runs" / "tiny"
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")}
    code, out, err = train_main(*tiny_args(digits_dir))
    assert code == 0 and err == "", err
    assert out.strip().splitlines() == [("runs/tiny is complete: 1.024 kimg in 32 steps (train.total_kimg=1), final "
                                         "grid runs/tiny/samples/final.png; raise train.total_kimg to train on, or pass "
                                         "run.overwrite=true to train it again")]
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")} == before
    code, out, _ = train_main(*tiny_args(digits_dir, "train.total_kimg=1.5"))  # and it trains on when asked
    assert code == 0 and "resumed from runs/tiny/checkpoints/step_00000032 at step 32" in out


def test_a_run_stopped_at_its_last_step_still_runs_its_end(train_main, digits_dir, tmp_path):
    """The same counters as a finished run, but no finished mark (a stop signal at the last
    step, or a crash in the final evaluation): the rerun resumes and does the end."""
    assert train_main(*tiny_args(digits_dir))[0] == 0
    snapshot = tmp_path / "runs" / "tiny" / "checkpoints" / "step_00000032"
    (snapshot / "finished.json").unlink()
    (tmp_path / "runs" / "tiny" / "samples" / "final.png").unlink()
    code, out, err = train_main(*tiny_args(digits_dir))
    assert code == 0, err
    assert "resumed from" in out and "done: 32 steps" in out and "is complete" not in out
    assert (snapshot / "finished.json").is_file() and (tmp_path / "runs" / "tiny" / "samples" / "final.png").is_file()


def test_gpu_math_settings():
    """cuDNN's autotuner on for CUDA runs (off under --debug, which wants determinism); TF32 as
    train.tf32 says; nothing touched for a CPU run."""
    from gan_dist.parallel.device import configure_gpu_math

    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = (cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32)
    try:
        cudnn.benchmark = cudnn.allow_tf32 = matmul.allow_tf32 = False
        configure_gpu_math("cpu", tf32=True, benchmark=True)
        assert (cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32) == (False, False, False)
        configure_gpu_math("cuda", tf32=False, benchmark=True)
        assert (cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32) == (True, False, False)
        configure_gpu_math("cuda", tf32=True, benchmark=False)  # --debug
        assert (cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32) == (False, True, True)
    finally:
        cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32 = saved


@pytest.mark.parametrize("local_world, env, pinned, expected", [
    (None, {}, 0, 8),  # every allocated core, loader workers not counted (bench/threads.py)
    ("2", {}, 0, 4),  # shared among this node's processes
    ("16", {}, 0, 1),
    (None, {}, 3, 3),  # train.num_threads wins
    (None, {"OMP_NUM_THREADS": "1"}, 0, None),  # the user's or the launcher's: left alone
])
def test_the_thread_rule_uses_the_allocated_cores(monkeypatch, local_world, env, pinned, expected):
    """An allocation of 8 cores (sched_getaffinity) on a node whose os.cpu_count is 64."""
    from gan_dist.parallel import device

    monkeypatch.setattr(device.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setattr(device.os, "cpu_count", lambda: 64)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    if local_world:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local_world)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(5)
        device.configure_threads(pinned, "cpu")
        assert torch.get_num_threads() == (expected or 5)
    finally:
        torch.set_num_threads(saved)


def test_train_device_cpu_trains_on_a_gpu_node_whose_cuda_is_broken(train_main, digits_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")  # allocated, but this machine's torch sees no GPU
    code, _, err = train_main(*tiny_args(digits_dir, "train.device=cpu", "train.max_steps=2"))
    assert code == 0, err
    assert json.loads((tmp_path / "runs" / "tiny" / "run.json").read_text())["device"] == "cpu"


def test_help_lists_options_with_docs(capsys):
    from gan_dist.train import main

    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "train.batch_size (int, default 64)" in out and "Global batch of real images" in out


# ---------------------------------------------------------------- debug mode
def test_debug_mode_runs_short_and_prints_shapes(train_main, digits_dir, tmp_path):
    code, out, err = train_main("--debug", *tiny_args(digits_dir))
    assert code == 0, err
    records = (tmp_path / "runs" / "tiny-debug" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(records[-1])["step"] == 20
    assert "Linear(in_features=16" in out and "G 19,680 params" in out


def test_debug_refuses_multiple_processes(train_main, digits_dir, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, _, err = train_main("--debug", *tiny_args(digits_dir))
    assert code == 2
    assert "--debug runs one process, but the launcher started WORLD_SIZE=2" in err
    assert "Traceback" in err  # --debug shows where it came from


def test_debug_raises_at_first_non_finite_loss(train_main, digits_dir):
    from gan_dist.trainer import NonFiniteLossError

    with pytest.raises(NonFiniteLossError, match=r"non-finite D loss \(nan\) at step 3"):
        train_main("--debug", *tiny_args(digits_dir, "plugins=[nan_plugin]", "model.name=nan_mlp"))


@pytest.mark.parametrize("reuse, forwards_per_step", [(False, 3), (True, 2)])
def test_reused_fakes_are_the_last_d_steps_and_save_a_g_forward(digits_dir, tmp_path, monkeypatch, reuse,
                                                                forwards_per_step):
    """n_critic 2: two D steps' fakes and one G step's, or the G step reusing the second D
    step's (graph kept, D's gradient not reaching G in the D step)."""
    from gan_dist import trainer as trainer_mod

    seen = {"forwards": 0, "g_untouched": [], "kept": []}
    d_phase, g_phase = trainer_mod.Trainer.d_phase, trainer_mod.Trainer.g_phase

    def count(*_):
        seen["forwards"] += 1

    def d_spy(self, real, labels, **kwargs):
        if not hasattr(self.G_raw, "_counted"):
            self.G_raw._counted = self.G_raw.register_forward_hook(count)
        for p in self.G.parameters():
            p.grad = None
        d_phase(self, real, labels, **kwargs)
        seen["g_untouched"].append(all(p.grad is None for p in self.G.parameters()))

    def g_spy(self, *args):
        kept = self.kept_fakes
        seen["kept"].append(kept is not None and kept[0].requires_grad and kept[0].shape[0] == self.batch_per_device)
        g_phase(self, *args)
        assert self.kept_fakes is None  # used once

    monkeypatch.setattr(trainer_mod.Trainer, "d_phase", d_spy)
    monkeypatch.setattr(trainer_mod.Trainer, "g_phase", g_spy)
    monkeypatch.chdir(tmp_path)
    from gan_dist.train import main

    assert main(tiny_args(digits_dir, "train.max_steps=3", "train.n_critic=2", f"train.reuse_fakes={reuse}")) == 0
    assert seen == {"forwards": 3 * forwards_per_step, "g_untouched": [True] * 6, "kept": [reuse] * 3}


# ---------------------------------------------------------------- bad input: exit 2, one line
BAD_INPUTS = [
    (["data.path=does/not/exist"], {}, "data.path=does/not/exist does not exist; write the dataset there with gan-dist prepare"),
    (["data.path=", "data.dataset="], {}, "data.path is empty and data.dataset='' is not built in"),
    (["data.path=", "data.dataset=celeba"], {}, "data.dataset='celeba' is not built in"),
    (["model.name=dcgan"], {}, "model.name=dcgan needs images of C x H x W whose shorter side is 16, 32, 64 px"),
    (["model.name=mpl"], {}, "unknown model 'mpl'; did you mean 'mlp'?"),
    (["loss.name=hinje"], {}, "unknown loss 'hinje'; did you mean 'hinge'?"),
    (["model.latent_dim=0"], {}, "config key 'model.latent_dim' must be > 0"),
    (["model.latent_dim=-3"], {}, "config key 'model.latent_dim' must be > 0"),
    (["model.num_latent_categories=17"], {}, "'model.num_latent_categories' must be 0 (off) or 2 to model.latent_dim (16)"),
    (["model.num_latent_categories=1"], {}, "'model.num_latent_categories' must be 0 (off) or 2 to model.latent_dim"),
    (["loss.info_weight=-1"], {}, "config key 'loss.info_weight' must be >= 0"),
    (["train.batch_size=30", "train.num_micro_batches=4"], {}, "train.batch_size=30 is not divisible by 1 processes x 4"),
    (["train.totl_kimg=3"], {}, "did you mean 'train.total_kimg'?"),
    (["train.reuse_fakes=true", "train.num_micro_batches=2"], {}, "'train.reuse_fakes' must be false with train.num_micro"),
    (["plugins=[no_such_module]"], {}, "cannot import 'no_such_module'"),
    (["train.mixed_precision=fp16", "train.backend=deepspeed"], {}, "fp16 under train.backend=deepspeed needs a GPU"),
    (["model.sync_bn=true"], {}, "model.sync_bn=true needs GPUs"),
    # SyncBatchNorm has no double backward: refused on a CPU too, before a multi-GPU run would crash.
    (["model.sync_bn=true", "model.d_norm=batch", "loss.r1_gamma=1"], {},
     "model.sync_bn=true with BatchNorm in D (features.1) and loss.r1_gamma=1: SyncBatchNorm has no double backward"),
    (["model.sync_bn=true", "model.d_norm=batch", "loss.gp_weight=10"], {}, "and loss.gp_weight=10: SyncBatchNorm"),
    # A GPU node whose CUDA is broken must not train on its CPUs silently.
    ([], {"CUDA_VISIBLE_DEVICES": "0,1"}, "GPUs are allocated to this process (CUDA_VISIBLE_DEVICES=0,1), but CUDA"),
    ([], {"SLURM_GPUS_ON_NODE": "4"}, "(SLURM_GPUS_ON_NODE=4), but CUDA is unusable"),
    (["train.device=cuda"], {}, "train.device=cuda, but CUDA is unusable here"),
    (["dist.timeout_s=0"], {}, "config key 'dist.timeout_s' must be > 0"),
    (["model.conditional=true", f"data.path={ROOT}/tests/no-index-{{0..1}}.tar"], {},
     "data.path: 2 of 2 shards are missing"),
    ([], {"ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "4"}, "ACCELERATE_GRADIENT_ACCUMULATION_STEPS=4"),
    ([], {"ACCELERATE_MIXED_PRECISION": "fp16"}, "asks for mixed_precision=fp16 but train.mixed_precision=no"),
    ([], {"ACCELERATE_USE_DEEPSPEED": "true"}, "gan_dist's config owns this (train.backend)"),
    ([], {"WORLD_SIZE": "2"}, "WORLD_SIZE=2 is set but RANK/MASTER_ADDR are not"),
]


@pytest.mark.parametrize("overrides, env, message", BAD_INPUTS, ids=[m[:40] for _, _, m in BAD_INPUTS])
def test_bad_input_exits_2_with_one_line(train_main, digits_dir, monkeypatch, overrides, env, message):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    code, _, err = train_main(*tiny_args(digits_dir, *overrides))
    assert code == 2
    assert message in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_launcher_world_size_the_accelerator_does_not_see(train_main, digits_dir, monkeypatch):
    """WORLD_SIZE=2 but no LOCAL_RANK on a CUDA machine: accelerate would run alone, silently."""
    from gan_dist import parallel

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29555")
    monkeypatch.setattr(parallel.device, "cuda_problem", lambda: "")  # as on a GPU node
    code, _, err = train_main(*tiny_args(digits_dir))
    assert code == 2
    assert "the launcher started WORLD_SIZE=2 processes but accelerate sees 1" in err


@pytest.mark.parametrize("bad", [["data.path=missing"], ["model.name=dcgan"], ["loss.name=nope"]])
def test_bad_input_touches_no_run_directory(train_main, digits_dir, tmp_path, bad):
    code, _, _ = train_main(*tiny_args(digits_dir, *bad))
    assert code == 2
    assert not (tmp_path / "runs").exists()
    assert not (tmp_path / "missing").exists(), "an explicit data.path must never be prepared"


@pytest.mark.parametrize("extra", [[], ["model.num_latent_categories=4"]])
def test_snapshot_reproduces_the_final_grid(train_main, digits_dir, tmp_path, extra):
    """The saved G_ema (weights and BatchNorm buffers) is the network that drew final.png."""
    import numpy as np
    from PIL import Image

    from gan_dist.checkpoint import load_generator
    from gan_dist.seeds import derive_seed
    from gan_dist.trainer import FIXED_PURPOSE
    from gan_dist.visual import save_samples

    assert train_main(*tiny_args(digits_dir, "train.max_steps=15", *extra))[0] == 0
    run = tmp_path / "runs" / "tiny"
    G, info = load_generator(run)
    assert info["shape"] == [1, 8, 8] and not G.training
    z = torch.randn(16, 16, generator=torch.Generator().manual_seed(derive_seed(0, 0, FIXED_PURPOSE)))
    with torch.no_grad():
        redrawn = save_samples(G(z), tmp_path / "redrawn.png")
    assert np.array_equal(redrawn, np.asarray(Image.open(run / "samples" / "final.png").convert("RGB")))
    # A model key this version does not know (a newer gan_dist's) is refused, not dropped.
    model_json = next((run / "checkpoints").glob("step_*")) / "model.json"
    written = json.loads(model_json.read_text())
    model_json.write_text(json.dumps({**written, "model": {**written["model"], "num_heads": 2}}))
    from gan_dist.errors import UserError

    with pytest.raises(UserError, match="written by a newer gan_dist .model keys num_heads"):
        load_generator(run)


def test_bf16_logits_are_bf16_and_losses_stay_finite(train_main, digits_dir, tmp_path):
    import bf16_probe

    bf16_probe.D_OUTPUT_DTYPES.clear()
    code, _, err = train_main(*tiny_args(digits_dir, "plugins=[bf16_probe]", "model.name=bf16_probe_mlp",
                                         "train.mixed_precision=bf16", "train.max_steps=50", "train.total_kimg=2",
                                         "log.every_steps=10"))
    assert code == 0, err
    assert len(bf16_probe.D_OUTPUT_DTYPES) == 150 and set(bf16_probe.D_OUTPUT_DTYPES) == {torch.bfloat16}
    records = [json.loads(line) for line in (tmp_path / "runs" / "tiny" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 5
    assert all(math.isfinite(r["Loss/D"]) and math.isfinite(r["Loss/G"]) for r in records)
    assert records[-1]["Skipped/D"] == records[-1]["Skipped/G"] == 0


def test_too_many_non_finite_steps_in_a_row_abort(train_main, digits_dir, tmp_path):
    code, _, err = train_main(*tiny_args(digits_dir, "plugins=[nan_plugin]", "model.name=nan_mlp",
                                         "train.max_skipped_in_row=4", "train.max_steps=30"))
    assert code == 2
    assert "4 D optimizer steps in a row had non-finite gradients" in err and "Traceback" not in err


def test_one_network_failing_alone_still_aborts(train_main, digits_dir, tmp_path):
    """Only D's gradients are NaN (NaN reals from the 3rd batch); G's steps stay finite."""
    code, out, err = train_main(*tiny_args(digits_dir, "plugins=[nan_reals]", "train.max_skipped_in_row=3",
                                           "train.max_steps=30", "log.every_steps=2"))
    assert code == 2
    assert "3 D optimizer steps in a row had non-finite gradients" in err
    assert "optimizer steps skipped for non-finite gradients since the last log line" in out


def test_non_finite_steps_are_skipped_and_counted(train_main, digits_dir, tmp_path):
    code, _, err = train_main(*tiny_args(digits_dir, "plugins=[nan_plugin]", "model.name=nan_mlp",
                                         "train.max_skipped_in_row=1000", "train.max_steps=10", "log.every_steps=10"))
    assert code == 0, err
    record = json.loads((tmp_path / "runs" / "tiny" / "metrics.jsonl").read_text().splitlines()[-1])
    # D returns NaN from its 7th call: step 3's D phase (calls 7-8) and G phase (call 9) onwards.
    assert record["Skipped/D"] == 8 and record["Skipped/G"] == 8


def test_a_hung_step_dumps_the_stacks_and_exits(digits_dir, tmp_path):
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests" / "helpers")}
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), *tiny_args(digits_dir, "plugins=[hang_plugin]",
                             "dist.timeout_s=3", f"run.root={tmp_path}")], env=env, capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode != 0
    assert "[rank 0] no progress for 3 s (step 3; dist.timeout_s)" in result.stderr
    assert "stuck_next_real" in result.stderr
