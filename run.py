"""The run's machinery: what keeps a training run, and every command, safe. Nothing here is needed
to follow a sample from the data to the loss; train.py's `main` calls these as named components
(as nanoGPT's configurator.py shuttles code away from its train.py):

    errors        UserError, exit_after: a user's mistake ends a command as one `error:` line, code 2
    files         reading, writing, write_json: outside files, at the boundary where they enter
    settings      Config (every key), load_config, check_config with its CHOICES and RANGES
    out_dir       lock_out_dir, check_out_dir, prepare_out_dir: one run per folder, never mixed
    processes     start_processes: the process group, this rank's device, the seeds
    lockstep      rank0_first, sum_over_ranks, Lockstep: failures and stop signals agreed by every rank
    checkpoints   save_checkpoint, resume (DeepSpeed's universal form on another number of ranks)
    log           RunLog: metrics.jsonl, throughput, MFU

Deeper code raises; a command exits in one place, exit_after, so every refusal is testable in-process.
This module imports model.py alone of the project: the files that teach import it, never the reverse.
"""
import argparse
import contextlib
import dataclasses
import difflib
import errno
import fcntl
import json
import numbers
import math
import os
import random
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open

from model import IGNORE_INDEX, build_connector, lora_target_names, parse_pinpoints


# ----------------------------------------------------------------------------------------------
# Errors: one line and exit code 2 for a user's mistake; the command exits here and nowhere else


class UserError(Exception):
    """A mistake in what the user gave (config, file, record, argument). Inner functions raise
    ValueError; the boundary that knows what the user gave turns it into a UserError."""


class StopEveryRank(UserError):
    """A UserError that every rank raises together (a bad record or a diverged loss on some rank,
    agreed at a step's end): rank 0 prints it, and no rank leaves before it has."""


class Stopped(Exception):
    """A stop signal (SIGTERM, Ctrl-C) after its checkpoint was saved: the exit code is 128 + signal."""

    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def exit_after(main, hard=False):
    """Runs main() and ends the process with its code: 0 (or what it returns), 2 after one `error:`
    line, argparse's code, 128 + N after stop signal N, 1 with the traceback of a bug. hard
    (train.py): os._exit, not Python's exit, which joins the DataLoader workers: they ignore SIGTERM
    (their rank saves first) and would be waited for forever; they see their parent gone and stop."""
    try:
        code = main() or 0
    except StopEveryRank as e:
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        if dist.is_initialized():
            dist.barrier()  # a launcher kills every rank as soon as one exits: rank 0 prints first
        code = 2
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        code = 2
    except Stopped as e:
        code = 128 + e.signum
    except SystemExit as e:  # argparse: --help, or a usage error it has printed
        code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
    except KeyboardInterrupt:
        code = 128 + signal.SIGINT
    except BaseException:
        traceback.print_exc()
        code = 1
    release_out_dir()
    if not hard:
        sys.exit(code)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def bad_record(record_id, reason):
    return UserError(f"record id={record_id!r}: {reason}. Fix or remove the record, or set skip_bad_samples=True "
                     "to skip such records.")


