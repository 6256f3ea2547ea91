"""A run survives being killed, checkpoints are never half-used, bad input is refused clearly.
Kills and stop signals go to real `deepspeed` launcher jobs (2 CPU ranks), as two ranks agreeing on
a bad record does; every other run is train.main in this process (conftest.train_in_process: a
one-rank gloo group, the real Lockstep), so a refusal costs a second, not a launcher's start-up."""
import contextlib
import json
import os
import re
import signal
import time

import pytest
import torch

import run
import train
from conftest import (ROOT, assert_same_run, exit_code, last_step, launch, run_processes, stop_job, train_args,
                      train_in_process, wait_for, write_image, write_json)
from data import LengthGroupedSampler
from run import Config, UserError, check_out_dir

RUN = ("max_steps=8", "save_every=2")  # the interrupted runs and their references: 8 steps, a checkpoint every 2
OTHER_RANKS = 1e-5  # a run resumed on another number of ranks sums the same gradients in another order


def refused(args, capsys):
    """`python train.py ARGS` run in this process (exit_after around train.main): exit code 2 and
    one `error:` line, no traceback. Returns what it printed to stderr."""
    assert exit_code(train.main, args) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "Traceback" not in err, err[-3000:]
    return err


def killed(args, signal_number, condition):
    """A 2-rank launcher job of train.py ARGS, sent signal_number (to every process of the job) once
    condition() holds; returns (its exit code, what it printed) when all its processes have ended."""
    out_dir = next(a for a in args if a.startswith("out_dir="))[len("out_dir="):]
    proc = launch(args, procs=2, wait=False)
    wait_for(condition, proc)
    output = stop_job(proc, signal_number, out_dir)
    return proc.returncode, output


@pytest.mark.slow
def test_sigkill_mid_run_under_zero3_then_resume_on_the_same_ranks_is_the_uninterrupted_run(demo_dir, tmp_path,
                                                                                          reference_run):
    """Killed under ZeRO-3 on 2 ranks (no chance to clean up), resumed on the same 2 ranks: the
    losses and weights of the uninterrupted 2-rank run, to the bit; each record of the epoch trained
    exactly once."""
    out = tmp_path / "run"
    args = train_args(demo_dir, out, *RUN, "zero_stage=3", "log_sample_ids=true")
    killed(args, signal.SIGKILL, lambda: last_step(out) >= 5)
    assert (out / "checkpoints" / "latest").read_text() in ("step00000004", "step00000006")
    resumed = launch(args + ["resume=true"], procs=2)
    assert resumed.returncode == 0, resumed.out[-3000:]
    assert "resumed from" in resumed.out and "2 processes x 4 samples" in resumed.out
    assert_same_run(out, reference_run(*RUN, "zero_stage=3", procs=2))
    assert_each_record_trained_once(out, demo_dir)


@pytest.mark.slow
def test_sigkill_mid_run_under_zero2_then_resume_on_one_rank_through_a_universal_checkpoint(demo_dir, tmp_path,
                                                                                          reference_run):
    """Killed under ZeRO-2 on 2 ranks, resumed on one (same batch_size: DeepSpeed's universal
    checkpoint re-cuts the optimizer state), in this process: the uninterrupted run's losses and
    weights (to OTHER_RANKS), each record of the epoch still trained exactly once."""
    out = tmp_path / "run"
    args = train_args(demo_dir, out, *RUN, "zero_stage=2", "log_sample_ids=true", "keep_checkpoints=4")
    killed(args, signal.SIGKILL, lambda: last_step(out) >= 5)
    tag = (out / "checkpoints" / "latest").read_text()
    assert tag in ("step00000004", "step00000006")
    ctrl_c_while_converting(args + ["resume=true"])
    output = train_in_process(args + ["resume=true"])
    assert f"resumed from {out}/checkpoints/{tag}" in output and "1 processes x 4 samples" in output
    assert (out / "checkpoints" / tag / "universal").is_dir()
    assert_same_run(out, reference_run(*RUN, "zero_stage=2"), tolerance=OTHER_RANKS)
    assert_each_record_trained_once(out, demo_dir)


