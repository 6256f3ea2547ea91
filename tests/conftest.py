"""Shared fixtures: tiny random backbones saved to folders (no network), built once per session;
the project's ROOT, file writers, and runs of train.py (in this process, or through the launcher)."""
import contextlib
import io
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(1, os.path.join(ROOT, "data", "demo"))  # prepare.py: the tiny backbones and the demo data

# One torch thread per process, here and in every process the tests start (launched ranks,
# `python X.py`), which inherit OMP_NUM_THREADS: the suite's runs share the machine's cores (two
# ranks, or other work), and with torch's default of one thread per core, processes sharing cores
# stall on each other's threads (a 2-rank run on 2 busy cores: 16 s with one thread per rank, 34 s
# with two; an 8-step run in this process: 0.4 s against 20 s). One count everywhere also keeps a
# computation here and in a child process the same to the bit.
THREADS = 1
os.environ["OMP_NUM_THREADS"] = str(THREADS)

import torch  # noqa: E402

from prepare import make_tiny_backbones  # noqa: E402
from model import build_vlm  # noqa: E402

torch.set_num_threads(THREADS)  # in case torch was imported before this file


# Our parameter names -> transformers' native LLaVA / LLaVA-NeXT names (prefix replacement), written
# here independently of push.py's table, so the parity tests do not check push.py with itself.
OURS_TO_LLAVA = [
    ("vision_tower.", "model.vision_tower."),
    ("connector.0.", "model.multi_modal_projector.linear_1."),
    ("connector.2.", "model.multi_modal_projector.linear_2."),
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head.", "lm_head."),
    ("image_newline", "model.image_newline"),  # LLaVA-NeXT only
]


def copy_weights_into(native, model):
    """native (a Llava/LlavaNext...ForConditionalGeneration) with model's weights, in eval mode."""
    state = {}
    for key, value in model.state_dict().items():
        ours, theirs = next((o, t) for o, t in OURS_TO_LLAVA if key.startswith(o))
        state[theirs + key[len(ours):]] = value
    native.load_state_dict(state, strict=True)  # every weight mapped, none left over
    return native.eval()


def favour_token(model, token_id, margin=1e4):
    """Rigs the model so that token_id is by far its most likely next token, every step: a hook adds
    `margin` to that logit of the LM head's output (ours or transformers' LLaVA, any head shape)."""
    import torch

    def add_margin(head, inputs, logits):
        bonus = torch.zeros(logits.shape[-1], dtype=logits.dtype, device=logits.device)
        bonus[token_id] = margin
        return logits + bonus

    model.get_output_embeddings().register_forward_hook(add_margin)
    return model


def supervise_text(batch, image_token_id, prompt_tokens=3):
    """Labels = input_ids, with padding, image tokens and the first `prompt_tokens` real tokens masked."""
    from model import IGNORE_INDEX

    labels = batch["input_ids"].clone()
    labels[batch["attention_mask"] == 0] = IGNORE_INDEX
    labels[labels == image_token_id] = IGNORE_INDEX
    first_real = (batch["attention_mask"] == 0).sum(1)  # left padding: index of the first real token
    for row, start in enumerate(first_real.tolist()):
        labels[row, start:start + prompt_tokens] = IGNORE_INDEX
    return labels