def first_line(error):
    """An exception's message in one line (its type when it has none)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# ----------------------------------------------------------------------------------------------
# Files from outside: what a library raises on a bad one becomes one line naming the file

# What libraries raise on a file that is damaged, truncated or not what it claims: json and torch
# raise ValueErrors, safetensors its own error, a header that claims more bytes than there are a
# MemoryError, JSON nested thousands deep a RecursionError, a cut pickle an EOFError.
DAMAGED_FILE_ERRORS = (OSError, ValueError, EOFError, MemoryError, RecursionError, SafetensorError)


@contextlib.contextmanager
def reading(path, fix):
    """A boundary where a file from outside is read: what a library raises on it becomes one
    UserError naming the file and `fix`, what to do. A bug elsewhere keeps its traceback."""
    try:
        yield
    except UserError:
        raise
    except DAMAGED_FILE_ERRORS as e:
        raise UserError(f"cannot read {path} ({type(e).__name__}: {first_line(e)}); {fix}") from None


@contextlib.contextmanager
def loading(folder):
    """Around from_pretrained(FOLDER): a file of it that is damaged or cut short (safetensors' error,
    json's, an OSError) is reading's one line naming FOLDER; any other ValueError comes from building
    the model its config files describe (an unknown connector), so it is not called damaged."""
    with reading(folder, "copy or save the checkpoint again"):
        try:
            yield
        except ValueError as e:
            if isinstance(e, json.JSONDecodeError):  # a cut tokenizer.json: damaged after all
                raise
            raise UserError(f"cannot build the model in {folder} ({first_line(e)}); fix that setting in its "
                            "config.json or processor_config.json") from None


@contextlib.contextmanager
def writing(path, then=""):
    """A boundary where files are written: a full disk, a read-only or vanished folder (torch
    reports a full disk as "unexpected pos", safetensors as "os error 28") becomes one UserError
    naming the path and how much space is left (and `then`, what else to do)."""
    try:
        yield
    except (OSError, RuntimeError, SafetensorError) as e:
        full = getattr(e, "errno", None) == errno.ENOSPC or any(
            sign in str(e) for sign in ("unexpected pos", f"os error {errno.ENOSPC})"))
        if not (full or isinstance(e, OSError)):
            raise
        folder = next((p for p in (path, os.path.dirname(path)) if os.path.isdir(p)), ".")
        free = shutil.disk_usage(folder).free / 2**20
        why = "the disk is full" if full else e.strerror or first_line(e)
        raise UserError(f"cannot write {path} ({why}; {free:.0f} MiB free); free some space or choose a writable "
                        f"folder{then}") from None


def write_json(path, obj):
    """obj as indented JSON with a final newline (run files, exported configs, demo data)."""
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def check_saved_model(folder):
    """A saved model folder (train.py's final/, push.py's exports) holds what from_pretrained reads,
    each file whole: names the file that is missing or cut short before anything slow runs
    (safetensors refuses a file shorter than its header's offsets)."""
    for needed in ("processor_config.json", "tokenizer.json", "tokenizer_config.json"):
        if not os.path.isfile(os.path.join(folder, needed)):
            raise UserError(f"{folder} has no {needed}: the model folder is incomplete; copy it again, or save it "
                            "again (train.py writes final/, push.py --local-dir an export)")
    weights = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    if not weights:
        raise UserError(f"{folder} has no model weights (*.safetensors): the model folder is incomplete")
    for name in weights:
        path = os.path.join(folder, name)
        with reading(path, "copy or save the checkpoint again"), safe_open(path, "pt"):
            pass


def check_weights_match(folder, loading_info):
    """from_pretrained(..., output_loading_info=True, ignore_mismatched_sizes=True)'s report on FOLDER:
    a weight the config's model has and the files lack would start random (an untrained connector
    answers nonsense), one the files hold that no module takes is lost, one of another shape cannot
    be loaded. Each means the weights are not this config's."""
    mismatched = [f"{key} {list(saved)} in the files, {list(expected)} in config.json"
                  for key, saved, expected in loading_info["mismatched_keys"]]
    found = [f"{len(keys)} {what} ({', '.join(sorted(map(str, keys))[:4])}{', ...' if len(keys) > 4 else ''})"
             for what, keys in (("missing from the weight files", loading_info["missing_keys"]),
                                ("in the files that the model has no place for", loading_info["unexpected_keys"]),
                                ("of another shape", mismatched)) if keys]
    if found:
        raise UserError(f"the weights in {folder} do not match its config.json: {'; '.join(found)}; save or copy "
                        "the model again (config.json and its .safetensors files together)")


# ----------------------------------------------------------------------------------------------
# Settings: every key a config file or `key=value` can set. The README's table mirrors this.


@dataclass
class Config:
    # model
    vision_model: str = "openai/clip-vit-large-patch14-336"  # CLIP/SigLIP, Hub name or folder
    vision_layer: int = -2  # hidden-states index the connector reads (-2: second to last)
    drop_cls: bool = True  # drop the CLS token (ignored for SigLIP, which has none)
    connector: str = "mlp2x_gelu"  # identity | linear | mlp{N}x_{gelu,relu,silu}
    llm: str = "lmsys/vicuna-7b-v1.5"  # any AutoModelForCausalLM, Hub name or folder
    init_from: str = ""  # a stage-1 run or final folder: its connector weights start this run
    # data
    template: str = "plain"  # plain (stage 1) | vicuna_v1 (stage 2, Vicuna) | chat (tokenizer's own)
    data_path: str = ""  # LLaVA JSON/JSONL file(s), comma-separated, or a Hub dataset id whose `image` column holds relative paths
    image_folder: str = ""  # image paths in the data are relative to this folder
    image_aspect: str = "pad"  # pad (square canvas in the mean colour) | resize (resize + centre crop) | anyres (LLaVA-NeXT tiles)
    image_grid_pinpoints: str = ""  # anyres: "HxW,HxW,..." sizes an image is tiled to; "" = LLaVA-NeXT's 1x2,2x1,2x2,3x1,1x3 tiles
    max_seq_len: int = 2048  # tokens per sample, image tokens included
    video_frames: int = 0  # frames sampled uniformly from each "video" record's clip; 0 = no video (LLaVA-NeXT-Video: 32)
    skip_bad_samples: bool = False  # skip and count bad records instead of stopping
    group_by_length: bool = True  # LLaVA's modality-aware length grouping (less padding)
    pack_samples: bool = False  # pack each micro-batch into rows of up to max_seq_len tokens (attention stays per sample)
    num_workers: int = 4  # DataLoader worker processes per rank
    image_paths_outside: bool = False  # allow image paths that are absolute or climb out of image_folder (trusted data)
    make_demo: bool = False  # create the demo data and tiny backbones at these paths if missing
    # what trains, and how fast
    train_vision: bool = False  # update the vision tower (LLaVA-1.5: never)
    train_connector: bool = True  # update the connector (both LLaVA stages)
    train_lm: bool = False  # update the LLM (LLaVA stage 2)
    lr_vision: float = 2e-6  # peak learning rate of the vision tower
    lr_connector: float = 1e-3  # peak learning rate of the connector
    lr_lm: float = 2e-5  # peak learning rate of the LLM
    wd_vision: float = 0.0  # AdamW weight decay of the vision tower (never on biases and norms)
    wd_connector: float = 0.0  # weight decay of the connector
    wd_lm: float = 0.0  # weight decay of the LLM
    # LoRA: the LLM trains through low-rank adapters (its lr_lm / wd_lm), its own weights frozen
    lora_r: int = 0  # adapter rank; 0 = off (LLaVA-1.5's LoRA recipe: 128)
    lora_alpha: float = 256.0  # the adapters' update is scaled by lora_alpha / lora_r (LLaVA: 256)
    lora_dropout: float = 0.05  # dropout on the adapters' input (LLaVA: 0.05)
    lora_targets: str = "all-linear"  # layers that get adapters: all-linear (all but the LM head) or names, e.g. q_proj,v_proj
    lora_vision: bool = False  # adapters on the vision tower too (with train_vision=True; it trains in full without them)
    qlora: bool = False  # the frozen LLM in 4-bit NF4 (bitsandbytes), adapters in bf16; CUDA GPUs only
    # schedule
    batch_size: int = 256  # global batch: micro_batch_size x GPUs x accumulation steps
    micro_batch_size: int = 32  # samples per GPU per forward pass
    epochs: int = 1  # passes over the data (when max_steps is 0)
    max_steps: int = 0  # optimizer steps; 0 = run `epochs` epochs
    warmup_ratio: float = 0.03  # fraction of steps with linear warmup
    min_lr_ratio: float = 0.0  # cosine decays to this fraction of each group's peak lr
    grad_clip: float = 1.0  # max global gradient norm; 0 = off
    # system
    zero_stage: int = 2  # DeepSpeed ZeRO stage 0-3
    offload: bool = False  # ZeRO optimizer state (and stage-3 parameters) in CPU memory
    precision: str = "bf16"  # bf16 | fp16 | fp32 (fp32 on CPU)
    gradient_checkpointing: bool = True  # recompute activations in backward: less memory, ~30% slower
    compile: bool = False  # torch.compile each transformer block of the LLM and the vision tower (ZeRO 0-2)
    attn_implementation: str = "sdpa"  # sdpa | flex_attention | flash_attention_2 | eager (GPU; CPU runs use sdpa)
    seed: int = 0  # model init, data order, dropout
    # output
    out_dir: str = "out/run"  # checkpoints/, metrics.jsonl, train_config.json, final/
    log_every: int = 10  # steps between metrics.jsonl lines
    save_every: int = 500  # steps between checkpoints (0 = only at the end)
    keep_checkpoints: int = 2  # newest checkpoints kept
    resume: bool = False  # continue from the newest checkpoint in out_dir
    overwrite: bool = False  # start again in an out_dir that holds another run
    wandb: bool = False  # also log to Weights & Biases (pip install wandb)
    wandb_project: str = "small-vlm"  # the Weights & Biases project name
    log_sample_ids: bool = False  # write out_dir/sample_ids_rank{R}.jsonl: the record ids each step trained on


def parse_value(key, text, default):
    """'5e-6' -> float for a float field, 'true' -> bool for a bool field, and so on."""
    kind = type(default)
    if kind is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
    else:
        try:
            return kind(text)
        except ValueError:
            pass
    raise UserError(f"{key}={text!r}: expected {kind.__name__} (default {default!r})")


def check_key(key, where):
    names = [f.name for f in dataclasses.fields(Config)]
    if key not in names:
        close = difflib.get_close_matches(key, names, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see the README's config table"
        raise UserError(f"unknown config key {key!r} in {where}{hint}")


def load_config(argv, description="Train a small-vlm."):
    """Config file (Python assignments), then key=value overrides. Returns (Config, dry_run)."""
    parser = argparse.ArgumentParser(description=description, usage="%(prog)s [CONFIG.py] [key=value ...]")
    parser.add_argument("args", nargs="*", help="a config file, then key=value overrides")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # from the launcher
    opts = parser.parse_args(argv)
    cfg = Config()
    settings = []
    if opts.args and opts.args[0].endswith(".py"):
        path = opts.args.pop(0)
        if not os.path.isfile(path):
            raise UserError(f"config file {path!r} not found")
        try:
            with open(path, encoding="utf-8") as f:
                source = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"config file {path!r} cannot be read ({e}); save it as UTF-8 text") from None
        scope = {}
        try:
            exec(compile(source, path, "exec"), scope)
        except (Exception, SystemExit) as e:  # a config file is Python: report its error as the user's, in one line
            raise UserError(f"config file {path!r} does not run: {type(e).__name__}: {e}; a config file only "
                            "assigns settings") from None
        settings += [(k, v, path) for k, v in scope.items() if not k.startswith("_") and not callable(v)
                     and type(v).__name__ != "module"]
    for arg in opts.args:
        key, sep, text = arg.partition("=")
        if not sep and os.path.isfile(arg):
            raise UserError(f"{arg!r} is a file, and a config file is Python whose name ends in .py (given first, "
                            "before any key=value); rename it, or give its settings as key=value")
        if not sep:
            raise UserError(f"override {arg!r} is not key=value")
        check_key(key, "the command line")
        settings.append((key, parse_value(key, text, getattr(Config, key)), "the command line"))
    for key, value, where in settings:
        check_key(key, where)
        setattr(cfg, key, setting_of_its_type(key, value, where))
    return cfg, opts.dry_run


def setting_of_its_type(key, value, where):
    """A config file's value as its field's type: a number of any kind (numpy's too) for a number, an
    int for a float; a list where a text is expected is refused with the comma-separated form."""
    default = getattr(Config, key)
    kind = type(default)
    if kind is float and isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    if kind is str and isinstance(value, (list, tuple)):
        raise UserError(f"{key}={value!r} in {where}: expected one text; write a list as one comma-separated string "
                        "(e.g. image_grid_pinpoints='336x672,672x336', data_path='a.json,b.json')")
    if type(value) is not kind:
        raise UserError(f"{key}={value!r} in {where}: expected {kind.__name__} (default {default!r})")
    return value


CHOICES = {"template": ("plain", "vicuna_v1", "chat"), "image_aspect": ("pad", "resize", "anyres"),
           "precision": ("bf16", "fp16", "fp32"), "zero_stage": (0, 1, 2, 3),
           "attn_implementation": ("sdpa", "flex_attention", "flash_attention_2", "eager")}


# key -> (lowest, highest) valid value, both included (None: no bound)
RANGES = {"lr_vision": (0, None), "lr_connector": (0, None), "lr_lm": (0, None), "wd_vision": (0, None),
          "wd_connector": (0, None), "wd_lm": (0, None), "batch_size": (1, None), "micro_batch_size": (1, None),
          "epochs": (0, None), "max_steps": (0, None), "warmup_ratio": (0, 1), "min_lr_ratio": (0, 1),
          "grad_clip": (0, None), "max_seq_len": (2, None), "num_workers": (0, None), "seed": (0, 2**32 - 1),
          "log_every": (1, None), "save_every": (0, None), "keep_checkpoints": (1, None), "lora_r": (0, None),
          "lora_alpha": (0, None), "lora_dropout": (0, 0.99), "video_frames": (0, None)}


def check_config(cfg, world_size):
    """Value checks that need no files; returns gradient accumulation steps."""
    for key, valid in CHOICES.items():
        if getattr(cfg, key) not in valid:
            raise UserError(f"{key}={getattr(cfg, key)!r}: valid values are {', '.join(map(str, valid))}")
    for key, (low, high) in RANGES.items():
        value = getattr(cfg, key)
        if not math.isfinite(value):  # inf, or NaN: no learning rate, ratio or count works with one
            raise UserError(f"{key}={value!r} is out of range: it must be a finite number "
                            f"(default {getattr(Config, key)!r})")
        if (low is not None and value < low) or (high is not None and value > high):
            bounds = f"at least {low}" if high is None else f"between {low} and {high}"
            raise UserError(f"{key}={value!r} is out of range: it must be {bounds} (default {getattr(Config, key)!r})")
    if cfg.max_steps == 0 and cfg.epochs == 0:
        raise UserError("max_steps=0 and epochs=0 train nothing: set epochs >= 1 or max_steps >= 1")
    if cfg.compile and cfg.zero_stage == 3:
        raise UserError("compile=True needs zero_stage 0, 1 or 2 (ZeRO-3 gathers parameters inside the blocks, "
                        "which breaks the compiled graphs)")
    if cfg.offload and cfg.zero_stage == 0:
        raise UserError("offload=True needs zero_stage 1, 2 or 3 (ZeRO does the offloading)")
    if not (cfg.train_vision or cfg.train_connector or cfg.train_lm):
        raise UserError("nothing to train: set at least one of train_vision, train_connector, train_lm")
    per_step = cfg.micro_batch_size * world_size
    if cfg.batch_size % per_step:
        raise UserError(
            f"batch_size={cfg.batch_size} is not a multiple of micro_batch_size ({cfg.micro_batch_size}) x "
            f"{world_size} processes = {per_step}; pick batch_size = k x {per_step} or another micro_batch_size")
    try:
        build_connector(cfg.connector, 8, 8)  # the name alone decides validity
    except ValueError as e:
        raise UserError(f"connector: {e}") from None
    try:
        parse_pinpoints(cfg.image_grid_pinpoints)
    except ValueError as e:
        raise UserError(str(e)) from None
    if not cfg.data_path:
        raise UserError("data_path is empty: set it in the config file or as data_path=FILE.json")
    if not cfg.out_dir.strip():
        raise UserError("out_dir is empty: set it to the folder this run writes to, as out_dir=out/NAME")
    if cfg.image_grid_pinpoints and cfg.image_aspect != "anyres":
        raise UserError(f"image_grid_pinpoints is set but image_aspect={cfg.image_aspect!r}; it only applies to "
                        "image_aspect=anyres")
    check_lora(cfg)
    return cfg.batch_size // per_step


LORA_KEYS = ("lora_alpha", "lora_dropout", "lora_targets", "lora_vision", "qlora")  # mean nothing with lora_r=0


def check_lora(cfg):
    """LoRA settings that cannot work together, each refused in one line."""
    if not cfg.lora_r:
        changed = [key for key in LORA_KEYS if getattr(cfg, key) != getattr(Config, key)]
        if changed:
            raise UserError(f"{changed[0]}={getattr(cfg, changed[0])!r} is set but lora_r=0 (LoRA off): set lora_r "
                            f"(LLaVA: 128) to train with adapters, or remove {changed[0]}")
        return
    if not cfg.train_lm:
        raise UserError(f"lora_r={cfg.lora_r} puts adapters on the LLM but train_lm=False: set train_lm=True (its "
                        "own weights stay frozen, only the adapters train) or lora_r=0")
    if cfg.lora_vision and not cfg.train_vision:
        raise UserError("lora_vision=True puts adapters on the vision tower but train_vision=False: set "
                        "train_vision=True, or lora_vision=False")
    if not cfg.lora_alpha:
        raise UserError(f"lora_alpha=0 scales the adapters' update to nothing; set it (LLaVA: 2 x lora_r = "
                        f"{2 * cfg.lora_r})")
    if cfg.qlora:
        check_qlora(cfg)


def check_qlora(cfg):
    if not torch.cuda.is_available():
        raise UserError("qlora=True needs a CUDA GPU (bitsandbytes' 4-bit layers); on this machine train with "
                        "LoRA alone (qlora=False): same adapters, a 16-bit LLM")
    if cfg.zero_stage == 3 or cfg.precision != "bf16":
        raise UserError(f"qlora=True needs zero_stage 0-2 (4-bit weights cannot be partitioned) and precision=bf16; "
                        f"got zero_stage={cfg.zero_stage}, precision={cfg.precision!r}")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UserError("qlora=True needs bitsandbytes: pip install bitsandbytes==0.50.2") from None


def lora_layers(parts, cfg):
    """{key: the names of the layers of parts[key] (cfg.KEY's model) that get adapters}. A model with
    none, or a lora_targets name that matches no layer of any (a typo in a list), is a user error."""
    chosen = {key: lora_target_names(module, cfg.lora_targets) for key, module in parts.items()}
    targets = [] if cfg.lora_targets == "all-linear" else cfg.lora_targets.split(",")
    unmatched = [t for t in targets if not lora_target_names(torch.nn.ModuleDict(parts), t)]
    for key, names in chosen.items():
        if not names or unmatched:
            linear = sorted({n.rsplit(".", 1)[-1] for n, m in parts[key].named_modules() if isinstance(m, torch.nn.Linear)})
            what = f"has {', '.join(map(repr, unmatched))}, which matches" if names else "matches"
            raise UserError(f"lora_targets={cfg.lora_targets!r} {what} no linear layer of {key}={getattr(cfg, key)!r}; "
                            f"its linear layers are named {', '.join(linear)} (all-linear takes all but the LM head)")
    return chosen


def check_model_fits(cfg, model, processor):
    """Settings that need the built model: vision_layer exists, one image fits max_seq_len (and a
    note when an anyres image may not)."""
    layers = model.config.vision_config.num_hidden_layers + 1  # hidden states: the embeddings, then each layer's
    if not -layers <= cfg.vision_layer < layers:
        raise UserError(f"vision_layer={cfg.vision_layer} is out of range: {cfg.vision_model} has {layers} hidden "
                        f"states, so it must be between {-layers} and {layers - 1} (LLaVA: -2)")
    if cfg.max_seq_len <= model.config.num_image_tokens:
        raise UserError(f"max_seq_len={cfg.max_seq_len} leaves no room for text after one image's "
                        f"{model.config.num_image_tokens} image tokens; raise it (LLaVA: 2048)")
    if cfg.max_seq_len <= processor.video_token_count(cfg.video_frames):
        raise UserError(f"max_seq_len={cfg.max_seq_len} leaves no room for text after one clip's "
                        f"{processor.video_token_count(cfg.video_frames)} video tokens ({cfg.video_frames} frames); "
                        "raise it or lower video_frames")
    if model.config.image_grid_pinpoints:
        most = max(processor.image_token_count(pin_h, pin_w) for pin_h, pin_w in model.config.image_grid_pinpoints)
        if cfg.max_seq_len < most:
            log_rank0(int(os.environ.get("RANK", 0)),
                      f"note: with anyres an image takes up to {most} tokens (an image shaped like a pinpoint); "
                      f"max_seq_len={cfg.max_seq_len} refuses such samples (skip_bad_samples skips them). "
                      "LLaVA-NeXT trains with 4096.")


def count_steps(cfg, n_records, steps_per_epoch, resume_tag=None):
    """The run's optimizer steps: max_steps, or epochs x whole steps of batch_size per epoch. A run
    resumed from checkpoint resume_tag must have steps left: a finished run resumed would train
    nothing and then rewrite final/ and its summary (found here, before out_dir is touched)."""
    if n_records == 0:
        raise UserError(f"data_path={cfg.data_path!r} holds no records")
    if steps_per_epoch == 0:
        raise UserError(f"{n_records} records give no full step of batch_size={cfg.batch_size}; lower batch_size")
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    done = int(resume_tag.removeprefix("step")) if resume_tag else 0
    if done >= total_steps:
        raise UserError(f"nothing to train: {cfg.out_dir}/checkpoints/{resume_tag} is at step {done}, and this run "
                        f"has {total_steps} steps (max_steps={cfg.max_steps}, epochs={cfg.epochs}); raise max_steps "
                        "or epochs to train on from there")
    return total_steps


# ----------------------------------------------------------------------------------------------
# The output folder: one run per folder, locked while it trains, never mixed with another


RUN_FILES = ("checkpoints", "final", "metrics.jsonl")  # what a run writes beside train_config.json

# What a resumed run must share with the run that wrote the checkpoint: the model, the data and its
# order, and what decides the param groups and the checkpoint's file layout (what trains, the ZeRO
# stage, the shapes of the connector's input). A change is otherwise found by DeepSpeed or torch
# halfway through loading.
KEYS_A_RESUME_MUST_KEEP = ("vision_model", "llm", "connector", "vision_layer", "drop_cls", "image_aspect",
                           "image_grid_pinpoints", "template", "data_path", "batch_size", "seed", "train_vision",
                           "train_connector", "train_lm", "zero_stage", "lora_r", "lora_alpha", "lora_targets",
                           "lora_vision", "qlora")
LOCK_FILE = "run.lock"  # in out_dir; rank 0 holds a kernel lock on it while the run lives
held_locks = []  # (open lock file, out_dir if this process created it): released by exit_after


def lock_out_dir(cfg, rank):
    """Rank 0 takes out_dir before any check reads it: a kernel lock (flock) on out_dir/run.lock,
    which the kernel releases when the process ends however it ends, so no lock outlives its run.
    A second run there (a second terminal, overwrite=True) is refused instead of deleting the files
    of the run that trains."""
    if rank != 0:
        return
    if os.path.exists(cfg.out_dir) and not os.path.isdir(cfg.out_dir):
        raise UserError(f"out_dir={cfg.out_dir!r} is a file; choose a new or empty folder")
    created = not os.path.exists(cfg.out_dir)
    try:
        os.makedirs(cfg.out_dir, exist_ok=True)
        lock = open(os.path.join(cfg.out_dir, LOCK_FILE), "a+")
    except OSError as e:
        raise UserError(f"out_dir={cfg.out_dir!r} is not writable: {e}") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip()  # what the holder wrote: for the message only, the kernel decides
        lock.close()
        raise UserError(f"out_dir {cfg.out_dir} is in use by another run ({holder or 'starting'}); wait for it to "
                        "end or choose another out_dir") from None
    except OSError as e:  # a file system without locks (Lustre mounted without -o flock): train, unguarded
        log_rank0(rank, f"note: out_dir {cfg.out_dir} cannot be locked ({e.strerror}); a second run there is not "
                        "refused")
    lock.truncate(0)
    lock.write(f"process {os.getpid()} on {socket.gethostname()}\n")
    lock.flush()
    held_locks.append((lock, cfg.out_dir if created else None))


def release_out_dir():
    """Drops this process's lock, and the out_dir it created when nothing else was written there
    (a run refused at start-up leaves no folder behind)."""
    while held_locks:
        lock, created = held_locks.pop()
        with contextlib.suppress(OSError):
            os.remove(lock.name)
        lock.close()
        if created:
            with contextlib.suppress(OSError):  # not empty: the run's files stay
                os.rmdir(created)


def check_out_dir(cfg):
    """Refuse to mix two runs in one folder; returns the checkpoint to resume from (or None)."""
    saved = os.path.join(cfg.out_dir, "train_config.json")
    latest = os.path.join(cfg.out_dir, "checkpoints", "latest")
    if not os.path.exists(saved):
        foreign = [name for name in RUN_FILES if os.path.exists(os.path.join(cfg.out_dir, name))]
        if foreign:  # someone else's files by our names: never delete or mix with them
            raise UserError(f"out_dir {cfg.out_dir} holds {', '.join(foreign)} but no small-vlm run (no "
                            "train_config.json); choose a new or empty out_dir")
        if cfg.resume:
            raise UserError(f"resume=True but {cfg.out_dir} holds no run; drop resume=True to start one")
        return None
    if cfg.resume:
        if not os.path.exists(latest):
            return None  # the run died before its first checkpoint: start it again
        with reading(saved, "restore it from a copy, or start again with overwrite=True"):
            with open(saved) as f:
                old = json.load(f)
            if not isinstance(old, dict):
                raise ValueError(f"a JSON {type(old).__name__}, not an object")
        changed = [k for k in KEYS_A_RESUME_MUST_KEEP if old.get(k, getattr(Config, k)) != getattr(cfg, k)]
        if changed:
            raise UserError(f"resume=True, but {cfg.out_dir} was trained with different "
                            f"{', '.join(f'{k}={old.get(k, getattr(Config, k))!r}' for k in changed)}; use another out_dir")
        with open(latest) as f:
            tag = f.read().strip()
        root = os.path.dirname(latest)
        problem = checkpoint_problem(os.path.join(root, tag)) if tag else "it is empty"
        if problem:
            complete = [d for d in sorted(os.listdir(root), reverse=True)
                        if re.fullmatch(r"step\d+", d) and not checkpoint_problem(os.path.join(root, d))]
            offer = (f"the newest complete checkpoint is {complete[0]}: write {complete[0]} into {latest} to resume "
                     "from it" if complete else "no complete checkpoint is left: start again with overwrite=True")
            raise UserError(f"cannot resume: {latest} names {tag!r}, and {problem}; {offer}")
        return tag
    if cfg.overwrite:
        return None
    state = "a finished" if os.path.exists(os.path.join(cfg.out_dir, "final")) else "an unfinished"
    raise UserError(f"out_dir {cfg.out_dir} already holds {state} run; pass resume=True to continue it, "
                    "overwrite=True to start again there, or choose another out_dir")


def prepare_out_dir(cfg, fresh):
    """Writable, holding this run's resolved config; a fresh start with overwrite=True (or resume=True
    and no checkpoint yet) clears what the previous run left (check_out_dir made sure it is one)."""
    try:
        if fresh and (cfg.overwrite or cfg.resume):  # resume=True before any checkpoint starts over
            for stale in RUN_FILES:
                path = os.path.join(cfg.out_dir, stale)
                if os.path.isdir(path):
                    shutil.rmtree(path)
                elif os.path.exists(path):
                    os.remove(path)
        os.makedirs(cfg.out_dir, exist_ok=True)
        write_json(os.path.join(cfg.out_dir, "train_config.json"), dataclasses.asdict(cfg))
    except OSError as e:
        raise UserError(f"out_dir={cfg.out_dir!r} is not writable: {e}") from None


# ----------------------------------------------------------------------------------------------
# Processes: the process group and this rank's device


def use_one_process_without_launcher():
    """`python train.py ...` without the deepspeed launcher: one process (one GPU, or the CPU).
    The launcher sets these; without them DeepSpeed would look for MPI to find its ranks."""
    if "RANK" in os.environ:
        return
    with socket.socket() as probe:  # a port for the (one-member) process group
        try:
            # the launcher's default: DeepSpeed's CPU backend leaves a shared-memory buffer named
            # after the port in /dev/shm, so reruns on one port reuse one buffer instead of adding more
            probe.bind(("127.0.0.1", 29500))
        except OSError:
            probe.bind(("127.0.0.1", 0))  # in use: any free port
        port = probe.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))