def ctrl_c_while_converting(args):
    """`python train.py ARGS` (a resume that must convert its checkpoint) gets a terminal's Ctrl-C
    (SIGINT to its whole process group) while DeepSpeed's converter and its worker processes run, all
    held stopped so that none can finish or exit first: the run exits with 130 and every one of them
    ends with it (stopped processes of the old code's converter stayed, orphaned, forever)."""
    import subprocess
    import sys

    import psutil

    resume = subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, start_new_session=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    converter, workers = [], []
    try:
        def started():
            converter[:] = [c for c in psutil.Process(resume.pid).children()
                            if any("ds_to_universal" in part for part in c.cmdline())]
            return converter
        wait_for(started, resume)
        converter[0].suspend()
        while not workers:  # let it run in 10 ms slices until it has started its worker processes
            converter[0].resume()
            time.sleep(0.01)
            converter[0].suspend()
            workers = converter[0].children(recursive=True)
        for worker in workers:
            worker.suspend()
        os.killpg(resume.pid, signal.SIGINT)
        assert resume.wait(timeout=60) == 130, resume.communicate()[0][-3000:]
        assert psutil.wait_procs(converter + workers, timeout=10)[1] == [], "the converter outlived its run"
    finally:
        for process in [resume, *converter, *workers]:
            with contextlib.suppress(ProcessLookupError, psutil.NoSuchProcess):
                process.kill()


def assert_each_record_trained_once(out, demo_dir):
    trained = [i for rank in (0, 1) for line in open(out / f"sample_ids_rank{rank}.jsonl")
               for i in json.loads(line)["ids"]]
    assert sorted(trained) == sorted(r["id"] for r in json.load(open(demo_dir / "finetune.json")))


@pytest.mark.slow
def test_sigkill_during_checkpoint_write_resumes_from_previous(demo_dir, tmp_path, reference_run):
    """Killed on 2 ranks as the step-4 checkpoint starts being written; the resume (in this process,
    one rank) starts from the last complete one, removes the half-written one, and ends as the
    uninterrupted run."""
    out = tmp_path / "run"
    ckpt = out / "checkpoints"
    killed(train_args(demo_dir, out, *RUN), signal.SIGKILL,
           lambda: (ckpt / "step00000004.partial").exists() or (ckpt / "step00000004").exists())
    if (ckpt / "step00000004.partial").exists():  # caught mid-write: the pointer still names step 2
        assert (ckpt / "latest").read_text() == "step00000002"
    train_in_process(train_args(demo_dir, out, *RUN, "resume=true"))
    assert not any(p.name.endswith(".partial") for p in ckpt.iterdir())  # the half-written one is gone
    assert_same_run(out, reference_run(*RUN), tolerance=OTHER_RANKS)


@pytest.mark.slow
def test_sigterm_checkpoints_and_says_how_to_resume(demo_dir, tmp_path, reference_run):
    """SIGTERM to both ranks and their DataLoader workers (DeepSpeed's single-node runner does not
    forward one sent to it alone): the ranks agree, save the step they stopped at and say how to go
    on; `the same command plus resume=True` (here in this process) ends as the uninterrupted run."""
    out = tmp_path / "run"
    args = train_args(demo_dir, out, *RUN, "num_workers=1")
    code, output = killed(args, signal.SIGTERM, lambda: last_step(out) >= 3)
    assert code != 0
    assert "SIGTERM: saved step" in output and "resume=True" in output, output[-3000:]
    saved = int((out / "checkpoints" / "latest").read_text()[4:])
    assert saved >= 3  # a checkpoint at the step it stopped, not only the last periodic one
    assert f"at step {saved}" in train_in_process(args + ["resume=true"])
    assert_same_run(out, reference_run(*RUN), tolerance=OTHER_RANKS)


def test_keep_checkpoints(demo_dir, tmp_path):
    out = tmp_path / "run"
    train_in_process(train_args(demo_dir, out, "max_steps=5", "save_every=1", "keep_checkpoints=2"))
    assert sorted(os.listdir(out / "checkpoints")) == ["latest", "step00000004", "step00000005"]