def smooth_image(width, height, seed=0):
    """A smooth colour picture (slow sines): resizing it, torch and PIL differ by a level or two."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    x, y = np.linspace(0, 1, width)[None, :, None], np.linspace(0, 1, height)[:, None, None]
    frequency, phase = rng.uniform(0.5, 3, (1, 1, 3)), rng.uniform(0, 6, (1, 1, 3))
    pixels = 127 + 100 * np.sin(frequency * 6 * x + phase) * np.cos(frequency * 4 * y)
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def write_json(path, records):
    """records as a JSON list at path, or one record per line where path ends in .jsonl (eval's
    benchmarks); returns the path as a string (what data_path and --data take)."""
    import json

    with open(path, "w") as f:
        if str(path).endswith(".jsonl"):
            f.writelines(json.dumps(record) + "\n" for record in records)
        else:
            json.dump(records, f)
    return str(path)


def write_image(path, size=(8, 8), colour=(200, 0, 0)):
    """A plain RGB picture at path (PNG, or what the suffix names); returns the path as a string."""
    from PIL import Image

    Image.new("RGB", size, colour).save(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_backbones(tmp_path_factory):
    """(vision_dir, llm_dir): a full tiny CLIPModel and a tiny Llama + byte-level BPE tokenizer."""
    return make_tiny_backbones(str(tmp_path_factory.mktemp("backbones")))


@pytest.fixture
def tiny_vlm(tiny_backbones):
    """A fresh (model, processor) built from the tiny backbones with build_vlm."""
    model, processor = build_vlm(*tiny_backbones)
    return model.eval(), processor


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory):
    """Small demo data (64 pretrain, 64 finetune, 12 eval records) and tiny backbones trained on
    its tokenizer corpus, shared by the training, reliability and end-to-end tests."""
    from prepare import demo_corpus, make_demo_data

    root = tmp_path_factory.mktemp("demo")
    make_demo_data(str(root), n_pretrain=64, n_finetune=64, n_eval=12)
    make_tiny_backbones(str(root / "backbones"), corpus=demo_corpus(), image_size=32, patch_size=8)
    return root


# ---------------------------------------------------------------------------------------------
# Runs of train.py: in this process (a one-rank gloo group: config checks, out_dir, the lock, bad
# records, Lockstep's agreement), or through the real launcher where processes are the subject
# (kills and stop signals, two ranks agreeing, another number of ranks, ZeRO-2 vs ZeRO-3, the demo)


def train_args(demo_dir, out_dir, *overrides):
    """Arguments for a few-step CPU training run on the small demo data (4 samples per rank)."""
    return ["configs/demo.py", f"data_path={demo_dir}/finetune.json", f"image_folder={demo_dir}/images",
            f"vision_model={demo_dir}/backbones/tiny-clip", f"llm={demo_dir}/backbones/tiny-llama",
            "make_demo=false", "max_steps=6", "batch_size=8", "micro_batch_size=4", "num_workers=0",
            "log_every=1", "save_every=0", "max_seq_len=128", "overwrite=false", f"out_dir={out_dir}", *overrides]


@contextlib.contextmanager
def one_process():
    """Around a command's main() called in this process: what it changes here is undone after it
    (the launcher variables use_one_process_without_launcher sets, Lockstep's SIGTERM / SIGINT
    handlers, torch's thread count, run.lock). The process group it started stays: a second
    deepspeed.init_distributed finds it and returns."""
    import signal

    import run

    env, threads = dict(os.environ), torch.get_num_threads()
    handlers = {number: signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        run.release_out_dir()
        if "MASTER_PORT" in os.environ:  # this process's group: its shared-memory buffer goes at the end
            _used_ports.append(int(os.environ["MASTER_PORT"]))
        os.environ.clear()
        os.environ.update(env)
        for number, handler in handlers.items():
            signal.signal(number, handler)
        torch.set_num_threads(threads)


def train_in_process(args):
    """`python train.py ARGS` in this process: train.main(ARGS) on one rank, which raises a refusal
    (run.UserError) where the command would print its one `error:` line. Returns what it printed."""
    import train

    printed = io.StringIO()
    with one_process(), contextlib.redirect_stdout(printed):
        train.main([str(a) for a in args])
    return printed.getvalue()


def exit_code(main, argv):
    """What `python X.py ARGV` exits with, run in-process: run.exit_after around main(argv)
    (its `error:` line goes to stderr, for capsys)."""
    from run import exit_after

    with one_process(), pytest.raises(SystemExit) as ended:
        exit_after(lambda: main([str(a) for a in argv]))
    return ended.value.code


_used_ports = []  # master ports of this session's runs (their shared-memory buffers are removed)
_launched = []  # the command of each launcher job this session started


def remove_shared_buffers(port):
    """DeepSpeed's CPU backend leaves a 66 MB shared-memory buffer per rank in /dev/shm, named by the
    master port. A finished run has no use for it; left there, runs on fresh ports would fill the
    machine's memory (/dev/shm is RAM)."""
    import glob

    for path in glob.glob(f"/dev/shm/deepspeed_*_{port}_*"):
        os.remove(path)


@pytest.fixture(scope="session", autouse=True)
def shared_buffers_removed():
    """At the end of the session, the buffers of runs started with wait=False too."""
    yield
    for port in _used_ports:
        remove_shared_buffers(port)


def free_port():
    """A port no one listens on now (so that concurrent test runs do not collide)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# A launched job runs in a session of its own (so a test can signal all its processes); if pytest is
# killed, nothing would stop it. This watcher ends the job's process group when pytest is gone,
# and itself when the job is.
KILL_WHEN_PYTEST_DIES = """
import os, signal, sys, time
pytest_pid, job = map(int, sys.argv[1:])
while True:
    time.sleep(1)
    try:
        os.killpg(job, 0)
    except ProcessLookupError:
        break
    try:
        os.kill(pytest_pid, 0)
    except ProcessLookupError:
        os.killpg(job, signal.SIGKILL)
        break
"""


def launch(args, procs=1, wait=True, timeout=300):
    """`deepspeed --num_gpus N train.py ARGS` (the real launcher, CPU ranks of THREADS threads each);
    returns the Popen (wait=False) or the finished Popen with .out holding its output."""
    import subprocess

    port = free_port()
    _used_ports.append(port)
    cmd = ["deepspeed", "--num_gpus", str(procs), "--master_port", str(port), "train.py", *map(str, args)]
    _launched.append(cmd)
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    subprocess.Popen([sys.executable, "-c", KILL_WHEN_PYTEST_DIES, str(os.getpid()), str(proc.pid)],
                     start_new_session=True)
    if wait:
        proc.out, _ = proc.communicate(timeout=timeout)
        remove_shared_buffers(port)
    return proc


def read_metrics(out_dir):
    """{step: loss} from metrics.jsonl; a resumed run's later line for a step wins."""
    import json

    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


def read_weights(folder):
    from safetensors.torch import load_file

    return {k: v for f in sorted(os.listdir(folder)) if f.endswith(".safetensors")
            for k, v in load_file(os.path.join(folder, f)).items()}


def pytest_terminal_summary(terminalreporter):
    """How many DeepSpeed launcher jobs this session started (each costs ~15 s of start-up)."""
    terminalreporter.write_line(f"{len(_launched)} DeepSpeed launcher jobs")


@pytest.fixture(scope="session")
def reference_run(demo_dir, tmp_path_factory):
    """reference_run(*overrides, procs=None): an uninterrupted run of train_args(demo_dir, ...,
    *overrides), made once per session however many tests compare with it; in this process (procs
    None) or through the launcher on `procs` ranks. Returns .out, .output (what it printed),
    .losses ({step: loss}) and .weights (final/'s)."""
    from types import SimpleNamespace

    made = {}

    def reference(*overrides, procs=None):
        if (overrides, procs) not in made:
            out = tmp_path_factory.mktemp("reference") / "run"
            if procs is None:
                output = train_in_process(train_args(demo_dir, out, *overrides))
            else:
                job = launch(train_args(demo_dir, out, *overrides), procs=procs)
                assert job.returncode == 0, job.out[-3000:]
                output = job.out
            made[overrides, procs] = SimpleNamespace(out=out, output=output, losses=read_metrics(out),
                                                     weights=read_weights(out / "final"))
        return made[overrides, procs]
    return reference


def assert_same_run(out, reference, tolerance=0.0):
    """Every step logged once (a resumed run drops the lines written after its checkpoint), with
    the reference's losses and final weights: equal, or within `tolerance` (another number of ranks,
    or another ZeRO stage, adds the same gradients in another order)."""
    import json

    steps = [json.loads(line)["step"] for line in open(os.path.join(out, "metrics.jsonl"))]
    assert steps == sorted(reference.losses), steps
    resumed = read_metrics(out)
    assert all(abs(resumed[s] - reference.losses[s]) <= max(tolerance, 1e-6) for s in reference.losses), \
        (resumed, reference.losses)
    final = read_weights(os.path.join(out, "final"))
    assert all(torch.allclose(final[k], reference.weights[k], rtol=0, atol=tolerance) for k in reference.weights)


def last_step(out_dir):
    """The last step in out_dir/metrics.jsonl (0 before the first)."""
    import json

    path = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    lines = open(path).read().splitlines()
    return json.loads(lines[-1])["step"] if lines else 0


def run_processes(out_dir):
    """Processes still running whose command line names out_dir (a run's ranks and their workers)."""
    import subprocess

    found = subprocess.run(["pgrep", "-f", f"out_dir={out_dir}"], capture_output=True, text=True).stdout.split()
    return [pid for pid in found if int(pid) != os.getpid()]


def stop_job(proc, signal_number, out_dir):
    """signal_number to every process of a launched job (as SLURM does before pre-emption; DeepSpeed's
    single-node runner does not forward one sent to it alone). Returns what the job printed, once
    every process of it has ended: a SIGKILLed rank can outlive the launcher by a moment, and its
    out_dir lock with it."""
    import time

    os.killpg(proc.pid, signal_number)
    output, _ = proc.communicate(timeout=120)
    start = time.time()
    while run_processes(out_dir):
        assert time.time() - start < 30, f"processes of the stopped job still run: {run_processes(out_dir)}"
        time.sleep(0.1)
    return output


def wait_for(condition, proc, timeout=240):
    """Polls condition() while the launched job runs (to signal it at a chosen moment)."""
    import time

    start = time.time()
    while not condition():
        assert proc.poll() is None, "the run ended before the condition held"
        assert time.time() - start < timeout, "timed out"
        time.sleep(0.01)


def make_vicuna_like_tokenizer(folder, corpus):
    """A folder shaped like lmsys/vicuna-7b-v1.5's tokenizer: a SentencePiece BPE tokenizer.model
    trained here with Llama-2's settings (byte fallback, split digits, dummy prefix, whitespace-only
    pieces, no normalization) and, as in Llama-2's model, the whitespace-only pieces ("▁▁", ...)
    scored -1e9 so that they merge last; a tokenizer_config.json with legacy=false and no
    tokenizer.json. Returns the folder."""
    import io
    import json

    import sentencepiece
    from sentencepiece import sentencepiece_model_pb2

    buffer = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=buffer, model_type="bpe", vocab_size=400, byte_fallback=True,
        split_digits=True, add_dummy_prefix=True, allow_whitespace_only_pieces=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0,
        minloglevel=2)
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(buffer.getvalue())
    # Llama-2 lists whitespace-only pieces first after the 256 bytes (id 259 is "▁▁"), scored -1e9.
    pieces = list(proto.pieces)
    first_merge = next(i for i, p in enumerate(pieces) if p.type == 1)  # type 1: a normal piece
    spaces = [sentencepiece_model_pb2.ModelProto.SentencePiece(piece="▁" * n, score=-1e9, type=1) for n in (2, 4, 3)]
    del proto.pieces[:]
    proto.pieces.extend(pieces[:first_merge] + spaces + pieces[first_merge:])
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "tokenizer.model"), "wb") as f:
        f.write(proto.SerializeToString())
    special = {name: {"content": text, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
               for name, text in (("bos_token", "<s>"), ("eos_token", "</s>"), ("unk_token", "<unk>"))}
    config = {"add_bos_token": True, "add_eos_token": False, "clean_up_tokenization_spaces": False, "legacy": False,
              "model_max_length": 2048, "pad_token": None, "padding_side": "right", "sp_model_kwargs": {},
              "tokenizer_class": "LlamaTokenizer", **special}
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=1)
    with open(os.path.join(folder, "special_tokens_map.json"), "w") as f:
        json.dump(special, f, indent=1)
    return folder


# Lines without newlines or tabs, as SentencePiece trains on lines: "\n" then falls back to the
# byte <0x0A>, as in Llama-2. Frequent words become word-start pieces ("▁world").
VICUNA_LIKE_CORPUS = [
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions. USER: What is this? ASSISTANT: Hello world",
    "What is the man holding? The man is holding an umbrella in the rain. There are three people in the world.",
    "select luxury furniture 3 - inch gel memory foam mattress topper, olympic athlete in action, hello world",
    "def add(a, b): return a + b print(add(1, 2)) Hello world, hello world, the world is round",
    "Answer the question using a single word or phrase. Red Brown Laptop 12345 cafe world",
] * 50


@pytest.fixture(scope="session")
def vicuna_like_tokenizer(tmp_path_factory):
    """The folder of a Vicuna-shaped SentencePiece tokenizer (make_vicuna_like_tokenizer)."""
    return make_vicuna_like_tokenizer(str(tmp_path_factory.mktemp("vicuna-tokenizer")), VICUNA_LIKE_CORPUS)