def start_processes(cfg):
    """The process group, this rank's device and the seeds. Returns the device."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)  # before the process group: NCCL binds each rank to its own GPU
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    init_process_group("nccl" if device.type == "cuda" else "gloo")
    if cfg.precision != "fp32" and device.type == "cpu":
        raise UserError(f"precision={cfg.precision} needs a GPU; use precision=fp32 on CPU")
    if device.type != "cuda" and cfg.attn_implementation != "sdpa":
        log_rank0(dist.get_rank(), f"attn_implementation={cfg.attn_implementation} is for GPUs; this CPU run uses sdpa")
    seed_everything(cfg.seed)
    return device


def init_process_group(backend):
    """deepspeed.init_distributed. A one-process run is its own master, on a port probed free a
    moment before (use_one_process_without_launcher): a run started at the same moment may have
    taken it since. Then it starts on another free port; nothing else has to reach it."""
    import deepspeed  # imported where used: its import takes seconds and logs, and config errors come first

    try:
        deepspeed.init_distributed(dist_backend=backend)
    except dist.DistNetworkError:
        if int(os.environ.get("WORLD_SIZE", 1)) != 1:
            raise
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(probe.getsockname()[1])
        deepspeed.init_distributed(dist_backend=backend)


# ----------------------------------------------------------------------------------------------
# Lockstep: every rank takes part in every collective, so a failure on one rank is agreed by all


def sum_over_ranks(values, device):
    """[x, y, ...] summed over every rank, as floats. The tensor lives on the training device: the
    process group of a GPU run has only NCCL, which moves GPU tensors alone, and a CPU tensor there
    stops the run ("No backend type associated with device type cpu")."""
    total = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return total.tolist()


def rank0_first(work, rank, then_the_others=True):
    """work() on rank 0, then (then_the_others) on the other ranks, which find what rank 0 wrote to
    disk. A UserError on rank 0 stops every rank with its one line, instead of leaving the others
    waiting for rank 0 for ever. Returns work()'s result (None on ranks that did not run it)."""
    result, error = None, [None]
    if rank == 0:
        try:
            result = work()
        except UserError as e:
            error = [str(e)]
    dist.broadcast_object_list(error, src=0)
    if error[0]:
        raise StopEveryRank(error[0])
    if rank != 0 and then_the_others:
        result = work()
    return result


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)  # pre-emption, Ctrl-C: finish the step, save, exit


