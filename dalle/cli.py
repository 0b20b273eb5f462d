"""What every command-line program shares, training or not: the device, threads, weights dtype, sampling
flags, the flag validators and `run`, which turns a user's mistake into a one-line error. Training's own
flags and the run's start and end live in `dalle.train.cli`.

Every numeric flag is checked when it is parsed (`type=` one of the validators below), so a bad value
stops the program before any model is loaded, with argparse's usual `argument --flag: ...` line.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SEED_MAX = 2**64 - 1  # torch.Generator.manual_seed takes 0..2**64-1; numpy's generators take any n >= 0


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help with each flag's default after its help, except where the help already says what the default
    means (a path on this machine says less than "the shipped model") or there is none to show (None, "",
    False, an empty list)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        default = action.default
        if "default" in (action.help or "") or default is None or default is False or default in ("", []):
            return action.help
        return super()._get_help_string(action)


def _number(text: str, kind: type, what: str) -> float | int:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def int_range(lo: int, hi: int | None = None) -> Callable[[str], int]:
    """An argparse `type=`: an integer in lo..hi (hi None: no upper bound)."""
    what = f"an integer >= {lo}" if hi is None else f"an integer in {lo}..{hi}"

    def parse(text: str) -> int:
        value = _number(text, int, what)
        if value < lo or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
        return value
    parse.__name__ = what
    return parse


def float_range(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False) -> Callable[[str], float]:
    """An argparse `type=`: a finite float in [lo, hi] ((lo, hi] with lo_open); None: unbounded on that side.
    NaN and inf are always refused: they pass every comparison unnoticed and end up in the JSON written."""
    parts = [f"> {lo:g}" if lo_open else f">= {lo:g}"] if lo is not None else []
    parts += [f"<= {hi:g}"] if hi is not None else []
    what = "a finite number" + (" " + " and ".join(parts) if parts else "")

    def parse(text: str) -> float:
        value = _number(text, float, what)
        if lo is not None and (value < lo or (lo_open and value == lo)) or hi is not None and value > hi:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
        return value
    parse.__name__ = what
    return parse


finite_float = float_range()
positive_float = float_range(0.0, lo_open=True)
non_negative_float = float_range(0.0)
probability = float_range(0.0, 1.0, lo_open=True)  # top-p: 0 keeps nothing to sample from
non_negative_int = int_range(0)
positive_int = int_range(1)
seed_int = int_range(0, SEED_MAX)


def read_prompt_file(path: str | os.PathLike[str], what: str, required: bool = False) -> list[str]:
    """The non-blank lines, stripped, of a UTF-8 prompt file (a BOM is dropped). An unreadable file, or a line
    that is not UTF-8, is a ValueError naming `what` (the flag or setting that gave the path), the file and the
    line; so is a file without a prompt when `required`."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read {what} {path}: {e.strerror}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ValueError(f"{what} {path}: line {line} is not UTF-8 text (byte 0x{data[e.start]:02x}); save the file "
                         "as UTF-8") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if required and not prompts:
        raise ValueError(f"{what} {path} holds no prompt: give a file with one prompt a line")
    return prompts


def add_sampling_flags(p: argparse.ArgumentParser) -> None:
    """The sampling flags generate.py and the evaluation tools share."""
    # Below 1e-6, logits / temperature overflows float32 (at 1e-45 the softmax is NaN); 1e-6 is already greedy.
    p.add_argument("--temperature", type=float_range(1e-6), default=1.0,
                   help="softmax temperature, >= 1e-6 (small: nearly greedy; 1: the model's distribution)")
    p.add_argument("--top-k", type=non_negative_int, default=0,
                   help="sample among the k most likely codes (0: all; >= 0)")
    p.add_argument("--top-p", type=probability, default=1.0, help="nucleus sampling mass, in (0, 1] (1.0: off)")


