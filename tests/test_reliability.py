"""A run survives being killed, checkpoints are never half-used, bad input is refused clearly.
Every run here goes through the real `deepspeed` launcher with CPU ranks."""
import json
import os
import re
import signal
import time

import pytest
import torch

from conftest import launch, read_metrics, read_weights, train_args
from data import LengthGroupedSampler, UserError
from train import Config, check_out_dir

pytestmark = pytest.mark.slow


def wait_for(condition, proc, timeout=240):
    start = time.time()
    while not condition():
        assert proc.poll() is None, "the run ended before the condition held"
        assert time.time() - start < timeout, "timed out"
        time.sleep(0.01)


def last_step(out_dir):
    path = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    lines = open(path).read().splitlines()
    return json.loads(lines[-1])["step"] if lines else 0


@pytest.fixture(scope="module")
def references(demo_dir, tmp_path_factory):
    """reference(stage): an uninterrupted 2-rank run of 8 steps under that ZeRO stage (made once):
    the losses and weights every interrupted run must match."""
    made = {}

    def reference(stage):
        if stage not in made:
            out = tmp_path_factory.mktemp(f"reference_zero{stage}") / "run"
            run = launch(train_args(demo_dir, out, "max_steps=8", "save_every=2", f"zero_stage={stage}"), procs=2)
            assert run.returncode == 0, run.out[-3000:]
            made[stage] = read_metrics(out), read_weights(out / "final")
        return made[stage]
    return reference


@pytest.fixture(scope="module")
def reference(references):
    return references(0)  # the demo's own stage


def assert_same_run(out, reference, tolerance=0.0):
    """Every step logged once (a resumed run drops the lines written after its checkpoint), with
    the reference's losses and final weights: equal, or within `tolerance` (another number of ranks
    adds the same gradients in another order)."""
    losses, weights = reference
    steps = [json.loads(line)["step"] for line in open(out / "metrics.jsonl")]
    assert steps == sorted(losses), steps
    resumed = read_metrics(out)
    assert all(abs(resumed[s] - losses[s]) <= max(tolerance, 1e-6) for s in losses), (resumed, losses)
    final = read_weights(out / "final")
    assert all(torch.allclose(final[k], weights[k], rtol=0, atol=tolerance) for k in weights)


@pytest.mark.parametrize("stage, resume_procs", [(2, 1), (3, 2)])
def test_sigkill_mid_run_then_resume_matches_uninterrupted(demo_dir, tmp_path, references, stage, resume_procs):
    """Killed under ZeRO-2 / ZeRO-3 and resumed; ZeRO-2 on one rank instead of two (same batch_size:
    DeepSpeed's universal checkpoint re-cuts the optimizer state), each record of the epoch still
    trained exactly once."""
    out = tmp_path / "run"
    args = train_args(demo_dir, out, "max_steps=8", "save_every=2", f"zero_stage={stage}", "log_sample_ids=true")
    proc = launch(args, procs=2, wait=False)
    wait_for(lambda: last_step(out) >= 5, proc)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks, no chance to clean up
    proc.wait()
    assert (out / "checkpoints" / "latest").read_text() in ("step00000004", "step00000006")
    run = launch(args + ["resume=true"], procs=resume_procs)
    assert run.returncode == 0, run.out[-3000:]
    assert "resumed from" in run.out and f"{resume_procs} processes x 4 samples" in run.out
    assert_same_run(out, references(stage), tolerance=0.0 if resume_procs == 2 else 1e-5)
    trained = [i for rank in (0, 1) for line in open(out / f"sample_ids_rank{rank}.jsonl")
               for i in json.loads(line)["ids"]]
    assert sorted(trained) == sorted(r["id"] for r in json.load(open(demo_dir / "finetune.json")))