def test_nan_loss_stops_naming_the_step(demo_dir, tmp_path, capsys):
    """A diverged loss is a failure Lockstep agrees on at the step's end (here on a one-rank group):
    one error line naming the step, no final/."""
    out = tmp_path / "run"
    err = refused(train_args(demo_dir, out, "lr_lm=1e30", "lr_connector=1e30", "lr_vision=1e30", "warmup_ratio=0"),
                  capsys)
    assert "error: loss is nan at step 2" in err or "error: loss is inf at step 2" in err, err[-2000:]
    assert not (out / "final").exists()


def test_out_dir_of_another_run_is_refused(demo_dir, tmp_path, capsys):
    out = tmp_path / "run"
    train_in_process(train_args(demo_dir, out, "max_steps=1"))
    before = (out / "final" / "model.safetensors").stat().st_mtime
    err = refused(train_args(demo_dir, out, "max_steps=1"), capsys)
    assert f"error: out_dir {out} already holds a finished run; pass resume=True" in err
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
def test_bad_training_input_fails_before_writing(demo_dir, tmp_path, capsys, override, message):
    """`python train.py ... KEY=VALUE`, in this process: one error line, exit code 2, no run left."""
    if torch.cuda.is_available() and "GPU" in message:
        pytest.skip("this machine has a GPU")
    out = tmp_path / "run"
    assert message in refused(train_args(demo_dir, out, override), capsys)
    assert not (out / "train_config.json").exists()  # a failed start leaves no run behind


def test_empty_data_set_is_refused(demo_dir, tmp_path, capsys):
    empty = write_json(tmp_path / "empty.json", [])
    assert f"error: {empty} holds no records" in refused(train_args(demo_dir, tmp_path / "run", f"data_path={empty}"),
                                                          capsys)


