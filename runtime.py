"""
How a ferkd command runs as a process: the plumbing every script shares that is not about the label file.

Named for what it holds, the run-time of a command rather than its data: one-line errors and the CLI runner
(`UserError`, `run_cli`), typed flags (`parse_config`), atomic writes (`atomic_write`), the device and the
allocator (`pick_device`, `keep_freed_memory`), and the ranks of a torchrun job (`setup_distributed`,
`print0`, `barrier`, `on_rank0`, `on_all_ranks`). beton.py (the data contract), models.py, ferkd.py and
labels.py import it; it imports none of them, so the layering stays one-way.
"""
import ctypes
import dataclasses
import datetime
import errno
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

# -----------------------------------------------------------------------------
# Commands: one-line errors, typed flags, atomic writes

class UserError(Exception):
    """A mistake the user can fix: printed as one line, exit status 2 (see `run_cli`)."""


# The words a true/false flag takes (fire passes --flag=false as the string 'false'): the one list that
# parse_config's bool fields, --compile, --amp (ferkd.py, models.autocast_dtype) and bench.py read
BOOL_WORDS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def run_cli(commands):
    """fire.Fire over `commands`, turning UserError into one line on stderr and exit status 2. A process of
    a torchrun group leaves it before exiting, on success or error: exiting inside gloo's group aborted the
    process now and then ("terminate called without an active exception", 3 exits in 12 measured)."""
    import fire
    try:
        fire.Fire(commands)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:  # a write that found the disk full anywhere else: finished files are intact (atomic)
        if e.errno not in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            raise
        print(f"error: out of disk space: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def parse_config(cls, kwargs):
    """Build a frozen config from fire's keyword flags: unknown names and ill-typed values are errors."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    out = {}
    for key, value in kwargs.items():
        key = key.replace("-", "_")
        if key not in fields:
            raise UserError(f"unknown flag --{key}; known: {', '.join('--' + f for f in fields)}")
        want = type(fields[key].default)
        if want is bool:
            if isinstance(value, str) and value.lower() in BOOL_WORDS:
                value = BOOL_WORDS[value.lower()]
            if not isinstance(value, bool):
                raise UserError(f"--{key} takes true or false, got {value!r}")
        elif want is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        elif want is str and not isinstance(value, str):
            value = str(value)
        if not isinstance(value, want) or (want is int and isinstance(value, bool)):
            raise UserError(f"--{key} takes a {want.__name__}, got {value!r}")
        out[key] = value
    return cls(**out)


def atomic_write(path, write):
    """write(tmp), fsync, then rename over `path`: a reader never sees half a file, and a failed or killed
    write (a full disk) leaves the previous file whole and no temporary behind. The temporary keeps the
    suffix (matplotlib and torch.export pick formats by it) and is hidden, so globs of the folder skip
    it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}{path.suffix}")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())  # the bytes are on disk before the rename makes them the file
        os.replace(tmp, path)
    except OSError as e:
        raise UserError(f"could not write {path}: {e}") from None
    finally:
        tmp.unlink(missing_ok=True)

# -----------------------------------------------------------------------------
# The process: its device, its allocator, its place in a torchrun job

def pick_device(name, local_rank=0):
    if name not in ("auto", "cpu", "cuda"):
        raise UserError(f"--device must be auto, cpu or cuda, got {name!r}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device("cuda", local_rank) if name == "cuda" else torch.device("cpu")


def keep_freed_memory():
    """Tell glibc's malloc to keep large freed buffers instead of handing them back to the kernel: by default
    it unmaps a batch's activations when they are freed and page-faults them in again for the next batch
    (measured in a CPU label build at 32 px: 168,000 minor faults/s, 18% of CPU time in the kernel, 1.4x
    slower; `python bench.py build --res=32`). Process-wide, so every command calls it at start-up."""
    libc = ctypes.CDLL(None)
    libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: buffers below 1 GiB come from the heap, not fresh mmaps
    libc.mallopt(-1, 1 << 31)  # M_TRIM_THRESHOLD: keep up to 2 GiB of free heap top rather than trim it


def setup_distributed(device_name):
    """(rank, world, device) from torchrun's environment variables, one process per device; a single process
    without them. The group outlives long one-rank phases (rank 0 writes a dataset cache or a label file's
    images, an hour at ImageNet size, while the others wait): 6 h, not the 30 min default."""
    keep_freed_memory()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_name, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():  # before the loaders: FFCV's distributed order needs it
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(hours=6))
    return rank, world, device

# -----------------------------------------------------------------------------
# Ranks: rank-0 output, and work done on one rank or all with one error for all

def print0(*args, **kwargs):
    if int(os.environ.get("RANK", "0")) == 0:
        print(*args, **kwargs, flush=True)


def barrier():
    if dist.is_initialized():
        dist.barrier()


def on_rank0(work):
    """Run work() on rank 0 only, then let every rank go on, or all stop with rank 0's one-line error (the
    others would otherwise wait for a file that never comes)."""
    error = None
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            work()
        except UserError as e:
            error = str(e)
    if dist.is_initialized():
        shared = [error]
        dist.broadcast_object_list(shared, src=0)
        error = shared[0]
    if error is not None:
        raise UserError(error)


def on_all_ranks(work):
    """Run work() on every rank, then let every rank go on, or all stop with the first failed rank's one-line
    error (the others would otherwise wait at the next barrier for a rank that has gone)."""
    error = None
    try:
        work()
    except UserError as e:
        error = str(e)
    if dist.is_initialized():
        errors = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
        error = next((e for e in errors if e is not None), None)
    if error is not None:
        raise UserError(error)