def ignore_stop_signals(_worker_id=None):
    """A DataLoader worker's start: SIGTERM and SIGINT (Ctrl-C reaches the whole process group) are
    its rank's to handle, which checkpoints before exiting; a worker dying on them would crash the
    rank mid-save."""
    for number in STOP_SIGNALS:
        signal.signal(number, signal.SIG_IGN)


class Lockstep:
    """What every rank must agree on at each optimizer step's end: the first failure on any rank
    (a bad record, a non-finite loss) and a stop signal. A rank that meets a failure trains
    all-masked placeholder batches to the step's end, so ZeRO's collectives stay in step; then every
    rank stops with the lowest failing rank's message."""

    def __init__(self, cfg, device, world_size):
        self.skip_bad_samples, self.device, self.world_size = cfg.skip_bad_samples, device, world_size
        self.failure, self.signal = None, 0  # this rank's first failure message; the first stop signal
        for number in STOP_SIGNALS:  # the launcher answers Ctrl-C with SIGTERM after it: the first names the stop
            signal.signal(number, lambda received, _: setattr(self, "signal", self.signal or received))

    def batch_to_train(self, batch, pad_token_id):
        """The batch itself, or a placeholder when it holds no sample or this rank has failed. A bad
        record the loader marked is this rank's failure unless skip_bad_samples (then it is counted)."""
        if batch["skipped"] and not self.skip_bad_samples and not self.failure:
            self.failure = str(bad_record(*batch["skipped"][0]))
        if batch["ids"] and not self.failure:
            return batch
        # one pad token and no label: every module still runs (the model sees to that)
        return {"input_ids": torch.tensor([[pad_token_id]]), "labels": torch.tensor([[IGNORE_INDEX]]),
                "position_ids": torch.zeros(1, 1, dtype=torch.long), "num_tokens": 0, "ids": [], "skipped": []}

    def check_loss(self, loss_value, step, batch):
        if not math.isfinite(loss_value) and not self.failure:
            self.failure = (f"loss is {loss_value} at step {step + 1} (micro-batch ids {batch['ids']}); "
                            "lower the learning rate or check those samples, then resume=True")

    def agree_at_step_end(self, loss_sum, micro_batches):
        """Sums the step's loss and every rank's flags. Returns (the step's mean loss, whether a stop
        signal came to some rank); raises StopEveryRank on every rank when some rank failed."""
        loss_sum, micro_batches, stop_asked, failed = sum_over_ranks(
            [loss_sum, micro_batches, float(self.signal > 0), float(self.failure is not None)], self.device)
        if failed:
            messages = [None] * self.world_size
            dist.all_gather_object(messages, self.failure)
            raise StopEveryRank(next(m for m in messages if m))  # the lowest rank that failed
        return loss_sum / micro_batches, stop_asked > 0

    def stopped(self, step, out_dir):
        """The exception that ends the run once the stop signal's checkpoint (of STEP) is saved."""
        received = signal.Signals(self.signal or signal.SIGTERM)
        log_rank0(dist.get_rank(), f"{received.name}: saved step {step} in {out_dir}/checkpoints; continue with "
                                   "the same command plus resume=True")
        return Stopped(received)