def test_skip_bad_samples_trains_on_and_reports_them(demo_dir, tmp_path, capsys):
    records = json.load(open(demo_dir / "finetune.json"))[:15]
    (demo_dir / "images" / "corrupt.png").write_bytes(b"not a png")  # exists, so start-up checks pass
    records.append({"id": "broken-1", "image": "corrupt.png",
                    "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "x"}]})
    data = write_json(tmp_path / "data.json", records)
    err = refused(train_args(demo_dir, tmp_path / "run", f"data_path={data}", "max_steps=2"), capsys)
    assert "error: record id='broken-1'" in err and "corrupt.png cannot be read" in err
    out = tmp_path / "run2"  # the failed run above is an unfinished run in `run`
    output = train_in_process(train_args(demo_dir, out, f"data_path={data}", "max_steps=2", "skip_bad_samples=true"))
    assert "skipped 1 bad samples" in output and "broken-1" in output
    assert sum(json.loads(line)["skipped"] for line in open(out / "metrics.jsonl")) == 1


# ----------------------------------------------------------------------------------------------
# Never hang, never destroy, never report success on nothing


def data_with_a_corrupt_image(demo_dir, folder, index_of_bad):
    """16 image records of the demo, their images copied into folder/images, the one at
    index_of_bad (a function of the records) overwritten with bytes that are no image. Returns
    (data path, image folder, the bad record)."""
    records = [r for r in json.load(open(demo_dir / "finetune.json")) if r.get("image")][:16]
    bad = records[index_of_bad(records)]
    (folder / "images").mkdir()
    for r in records:
        (folder / "images" / r["image"]).write_bytes((demo_dir / "images" / r["image"]).read_bytes())
    (folder / "images" / bad["image"]).write_bytes(b"not an image")
    return write_json(folder / "data.json", records), folder / "images", bad


@pytest.mark.slow
def test_bad_record_on_one_rank_with_dataloader_workers_ends_every_process(demo_dir, tmp_path):
    """A corrupt image met mid-run with num_workers=2, in rank 1's first micro-batch only: rank 0
    must not wait for rank 1 in the next collective; the ranks agree at the end of the step, rank 0
    prints one error line, and every process of the job ends (it used to hang for ever: Python's
    exit joins worker processes that ignore SIGTERM)."""
    # group_by_length=false: the order is a shuffle by the seed alone, so the test knows rank 1's samples
    rank1 = LengthGroupedSampler([1] * 16, [True] * 16, 8, 4, world_size=2, rank=1, seed=0, group_by_length=False)
    data, images, bad = data_with_a_corrupt_image(demo_dir, tmp_path, lambda records: next(iter(rank1)))
    out = tmp_path / "run"
    start = time.time()
    job = launch(train_args(demo_dir, out, f"data_path={data}", f"image_folder={images}", "num_workers=2",
                            "max_steps=4", "group_by_length=false"), procs=2, timeout=240)
    assert job.returncode != 0 and f"error: record id={bad['id']!r}" in job.out, job.out[-3000:]
    assert job.out.count("error:") == 1 and "Traceback" not in job.out, job.out[-3000:]
    assert time.time() - start < 120  # not a collective's time-out
    time.sleep(2)
    assert not run_processes(out)


def test_bad_record_met_mid_run_by_a_dataloader_worker_is_one_error_line(demo_dir, tmp_path, capsys):
    """The one-rank case (the rank that meets the record prints it), in this process: the worker
    marks the record, the rank fails at its step's end with one error line."""
    data, images, bad = data_with_a_corrupt_image(demo_dir, tmp_path, lambda records: 9)
    err = refused(train_args(demo_dir, tmp_path / "run", f"data_path={data}", f"image_folder={images}",
                             "num_workers=2", "max_steps=4", "group_by_length=false"), capsys)
    assert f"error: record id={bad['id']!r}" in err


def test_overwrite_never_deletes_a_folder_that_is_not_a_run(demo_dir, tmp_path, capsys):
    out = tmp_path / "mine"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "precious.pt").write_text("keep")
    (out / "metrics.jsonl").write_text("keep")
    err = refused(train_args(demo_dir, out, "overwrite=true"), capsys)
    assert f"error: out_dir {out} holds checkpoints, metrics.jsonl but no small-vlm run" in err
    assert (out / "checkpoints" / "precious.pt").read_text() == "keep" and (out / "metrics.jsonl").read_text() == "keep"


def test_run_that_trains_on_nothing_fails(demo_dir, tmp_path, capsys):
    """skip_bad_samples=True with max_seq_len too short for any sample (16 image tokens + text > 17):
    every sample is skipped; the run must fail, write no final/ and say why."""
    out = tmp_path / "run"
    err = refused(train_args(demo_dir, out, "skip_bad_samples=true", "max_seq_len=17", "max_steps=2"), capsys)
    assert "were bad and skipped, more than 50%" in err and "max_seq_len=17" in err
    assert not (out / "final").exists()


def test_make_demo_writes_only_into_a_new_or_empty_folder(demo_dir, tmp_path, capsys):
    folder = tmp_path / "my_data"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    err = refused(train_args(demo_dir, tmp_path / "run", "make_demo=true", f"data_path={folder}/finetnue.json"), capsys)
    assert f"{folder}/finetnue.json does not exist, and {folder} holds notes.txt, and the demo writes its files" in err
    assert "only into a new or empty folder; check the path for a typo" in err
    assert sorted(os.listdir(folder)) == ["notes.txt"]


def test_damaged_checkpoints_are_named_and_the_newest_complete_one_offered(demo_dir, tmp_path, capsys):
    out = tmp_path / "run"
    train_in_process(train_args(demo_dir, out, "max_steps=4", "save_every=2"))
    ckpt, args = out / "checkpoints", train_args(demo_dir, out, "max_steps=6", "save_every=2", "resume=true")
    cfg, _ = run.load_config(args)
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
    assert "error: cannot resume:" in refused(args, capsys)  # the same, through train.py: nothing overwritten
    (ckpt / "latest").write_text("step00000002")  # as offered
    assert "at step 2" in train_in_process(args)


@pytest.mark.slow
def test_ctrl_c_finishes_the_step_saves_and_says_how_to_resume(demo_dir, tmp_path, reference_run):
    """SIGINT, what Ctrl-C sends to the terminal's process group, to both ranks and their workers:
    the step ends, is saved, no traceback of train.py; the resume (in this process) ends as the
    uninterrupted run."""
    out = tmp_path / "run"
    args = train_args(demo_dir, out, *RUN, "num_workers=1")
    code, output = killed(args, signal.SIGINT, lambda: last_step(out) >= 3)
    assert code != 0
    assert "SIGINT: saved step" in output and "resume=True" in output, output[-3000:]
    assert not re.search(r'File ".*train\.py"', output)  # (the deepspeed runner prints its own KeyboardInterrupt)
    saved = int((out / "checkpoints" / "latest").read_text()[4:])
    assert saved >= 3
    assert f"at step {saved}" in train_in_process(args + ["resume=true"])
    assert_same_run(out, reference_run(*RUN), tolerance=OTHER_RANKS)


# ----------------------------------------------------------------------------------------------
# The third sweep (issue 24): one test per cause


def saved_model(tiny_vlm, folder):
    """The tiny model and its processor saved in FOLDER (a final/ as train.py writes it)."""
    from data import chat_template_for

    model, processor = tiny_vlm
    processor.chat_template = chat_template_for("plain", processor.tokenizer)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_damaged_or_unwritable_files_are_one_error_line(tiny_vlm, tmp_path, capsys):
    """Cause 1: what a library raises on a damaged file, or on a full disk, names the file."""
    import eval as evaluation
    import push
    from data import iter_jsonl

    config = tmp_path / "latin1.py"
    config.write_bytes("out_dir = 'caf\u00e9'\n".encode("latin-1"))
    with pytest.raises(UserError, match="latin1.py' cannot be read .*save it as UTF-8"):
        run.load_config([str(config)])
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "latest").write_text("step00000002")
    (out / "train_config.json").write_text('{"vision_model": "x", "ll')  # cut short by a full disk
    with pytest.raises(UserError, match=r"cannot read .*train_config.json .*overwrite=True"):
        check_out_dir(Config(out_dir=str(out), resume=True))
    deep = "[" * 100_000 + "]" * 100_000  # json recurses once per level
    with pytest.raises(ValueError, match="x.jsonl, line 1: malformed JSON"):
        list(iter_jsonl(deep, "x.jsonl"))
    (tmp_path / "q.jsonl").write_text(deep + "\n")
    with pytest.raises(UserError, match="q.jsonl line 1: not valid JSON"):
        evaluation.load_questions(str(tmp_path / "q.jsonl"))

    final = saved_model(tiny_vlm, tmp_path / "final")
    weights = (final / "model.safetensors").read_bytes()
    (final / "model.safetensors").write_bytes((2**40).to_bytes(8, "little") + weights[8:])  # header size > file
    with pytest.raises(UserError, match=r"cannot read .*model.safetensors \(SafetensorError: .*header too large.*copy or "
                                        "save the checkpoint again"):
        push.resolve_checkpoint(str(final))
    with pytest.raises(UserError, match="cannot read .*final/model.safetensors .*header too large.*save the checkpoint "
                                        "again"):
        evaluation.load_model(str(final))
    (final / "model.safetensors").write_bytes(weights[:len(weights) // 2])
    with pytest.raises(UserError, match="cannot read .*final/model.safetensors .*copy or save the checkpoint again"):
        evaluation.load_model(str(final))

    # a full disk while eval writes its answers: answers.jsonl is a link to /dev/full
    saved_model(tiny_vlm, tmp_path / "good")
    write_image(tmp_path / "red.png")
    write_json(tmp_path / "bench.jsonl", [{"id": "1", "image": "red.png", "question": "Q?", "answer": "red"}])
    out = tmp_path / "answers"
    out.mkdir()
    os.symlink("/dev/full", out / "answers.jsonl")
    code = exit_code(evaluation.main, [str(tmp_path / "good"), "--data", str(tmp_path / "bench.jsonl"), "--out",
                                       str(out), "--max_new_tokens", "1"])
    assert code == 2
    assert re.search(r"error: cannot write .*answers.jsonl \(the disk is full; \d+ MiB free\)", capsys.readouterr().err)


HANG_SCRIPT = """
import sys, torch
sys.path.insert(0, {root!r})
import run

class Failing(torch.utils.data.Dataset):
    def __len__(self):
        return 64
    def __getitem__(self, i):
        raise MemoryError("an allocation failure in a worker: no bad record")

def main():
    loader = torch.utils.data.DataLoader(Failing(), num_workers=2, worker_init_fn=run.ignore_stop_signals)
    for _ in loader:
        pass

run.exit_after(main, hard=True)
"""


def test_an_error_in_a_dataloader_worker_ends_the_rank(tmp_path):
    """Cause 2: a worker's error that is no bad record (an allocation failure, a template error)
    reaches the rank as an exception; the rank prints it and ends, instead of waiting for ever on
    workers that ignore SIGTERM."""
    import subprocess
    import sys

    script = tmp_path / "hang.py"
    script.write_text(HANG_SCRIPT.format(root=ROOT))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "MemoryError: an allocation failure" in done.stderr, done.stderr[-2000:]


def llm_with_template(tiny_backbones, folder, template):
    """A copy of the tiny LLM whose tokenizer has chat template TEMPLATE (None: no template)."""
    import shutil

    shutil.copytree(tiny_backbones[1], folder)
    if template is None:
        os.remove(folder / "chat_template.jinja")
    else:
        (folder / "chat_template.jinja").write_text(template)
    return str(folder)


def test_a_chat_template_that_cannot_render_fails_at_start_up(tiny_backbones, tmp_path):
    """Causes 2 and 6: template=chat is rendered once on a probe conversation before anything
    starts; a template that rejects one record makes that record a bad record (skipped or named),
    not an exception in a DataLoader worker."""
    from data import VLMDataset, check_chat_template
    from model import build_processor, build_vlm
    from prepare import CHATML_TEMPLATE

    def check_template(llm):
        check_chat_template(build_processor(tiny_backbones[0], llm), llm)

    broken = llm_with_template(tiny_backbones, tmp_path / "broken", "{% for m in messages %}{{ m['content'] }")
    with pytest.raises(UserError, match=r"template=chat: the chat template of llm=.*broken.* fails on a probe"):
        check_template(broken)
    none = llm_with_template(tiny_backbones, tmp_path / "none", None)
    with pytest.raises(UserError, match="template='chat' needs a tokenizer with a chat template"):
        check_template(none)
    picky = ("{% for m in messages %}{% if 'forbidden' in m['content'] %}{{ raise_exception('no such words') }}"
             "{% endif %}{% endfor %}" + CHATML_TEMPLATE)
    picky = llm_with_template(tiny_backbones, tmp_path / "picky", picky)
    check_template(picky)  # the probe renders
    records = [{"id": "fine", "conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."}]},
               {"id": "rejected", "conversations": [{"from": "human", "value": "forbidden?"},
                                                    {"from": "gpt", "value": "No."}]}]
    write_json(tmp_path / "data.json", records)
    _, processor = build_vlm(tiny_backbones[0], picky)
    dataset = VLMDataset(str(tmp_path / "data.json"), str(tmp_path), processor, "chat", skip_bad_samples=True)
    assert "input_ids" in dataset[0]
    assert dataset[1] == {"id": "rejected", "skipped": "the tokenizer's chat template fails on this conversation: "
                                                       "no such words"}