def test_sigkill_during_checkpoint_write_resumes_from_previous(demo_dir, tmp_path, reference):
    out = tmp_path / "run"
    ckpt = out / "checkpoints"
    proc = launch(train_args(demo_dir, out, "max_steps=8", "save_every=2"), procs=2, wait=False)
    # kill as soon as the step-4 checkpoint starts being written
    wait_for(lambda: (ckpt / "step00000004.partial").exists() or (ckpt / "step00000004").exists(), proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    if (ckpt / "step00000004.partial").exists():  # caught mid-write: the pointer still names step 2
        assert (ckpt / "latest").read_text() == "step00000002"
    run = launch(train_args(demo_dir, out, "max_steps=8", "save_every=2", "resume=true"), procs=2)
    assert run.returncode == 0, run.out[-3000:]
    assert not any(p.name.endswith(".partial") for p in ckpt.iterdir())  # the half-written one is gone
    assert_same_run(out, reference)


def test_sigterm_checkpoints_and_says_how_to_resume(demo_dir, tmp_path, reference):
    out = tmp_path / "run"
    proc = launch(train_args(demo_dir, out, "max_steps=8", "save_every=2", "num_workers=1"), procs=2, wait=False)
    wait_for(lambda: last_step(out) >= 3, proc)
    # to every process of the job, as SLURM does before pre-emption (DeepSpeed's single-node
    # `deepspeed` runner does not forward a SIGTERM sent to it alone)
    os.killpg(proc.pid, signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "SIGTERM: saved step" in output and "resume=True" in output
    saved = int((out / "checkpoints" / "latest").read_text()[4:])
    assert saved >= 3  # a checkpoint at the step it stopped, not only the last periodic one
    run = launch(train_args(demo_dir, out, "max_steps=8", "save_every=2", "resume=true", "num_workers=1"), procs=2)
    assert run.returncode == 0, run.out[-3000:]
    assert f"at step {saved}" in run.out
    assert_same_run(out, reference)


def test_keep_checkpoints(demo_dir, tmp_path):
    out = tmp_path / "run"
    run = launch(train_args(demo_dir, out, "max_steps=5", "save_every=1", "keep_checkpoints=2"))
    assert run.returncode == 0, run.out[-3000:]
    assert sorted(os.listdir(out / "checkpoints")) == ["latest", "step00000004", "step00000005"]


def test_nan_loss_stops_naming_the_step(demo_dir, tmp_path):
    out = tmp_path / "run"
    run = launch(train_args(demo_dir, out, "lr_lm=1e30", "lr_connector=1e30", "lr_vision=1e30", "warmup_ratio=0"))
    assert run.returncode != 0
    assert "error: loss is nan at step 2" in run.out or "error: loss is inf at step 2" in run.out, run.out[-2000:]
    assert "Traceback" not in run.out
    assert not (out / "final").exists()


def test_out_dir_of_another_run_is_refused(demo_dir, tmp_path):
    out = tmp_path / "run"
    run = launch(train_args(demo_dir, out, "max_steps=1"))
    assert run.returncode == 0, run.out[-3000:]
    before = (out / "final" / "model.safetensors").stat().st_mtime
    again = launch(train_args(demo_dir, out, "max_steps=1"))
    assert again.returncode == 2
    assert f"error: out_dir {out} already holds a finished run; pass resume=True" in again.out
    assert (out / "final" / "model.safetensors").stat().st_mtime == before  # nothing overwritten
    saved = json.load(open(out / "train_config.json"))
    cfg = Config(**{**saved, "resume": True, "seed": 1})
    with pytest.raises(UserError, match="trained with different seed=0"):
        check_out_dir(cfg)
    assert check_out_dir(Config(out_dir=str(out), overwrite=True)) is None
    with pytest.raises(UserError, match="resume=True but .* holds no run"):
        check_out_dir(Config(out_dir=str(tmp_path / "empty"), resume=True))


@pytest.mark.parametrize("override, message", [
    ("vision_layer=99", "vision_layer=99 is out of range: "),
    ("max_seq_len=16", "max_seq_len=16 leaves no room for text after one image's 16 image tokens"),
    ("data_path=/nowhere/train.json", "/nowhere/train.json"),
    ("image_folder=/nowhere", "/nowhere"),
    ("connector=mlp2x_foo", "unknown connector 'mlp2x_foo'"),
    ("batch_size=6", "batch_size=6 is not a multiple of micro_batch_size (4)"),
    ("precision=bf16", "precision=bf16 needs a GPU"),
])
def test_bad_training_input_fails_before_writing(demo_dir, tmp_path, override, message):
    out = tmp_path / "run"
    run = launch(train_args(demo_dir, out, override))
    assert run.returncode == 2, run.out[-3000:]
    assert message in run.out and "error:" in run.out and "Traceback" not in run.out
    assert not (out / "train_config.json").exists()  # a failed start leaves no run behind


def test_empty_data_set_is_refused(demo_dir, tmp_path):
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    run = launch(train_args(demo_dir, tmp_path / "run", f"data_path={empty}"))
    assert run.returncode == 2, run.out[-3000:]
    assert f"error: {empty} holds no records" in run.out and "Traceback" not in run.out


def test_skip_bad_samples_trains_on_and_reports_them(demo_dir, tmp_path):
    records = json.load(open(demo_dir / "finetune.json"))[:15]
    (demo_dir / "images" / "corrupt.png").write_bytes(b"not a png")  # exists, so start-up checks pass
    records.append({"id": "broken-1", "image": "corrupt.png",
                    "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "x"}]})
    data = tmp_path / "data.json"
    data.write_text(json.dumps(records))
    out = tmp_path / "run"
    strict = launch(train_args(demo_dir, out, f"data_path={data}", "max_steps=2"))
    assert strict.returncode == 2, strict.out[-3000:]
    assert "error: record id='broken-1'" in strict.out and "corrupt.png cannot be read" in strict.out
    assert "Traceback" not in strict.out
    out = tmp_path / "run2"  # the failed run above is an unfinished run in `run`
    run = launch(train_args(demo_dir, out, f"data_path={data}", "max_steps=2", "skip_bad_samples=true"))  # one epoch
    assert run.returncode == 0, run.out[-3000:]
    assert "skipped 1 bad samples" in run.out and "broken-1" in run.out
    assert sum(json.loads(line)["skipped"] for line in open(out / "metrics.jsonl")) == 1


# ----------------------------------------------------------------------------------------------
# Never hang, never destroy, never report success on nothing


def run_processes(out_dir):
    """Processes still running whose command line names out_dir (a run's ranks and their workers)."""
    import subprocess

    found = subprocess.run(["pgrep", "-f", f"out_dir={out_dir}"], capture_output=True, text=True).stdout.split()
    return [pid for pid in found if int(pid) != os.getpid()]


@pytest.mark.parametrize("procs", [1, 2])
def test_bad_record_with_dataloader_workers_ends_every_process(demo_dir, tmp_path, procs):
    """A corrupt image met mid-run with num_workers=2: one error line, and the job ends (it used to
    hang for ever: Python's exit joins worker processes that ignore SIGTERM). With 2 ranks the
    record is in rank 1's first micro-batch only: rank 0 must not wait for rank 1 in the next
    collective; the ranks agree at the end of the step and both stop."""
    records = [r for r in json.load(open(demo_dir / "finetune.json")) if r.get("image")][:16]
    # group_by_length=false: the order is a shuffle by the seed alone, so the test knows rank 1's samples
    rank1 = LengthGroupedSampler([1] * 16, [True] * 16, 8, 4, world_size=2, rank=1, seed=0, group_by_length=False)
    bad = records[next(iter(rank1))] if procs == 2 else records[9]
    (tmp_path / "images").mkdir()
    for r in records:
        (tmp_path / "images" / r["image"]).write_bytes((demo_dir / "images" / r["image"]).read_bytes())
    (tmp_path / "images" / bad["image"]).write_bytes(b"not an image")
    data = tmp_path / "data.json"
    data.write_text(json.dumps(records))
    out = tmp_path / "run"
    start = time.time()
    run = launch(train_args(demo_dir, out, f"data_path={data}", f"image_folder={tmp_path / 'images'}",
                            "num_workers=2", "max_steps=4", "group_by_length=false"), procs=procs, timeout=240)
    assert run.returncode != 0 and f"error: record id={bad['id']!r}" in run.out, run.out[-3000:]
    assert run.out.count("error:") == 1 and "Traceback" not in run.out, run.out[-3000:]
    assert time.time() - start < 120  # not a collective's time-out
    time.sleep(2)
    assert not run_processes(out)


def test_overwrite_never_deletes_a_folder_that_is_not_a_run(demo_dir, tmp_path):
    out = tmp_path / "mine"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "precious.pt").write_text("keep")
    (out / "metrics.jsonl").write_text("keep")
    run = launch(train_args(demo_dir, out, "overwrite=true"))
    assert run.returncode == 2, run.out[-3000:]
    assert f"error: out_dir {out} holds checkpoints, metrics.jsonl but no small-vlm run" in run.out
    assert (out / "checkpoints" / "precious.pt").read_text() == "keep" and (out / "metrics.jsonl").read_text() == "keep"


def test_run_that_trains_on_nothing_fails(demo_dir, tmp_path):
    """skip_bad_samples=True with max_seq_len too short for any sample (16 image tokens + text > 17):
    every sample is skipped; the run must fail, write no final/ and say why."""
    out = tmp_path / "run"
    run = launch(train_args(demo_dir, out, "skip_bad_samples=true", "max_seq_len=17", "max_steps=2"))
    assert run.returncode == 2, run.out[-3000:]
    assert "were bad and skipped, more than 50%" in run.out and "max_seq_len=17" in run.out
    assert not (out / "final").exists()


def test_make_demo_writes_only_into_a_new_or_empty_folder(demo_dir, tmp_path):
    folder = tmp_path / "my_data"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    run = launch(train_args(demo_dir, tmp_path / "run", "make_demo=true", f"data_path={folder}/finetnue.json"))
    assert run.returncode == 2, run.out[-3000:]
    assert f"{folder}/finetnue.json does not exist, and the demo writes its files only into a new or empty" in run.out
    assert sorted(os.listdir(folder)) == ["notes.txt"]


def test_damaged_checkpoints_are_named_and_the_newest_complete_one_offered(demo_dir, tmp_path):
    out = tmp_path / "run"
    run = launch(train_args(demo_dir, out, "max_steps=4", "save_every=2"))
    assert run.returncode == 0, run.out[-3000:]
    ckpt, args = out / "checkpoints", train_args(demo_dir, out, "max_steps=6", "save_every=2", "resume=true")
    cfg, _ = __import__("train").load_config(args)
    (ckpt / "latest").write_text("")
    with pytest.raises(UserError, match="names '', and it is empty; the newest complete checkpoint is step00000004"):
        check_out_dir(cfg)
    (ckpt / "latest").write_text("step00000099")
    with pytest.raises(UserError, match="step00000099 does not exist; the newest complete checkpoint is step00000004"):
        check_out_dir(cfg)
    (ckpt / "latest").write_text("step00000004")
    next((ckpt / "step00000004").glob("*model_states.pt")).unlink()
    with pytest.raises(UserError, match="lacks its model state files; the newest complete checkpoint is step00000002"):
        check_out_dir(cfg)
    resumed = launch(args)  # the same, through train.py: one line, exit 2, nothing overwritten
    assert resumed.returncode == 2 and "error: cannot resume:" in resumed.out and "Traceback" not in resumed.out
    (ckpt / "latest").write_text("step00000002")  # as offered
    resumed = launch(args)
    assert resumed.returncode == 0 and "at step 2" in resumed.out, resumed.out[-3000:]


def test_ctrl_c_finishes_the_step_saves_and_says_how_to_resume(demo_dir, tmp_path, reference):
    out = tmp_path / "run"
    proc = launch(train_args(demo_dir, out, "max_steps=8", "save_every=2", "num_workers=1"), procs=2, wait=False)
    wait_for(lambda: last_step(out) >= 3, proc)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C sends to the terminal's process group
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "SIGINT: saved step" in output and "resume=True" in output, output[-3000:]
    assert not re.search(r'File ".*train\.py"', output)  # (the deepspeed runner prints its own KeyboardInterrupt)
    saved = int((out / "checkpoints" / "latest").read_text()[4:])
    assert saved >= 3
    run = launch(train_args(demo_dir, out, "max_steps=8", "save_every=2", "resume=true", "num_workers=1"), procs=2)
    assert run.returncode == 0, run.out[-3000:]
    assert_same_run(out, reference)