# ----------------------------------------------------------------------------------------------
# Checkpoints: written under a temporary name, renamed when complete, then `latest` is switched:
# a run killed mid-write leaves the previous checkpoint as the one resume picks.


def save_checkpoint(engine, cfg, step, position, rank):
    root = os.path.join(cfg.out_dir, "checkpoints")
    tag = f"step{step:08d}"
    partial_tag = tag + ".partial"
    if rank == 0:
        shutil.rmtree(os.path.join(root, partial_tag), ignore_errors=True)
    dist.barrier()
    frozen = any(not p.requires_grad for p in engine.module.parameters())
    with writing(os.path.join(root, partial_tag), "; continue with resume=True (checkpoints/latest still names "
                                                  "the last complete checkpoint)"):
        engine.save_checkpoint(root, tag=partial_tag, client_state={"step": step, **position}, save_latest=False,
                               exclude_frozen_parameters=frozen)  # frozen weights come from the base models
        torch.save(rng_state(), os.path.join(root, partial_tag, f"rng_rank{rank}.pt"))
    dist.barrier()
    if rank == 0:
        shutil.rmtree(os.path.join(root, tag), ignore_errors=True)
        os.replace(os.path.join(root, partial_tag), os.path.join(root, tag))
        with open(os.path.join(root, "latest.tmp"), "w") as f:
            f.write(tag)
        os.replace(os.path.join(root, "latest.tmp"), os.path.join(root, "latest"))
        done = sorted(d for d in os.listdir(root) if d.startswith("step") and not d.endswith(".partial"))
        for old in done[:-max(1, cfg.keep_checkpoints)]:
            shutil.rmtree(os.path.join(root, old))
    dist.barrier()