HOLD_LOCK = """
import fcntl, sys, time
lock = open(sys.argv[1], "a+")
fcntl.flock(lock, fcntl.LOCK_EX)
lock.write("process of the first run\\n")
lock.flush()
print("locked", flush=True)
time.sleep(600)
"""


def test_a_second_run_in_the_same_out_dir_is_refused_until_the_first_dies(tmp_path):
    """Cause 3: out_dir/run.lock carries a kernel lock while a run lives; a second run there is
    refused before it reads or deletes anything (overwrite=True included), in this process through
    train.main. When the holder dies (SIGKILL: no clean-up runs) the kernel drops its lock and the
    folder can be taken; a run that stopped at start-up leaves no folder behind."""
    import subprocess
    import sys

    out = tmp_path / "run"
    out.mkdir()
    write_json(out / "train_config.json", {"seed": 0})
    (out / "metrics.jsonl").write_text("the first run's\n")
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out / "run.lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(UserError, match=rf"out_dir {out} is in use by another run \(process of the first run\)"):
            train_in_process(["data_path=x.json", f"out_dir={out}", "overwrite=true"])
        assert (out / "metrics.jsonl").read_text() == "the first run's\n"
    finally:
        holder.kill()
        holder.wait()
    run.lock_out_dir(Config(out_dir=str(out)), rank=0)
    assert (out / "run.lock").read_text().startswith(f"process {os.getpid()} on ")
    run.release_out_dir()
    assert sorted(os.listdir(out)) == ["metrics.jsonl", "train_config.json"]
    fresh = tmp_path / "fresh"
    run.lock_out_dir(Config(out_dir=str(fresh)), rank=0)
    run.release_out_dir()  # a run that stopped at start-up leaves no folder behind
    assert not fresh.exists()