def add_background_flag(p: argparse.ArgumentParser) -> None:
    """--background: what transparent pixels are composited over, as training's data.background."""
    from dalle.data.transforms import parse_background

    def parse(text: str) -> tuple[int, int, int]:
        try:
            return parse_background(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e).replace("data.background ", "")) from None

    p.add_argument("--background", type=parse, default="white",
                   help="colour transparent images are composited over (a name or #rrggbb); use the value "
                        "the models were trained with (data.background)")


def add_overwrite_flag(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--overwrite", action="store_true", help=f"replace {what} (refused otherwise)")


def refuse_existing(flag: str, path: str | os.PathLike[str], names: tuple[str, ...] = (), *,
                    overwrite: bool) -> None:
    """The one-line error for an output that would replace an earlier one: `path` itself, or any of `names`
    inside it, already exists and --overwrite was not given."""
    path = os.fspath(path)
    found = [n for n in names if os.path.exists(os.path.join(path, n))] if names else \
        ([path] if os.path.exists(path) else [])
    if found and not overwrite:
        what = f"already holds {found[0]}" if names else "already exists"
        raise SystemExit(f"{flag} {path} {what}: choose another {flag}, or pass --overwrite to replace it")


def require_input(key: str, path: str | os.PathLike[str], maker: str) -> None:
    """The one-line error for a config input (`inputs.tokenizer`, `inputs.dvae`) that is not there, naming the
    tool that makes one."""
    if not os.path.exists(path):
        raise SystemExit(f"{key} {os.fspath(path)} does not exist: train one with tools/{maker} "
                         f"(docs/training.md), or set --set {key}=PATH")


def add_debug_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true",
                   help="on an error, show Python's full traceback instead of a one-line message")


# What a user's input can raise (a bad path, file, config value or text encoding; UnicodeDecodeError is a
# ValueError, FileNotFoundError an OSError; PIL refuses images over 179 MP), as opposed to a bug, which
# keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, Image.DecompressionBombError)


def run(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> None:
    """Call `main(argv)` and exit with its code. A user's mistake (USER_ERRORS) becomes `error: <message>`
    on stderr and exit code 2, as argparse's own errors do; `--debug` on the command line shows the
    traceback instead. `main` itself raises, so tests can assert on the exception."""
    args = sys.argv[1:] if argv is None else argv
    try:
        code = main(argv)
    except BrokenPipeError:  # the reader went away (`... | head`): nothing more to say, and no one to say it to
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    except USER_ERRORS as e:
        if "--debug" in args:
            raise
        prog = os.path.basename(sys.argv[0]) or "dalle"
        print(f"{prog}: error: {one_line(e)} (--debug shows the traceback)", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        if "--debug" in args:
            raise
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code)


def one_line(e: BaseException) -> str:
    """The exception as one line: an OSError's file and reason, else its message; newlines folded."""
    if isinstance(e, OSError) and e.strerror:
        text = f"{e.filename}: {e.strerror}" if e.filename else e.strerror
    else:
        text = str(e) or type(e).__name__
    return " ".join(text.split())


def resolve_device(name: str) -> str:
    """The device for this process: under a launcher, "auto" and "cuda" mean this rank's own GPU."""
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and "LOCAL_RANK" in os.environ:
        name = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(name)
    return name


def default_threads() -> int:
    """CPU threads that do not oversubscribe: the cores this process may use, less the ones the 1-minute
    load average says are busy. Oversubscribed torch threads spin-wait on each other, which on a small
    shared machine slowed training tenfold, far worse than using fewer threads."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        load = 0.0
    return max(1, cores - round(load))


def add_threads_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=non_negative_int, default=0,
                   help="CPU threads for torch (0: auto, the cores not already busy by the load average; >= 0)")


def apply_threads(threads: int) -> None:
    """Set torch's thread count: `threads` if positive, else default_threads()."""
    torch.set_num_threads(threads if threads > 0 else default_threads())