def prepare_universal_checkpoint(cfg, tag, world_size, rank):
    """True when the run resumes under ZeRO on another number of ranks than wrote checkpoint TAG;
    then rank 0 has written its universal form (the others wait)."""
    if not tag or not needs_universal_checkpoint(cfg, tag, world_size):
        return False
    rank0_first(lambda: write_universal_checkpoint(os.path.join(cfg.out_dir, "checkpoints", tag)), rank,
                then_the_others=False)
    return True


def resume(engine, cfg, tag, rank, world_size, universal):
    """(step, epoch, samples_done): (0, 0, 0) for a new run, else the checkpoint's, loaded: the
    weights, the optimizer, this rank's random state, and the data position (the samples of this
    epoch already trained, in whole steps: a run resumed on other GPUs takes the very next ones)."""
    if not tag:
        return 0, 0, 0
    root = os.path.join(cfg.out_dir, "checkpoints")
    try:
        path, state = engine.load_checkpoint(root, tag=f"{tag}/universal" if universal else tag,
                                             load_module_strict=False)
    except (AssertionError, RuntimeError, KeyError, *DAMAGED_FILE_ERRORS) as e:  # damaged, or not this model's
        raise UserError(f"checkpoint {root}/{tag} cannot be loaded ({type(e).__name__}: {first_line(e)}); point "
                        f"{root}/latest at an older step, or start again with overwrite=True") from None
    if path is None:
        raise UserError(f"could not load checkpoint {root}/{tag}; remove it from {root}/latest or set overwrite=True")
    if ranks_that_wrote(os.path.join(root, tag)) == world_size:
        set_rng_state(torch.load(os.path.join(root, tag, f"rng_rank{rank}.pt"), weights_only=True))
    else:  # rank r of a new layout has no rank-r state to continue: the generators restart, as at a start
        seed_everything(cfg.seed + state["step"])
    if rank == 0:
        forget_steps_after(cfg.out_dir, state["step"])
    dist.barrier()  # before any rank appends to its sample-id log again
    log_rank0(rank, f"resumed from {root}/{tag} at step {state['step']}")
    return state["step"], state["epoch"], state["samples_done"]