@pytest.mark.parametrize("key, value", [("train_lm", True), ("train_vision", True), ("train_connector", False),
                                        ("zero_stage", 3), ("vision_layer", -1), ("drop_cls", False)])
def test_resume_refuses_a_change_of_what_trains_or_how_it_is_saved(tmp_path, key, value):
    """Cause 5: these decide the param groups and the checkpoint's files; compared up front."""
    from run import KEYS_A_RESUME_MUST_KEEP

    out = tmp_path / "run"
    (out / "checkpoints" / "step00000002").mkdir(parents=True)
    (out / "checkpoints" / "latest").write_text("step00000002")
    write_json(out / "train_config.json", Config(out_dir=str(out)).__dict__)
    assert key in KEYS_A_RESUME_MUST_KEEP
    with pytest.raises(UserError, match=f"trained with different {key}="):
        check_out_dir(Config(out_dir=str(out), resume=True, **{key: value}))


def test_values_that_cannot_work_are_refused_at_start(tiny_backbones):
    """Cause 6: an infinite learning rate, an empty out_dir, a pinpoint of gigabytes, and a `resize`
    image so long that scaling its short side would ask for gigabytes (cut to its centre first)."""
    from PIL import Image

    from model import MAX_PAD_SIDE, VLMImageProcessor, bound_resize_strip, check_pinpoints, resize
    from run import check_config

    for override, message in ((dict(lr_lm=float("inf")), "lr_lm=inf is out of range: it must be a finite number"),
                              (dict(out_dir=""), "out_dir is empty")):
        with pytest.raises(UserError, match=message):
            check_config(Config(data_path="x.json", **override), world_size=1)
    with pytest.raises(ValueError, match=r"\[33600, 33600\] has more pixels than 4096x4096"):
        check_pinpoints([[33600, 33600]], 336)
    strip = Image.new("RGB", (3, 200_000), (10, 200, 30))  # scaled whole: 336 x 22,400,000 pixels
    cut = bound_resize_strip(strip, 336)
    assert cut.size == (3, -(-3 * MAX_PAD_SIDE // 336)) and max(cut.size) * 336 / 3 <= MAX_PAD_SIDE + 336 / 3
    assert VLMImageProcessor(size=336, aspect="resize").transform(strip).shape == (1, 3, 336, 336)
    # an image long enough to be cut gives the centre square it gave uncut, to resampling's rounding
    long = Image.fromarray(torch.randint(0, 256, (6000, 40, 3), dtype=torch.uint8).numpy())
    processor = VLMImageProcessor(size=32, aspect="resize")
    whole = resize(torch.from_numpy(__import__("numpy").array(long)), 6000 * 32 // 40, 32)[:, 2384:2416]
    expected = processor.transform(Image.fromarray(whole.permute(1, 2, 0).numpy()))
    assert (processor.transform(long) - expected).abs().mean() < 0.05


def test_make_demo_writes_only_into_a_new_or_empty_folder_from_the_command_line(tmp_path):
    """Cause 7: `python data/demo/prepare.py --out DIR` writes over none of a user's files of the
    demo's names, and refuses counts below 1."""
    import prepare

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "finetune.json").write_text("my own data")
    with pytest.raises(UserError, match="mine holds finetune.json, and the demo writes its files .* only into a new"):
        prepare.main(["--out", str(mine), "--n-pretrain", "1", "--n-finetune", "1", "--n-eval", "1"])
    assert os.listdir(mine) == ["finetune.json"] and (mine / "finetune.json").read_text() == "my own data"
    with pytest.raises(UserError, match="--n-finetune -5: the demo needs at least 1"):
        prepare.main(["--out", str(tmp_path / "new"), "--n-finetune", "-5"])
    assert not (tmp_path / "new").exists()


def test_resuming_a_finished_run_says_there_is_nothing_to_train(demo_dir, tmp_path, capsys):
    """Cause 8: no step is trained, no file changes, and the run does not report success."""
    from run import count_steps

    with pytest.raises(UserError, match="nothing to train: .*step00000006 is at step 6, and this run has 6 steps"):
        count_steps(Config(max_steps=6), 64, 8, "step00000006")
    assert count_steps(Config(max_steps=8), 64, 8, "step00000006") == 8
    out = tmp_path / "run"
    train_in_process(train_args(demo_dir, out, "max_steps=1"))
    before = {name: (out / name).read_bytes() for name in ("final/train_summary.json", "train_config.json",
                                                            "metrics.jsonl")}
    assert "error: nothing to train:" in refused(train_args(demo_dir, out, "max_steps=1", "resume=true"), capsys)
    assert {name: (out / name).read_bytes() for name in before} == before


def test_weights_that_do_not_match_their_config_are_refused(tiny_vlm, tmp_path, capsys):
    """Cause 4: eval.py used to answer with a random connector, push.py to export one; a tensor of
    another shape was a traceback from transformers."""
    from safetensors.torch import load_file, save_file

    import eval as evaluation
    import push

    final = saved_model(tiny_vlm, tmp_path / "final")
    weights = load_file(final / "model.safetensors")
    save_file({k.replace("connector.", "projector."): v for k, v in weights.items()}, final / "model.safetensors",
              metadata={"format": "pt"})
    message = r"the weights in .*final do not match its config.json: 4 missing from the weight files \(connector\.0"
    with pytest.raises(UserError, match=message + r".*4 in the files that the model has no place for \(projector"):
        evaluation.load_model(str(final))
    assert exit_code(push.main, [str(final), "--repo", "user/name", "--local-dir", str(tmp_path / "export")]) == 2
    assert re.search("error: " + message, capsys.readouterr().err)
    assert not os.listdir(tmp_path / "export")
    # a tensor of another shape (a connector for another LLM width): named, never a traceback
    weights["connector.0.weight"] = torch.zeros(weights["connector.0.weight"].shape[0] + 1,
                                                weights["connector.0.weight"].shape[1])
    save_file(weights, final / "model.safetensors", metadata={"format": "pt"})
    shape = list(weights["connector.0.weight"].shape)
    message = (r"the weights in .*final do not match its config.json: 1 of another shape \(connector.0.weight "
               + re.escape(f"{shape} in the files, {[shape[0] - 1, shape[1]]} in config.json)"))
    with pytest.raises(UserError, match=message):
        evaluation.load_model(str(final))
    assert exit_code(push.main, [str(final), "--repo", "user/name", "--local-dir", str(tmp_path / "export")]) == 2
    assert re.search("error: " + message, capsys.readouterr().err)


def test_two_starts_at_once_and_a_config_that_exits(tmp_path, monkeypatch):
    """Cause 9: a one-process run whose probed port was taken meanwhile starts on another; a
    config file that calls sys.exit() is a config file that does not run."""
    import deepspeed
    import torch.distributed as dist

    ports = []

    def init_distributed(dist_backend):
        ports.append(os.environ["MASTER_PORT"])
        if len(ports) == 1:
            raise dist.DistNetworkError("The server socket has failed to listen ... EADDRINUSE")

    monkeypatch.setattr(deepspeed, "init_distributed", init_distributed)
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    run.init_process_group("gloo")
    assert ports[0] == "29500" and ports[1] != "29500" and len(ports) == 2
    monkeypatch.setenv("WORLD_SIZE", "2")  # with other ranks, the port is the launcher's: not changed
    ports.clear()
    with pytest.raises(dist.DistNetworkError):
        run.init_process_group("gloo")
    config = tmp_path / "exits.py"
    config.write_text("import sys\nsys.exit(0)\n")
    with pytest.raises(UserError, match=r"exits.py' does not run: SystemExit: 0; a config file only assigns"):
        run.load_config([str(config)])