def ranks_that_wrote(folder):
    """How many ranks wrote the checkpoint in FOLDER (each wrote its RNG state)."""
    return len([f for f in os.listdir(folder) if re.fullmatch(r"rng_rank\d+\.pt", f)])


def needs_universal_checkpoint(cfg, tag, world_size):
    """ZeRO (stages 1-3) saves each rank's slice of the optimizer state, cut for the number of ranks
    that wrote it; DeepSpeed reads it on another number of ranks only in its universal form."""
    return cfg.zero_stage > 0 and ranks_that_wrote(os.path.join(cfg.out_dir, "checkpoints", tag)) != world_size


def write_universal_checkpoint(folder):
    """FOLDER/universal: DeepSpeed's universal form of the checkpoint (one file per parameter and
    optimizer state, whole), which any number of ranks can load. Written once, by DeepSpeed's own
    converter in a child process, under a temporary name until it is complete."""
    target, partial_dir = os.path.join(folder, "universal"), os.path.join(folder, "universal.partial")
    if os.path.isdir(target):
        return
    shutil.rmtree(partial_dir, ignore_errors=True)
    command = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", folder,
               "--output_folder", partial_dir, "--inject_missing_state"]
    # The converter and its worker processes form a process group of their own, so a terminal's
    # Ctrl-C does not cut them off mid-task, and the whole group ends with this rank however it ends.
    converter = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                 start_new_session=True)
    try:
        output = converter.communicate()[0]
    finally:
        with contextlib.suppress(ProcessLookupError):  # none left
            os.killpg(converter.pid, signal.SIGKILL)
    if converter.returncode != 0:
        last = (output.strip() or "no output").splitlines()[-1] if converter.returncode > 0 else \
            f"stopped by {signal.Signals(-converter.returncode).name}"
        raise UserError(f"cannot convert {folder} for another number of processes ({last}); resume on the "
                        f"{ranks_that_wrote(folder)} processes that wrote it, or resume again to convert it")
    os.replace(partial_dir, target)
    with contextlib.suppress(FileNotFoundError):  # the converter's pointer to its output: unused here
        os.remove(os.path.join(folder, "latest_universal"))


def checkpoint_problem(folder):
    """Why a checkpoint folder cannot be resumed from, or None when it looks complete: every rank
    wrote its RNG state, and DeepSpeed's model (and, under ZeRO, per-rank optimizer) files are there."""
    if not os.path.isdir(folder):
        return f"{folder} does not exist"
    files = os.listdir(folder)
    ranks = ranks_that_wrote(folder)
    models = len([f for f in files if f.endswith("model_states.pt")])
    optimizers = len([f for f in files if f.endswith("optim_states.pt")])
    if not ranks or not models:
        return f"{folder} lacks its {'RNG' if not ranks else 'model'} state files"
    if models not in (1, ranks) or optimizers not in (0, ranks):
        return f"{folder} has {models} model and {optimizers} optimizer state files for {ranks} ranks"
    return None


def forget_steps_after(out_dir, step):
    """A resumed run trains the steps after its checkpoint again: the lines the interrupted run wrote
    for them (metrics.jsonl, sample_ids_rank*.jsonl) go, so that every step is logged once. A line
    cut short by a kill goes too."""
    def kept(line):
        try:
            return json.loads(line)["step"] <= step
        except (ValueError, KeyError, TypeError):
            return False

    for name in os.listdir(out_dir):
        if name == "metrics.jsonl" or re.fullmatch(r"sample_ids_rank\d+\.jsonl", name):
            path = os.path.join(out_dir, name)
            with open(path) as f:
                lines = [line.rstrip("\n") + "\n" for line in f if kept(line)]
            with open(path + ".tmp", "w") as f:
                f.writelines(lines)
            os.replace(path + ".tmp", path)


def rng_state():
    """Every generator's state as tensors, ints and strings, so that torch.load(weights_only=True)
    reads it back (a checkpoint is data: loading one must not run code). On a GPU: this rank's own
    device's generator only, so the file fits a rank of a run on any number of GPUs."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position,
                                                   has_gauss, gauss],
            "torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def set_rng_state(state):
    random.setstate(state["python"])
    kind, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # the CPU and every GPU


# ----------------------------------------------------------------------------------------------
# The run log: metrics.jsonl, throughput and MFU


LOG_FULL_DISK = "; the last checkpoint is intact: continue with resume=True"  # what a failed log write adds
MAX_SKIPPED_SHARE = 0.5  # a run that skips more of its samples than this stops: its data or settings are wrong


class RunLog:
    """What the loop measures and writes: the loss of the step being trained, a window of
    throughput counters (samples, real tokens, computed positions, FLOPs, time waiting for data,
    skipped samples) logged every log_every steps, the bad records skipped, and each step's record
    ids. Writes out_dir/metrics.jsonl (rank 0), sample_ids_rank{R}.jsonl (log_sample_ids), wandb."""

    def __init__(self, cfg, model, device, total_steps):
        self.cfg, self.device, self.total_steps = cfg, device, total_steps
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.flops_per_token, self.flops_per_image = flops_per_token_and_image(model)
        with writing(cfg.out_dir, LOG_FULL_DISK):
            self.metrics = open(os.path.join(cfg.out_dir, "metrics.jsonl"), "a") if self.rank == 0 else None
            self.id_log = (open(os.path.join(cfg.out_dir, f"sample_ids_rank{self.rank}.jsonl"), "a")
                           if cfg.log_sample_ids else None)
        self.wandb_run = None
        if cfg.wandb and self.rank == 0:
            import wandb

            self.wandb_run = wandb.init(project=cfg.wandb_project, config=dataclasses.asdict(cfg))
        self.step_loss, self.step_micro, self.step_ids, self.last_loss = 0.0, 0, [], float("nan")
        self.skipped, self.skipped_before = [], 0  # skipped: (id, reason) this epoch, on this rank
        self.totals = {"trained": 0, "skipped": 0}  # samples, all ranks, this run (check_skipped_share)
        self.window = dict.fromkeys(("samples", "tokens", "positions", "flops", "wait", "skipped"), 0)
        self.t_window = self.t_wait = time.time()

    def arrived(self, batch):
        self.window["wait"] += time.time() - self.t_wait
        self.skipped += batch["skipped"]
        self.window["skipped"] += len(batch["skipped"])

    def trained(self, batch, loss_value):
        self.step_ids += batch["ids"]
        self.step_loss, self.step_micro = self.step_loss + loss_value, self.step_micro + 1
        n_tokens = batch["num_tokens"]  # real tokens, not padding
        # tower passes: anyres images several tiles each; a video frame counts as one (its connector
        # runs on a quarter of the tokens: the count is a little high for video)
        images, videos = batch.get("pixel_values"), batch.get("pixel_values_videos")
        n_tiles = (0 if images is None else len(images)) + (0 if videos is None else videos.shape[0] * videos.shape[1])
        self.window["samples"] += len(batch["ids"])
        self.window["tokens"] += n_tokens
        self.window["positions"] += batch["input_ids"].numel()  # computed, padding included
        self.window["flops"] += self.flops_per_token * n_tokens + self.flops_per_image * n_tiles
        self.t_wait = time.time()

    def take_step_loss(self):
        """(sum of this rank's micro-batch losses this step, their number), then starts the next step."""
        taken, self.step_loss, self.step_micro = (self.step_loss, self.step_micro), 0.0, 0
        return taken

    def step_done(self, step, epoch, loss, optimizer, engine):
        self.last_loss = loss
        if self.id_log:
            with writing(self.id_log.name, LOG_FULL_DISK):
                self.id_log.write(json.dumps({"step": step, "epoch": epoch, "ids": self.step_ids}) + "\n")
                self.id_log.flush()
        self.step_ids = []
        if step % self.cfg.log_every == 0 or step == self.total_steps:
            self.write_window(step, epoch, optimizer, engine)
            self.window = dict.fromkeys(self.window, 0)
            self.t_window = time.time()

    def write_window(self, step, epoch, optimizer, engine):
        """One line in out_dir/metrics.jsonl (rank 0), a progress line, and wandb if on, for the
        steps since the last; stops a run that skips more than MAX_SKIPPED_SHARE of its samples."""
        elapsed, window = time.time() - self.t_window, self.window
        samples, tokens, positions, flops, skipped = sum_over_ranks(
            [window["samples"], window["tokens"], window["positions"], window["flops"], window["skipped"]],
            self.device)
        self.totals["trained"] += samples
        self.totals["skipped"] += skipped
        self.check_skipped_share()
        if self.rank != 0:
            return
        peak = device_peak_flops()
        grad_norm = engine.get_global_grad_norm()  # a float or a tensor, by ZeRO stage
        memory = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else \
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        record = {"step": step, "epoch": epoch, "loss": self.last_loss,
                  "lr": {g["name"]: g["lr"] for g in optimizer.param_groups},
                  "grad_norm": None if grad_norm is None else float(grad_norm),
                  "samples_per_s": samples / elapsed, "tokens_per_s": tokens / elapsed,
                  "padding": 1 - tokens / positions if positions else 0.0,
                  "mfu": flops / elapsed / (self.world_size * peak) if peak else None,
                  "data_wait": window["wait"] / elapsed, "skipped": int(skipped), "memory_gb": memory / 2**30}
        with writing(self.metrics.name, LOG_FULL_DISK):
            self.metrics.write(json.dumps(record) + "\n")
            self.metrics.flush()
        eta = elapsed / self.cfg.log_every * (self.total_steps - step)
        print(f"step {step}/{self.total_steps} | loss {self.last_loss:.4f} | lr {max(record['lr'].values()):.2e} | "
              f"{samples / elapsed:.1f} samples/s | data wait {record['data_wait']:.0%} | eta {eta / 60:.1f} min",
              flush=True)
        if self.wandb_run:
            self.wandb_run.log({k: v for k, v in record.items() if k != "lr"} |
                               {f"lr/{k}": v for k, v in record["lr"].items()}, step=step)

    def check_skipped_share(self):
        """Stops a run that trains on (almost) nothing, such as every image missing, or max_seq_len
        too short for any sample: skip_bad_samples=True is for a few bad records, not for bad settings."""
        seen = self.totals["trained"] + self.totals["skipped"]
        if seen and self.totals["skipped"] > MAX_SKIPPED_SHARE * seen:
            why = f"; e.g. record {self.skipped[0][0]!r}: {self.skipped[0][1]}" if self.skipped else ""
            raise StopEveryRank(f"{int(self.totals['skipped'])} of the {int(seen)} samples so far were bad and "
                                f"skipped, more than {MAX_SKIPPED_SHARE:.0%}{why}; fix the data or the settings "
                                "(image_folder, max_seq_len)")

    def epoch_done(self, epoch):
        if self.skipped:
            log_rank0(self.rank, f"epoch {epoch}: skipped {len(self.skipped)} bad samples on rank 0: {self.skipped[:10]}")
        self.skipped_before += len(self.skipped)
        self.skipped = []

    def summary(self, step):
        """train_summary.json's content; says how many samples were skipped, if any."""
        skipped = self.skipped_before + len(self.skipped)
        if skipped:
            log_rank0(self.rank, f"skipped {skipped} bad samples on rank 0 in all; this epoch: {self.skipped[:10]}")
        return {"final_loss": self.last_loss, "steps": step, "samples": step * self.cfg.batch_size,
                "skipped_rank0": skipped}

    def close(self):
        for log in (self.metrics, self.id_log):
            if log:
                log.close()


def full_shape(p):
    """A parameter's shape; under ZeRO-3 a partitioned parameter's own tensor is an empty slice."""
    return getattr(p, "ds_shape", p.shape)


def full_numel(p):
    return getattr(p, "ds_numel", p.numel())


def flops_per_token_and_image(model):
    """Matmul FLOPs of training, as (per LLM position, per image tile: one per image, or the
    base + grid tiles of an anyres image): 2 per parameter per token
    forward; in backward 2 more for activation gradients wherever gradients flow (a module that
    trains, or lies after one that trains), and 2 more for the weight gradients of trainable
    parameters. So a trained LLM costs 6N per token, a frozen one under a trained connector 4N.
    Attention's T^2 term and the LM head (run only at supervised positions) are left out."""
    lm = model.language_model
    lookups = {id(lm.get_input_embeddings().weight), id(lm.get_output_embeddings().weight)}

    def count(module, trainable=None):  # embedding tables are lookups, and the head runs on few positions
        return sum(full_numel(p) for p in module.parameters()
                   if id(p) not in lookups and (trainable is None or p.requires_grad == trainable))

    patches = model.config.num_image_tokens
    vision_trains = count(model.vision_tower, True) > 0
    connector_needs_grad = vision_trains or count(model.connector, True) > 0
    lm_needs_grad = connector_needs_grad or count(lm, True) > 0
    per_image = 2 * count(model.vision_tower) * patches * (3 if vision_trains else 1)
    per_image += (2 * count(model.connector) * (2 if vision_trains else 1) + 2 * count(model.connector, True)) * patches
    per_token = 2 * count(lm) * (2 if lm_needs_grad else 1) + 2 * count(lm, True)
    return per_token, per_image


PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def device_peak_flops():
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def log_rank0(rank, *args):
    if rank == 0:
        print(*args, flush=True)
