"""What the command-line scripts (generate.py, bench.py, profile_layers.py, tools/) share: a parser
whose errors are one line, the parse-run-report wrapper, and the small argument types and formats.
No script imports another; each imports these from here."""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import warnings

import torch


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump: the error is what the user needs to see
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def cli(parser: argparse.ArgumentParser, run_fn, argv: list[str] | None) -> int:
    """Parse, run, and turn bad input (ValueError) or file trouble (OSError) into one line; our
    warnings print as one line too; a closed stdout (`generate.py | head`) ends quietly."""
    signal.signal(signal.SIGINT, signal.default_int_handler)  # a script ends quietly on Ctrl-C while importing
    a = parser.parse_args(argv)
    said: set[str] = set()

    def show(message, *_, **__) -> None:  # once per message, however many places warn it
        if str(message) not in said:
            said.add(str(message))
            print(f"{parser.prog}: warning: {message}", file=sys.stderr)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = show
            return run_fn(a)
    except BrokenPipeError:
        # The reader went away: nothing left to say. Point stdout at /dev/null so the interpreter's
        # final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (ValueError, OSError) as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    except torch.cuda.OutOfMemoryError as e:  # what the up-front checks could not foresee (activations)
        print(f"{parser.prog}: error: out of GPU memory: {str(e).splitlines()[0][:200]}", file=sys.stderr)
        return 1
    except RuntimeError as e:  # CUDA's plain "out of memory": pinning host memory, a graph capture that ran out
        if "out of memory" not in str(e):
            raise
        print(f"{parser.prog}: error: out of memory: {str(e).strip().splitlines()[0][:200]}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


def parse_tokens(text: str) -> int:
    """'4096', '4k' (4096), '128k' (131072), '1m' -> a token count."""
    t = text.strip().lower()
    mult = {"k": 1024, "m": 1024 * 1024}.get(t[-1:], 1)
    try:
        n = int(t[:-1] if mult > 1 else t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a token count: {text!r} (examples: 4096, 4k, 128k)") from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return n * mult


def parse_policies(text: str) -> list[str]:
    """'full,quant:bits=2,residual=128,evict' -> ['full', 'quant:bits=2,residual=128', 'evict']: a
    piece that is only key=value belongs to the policy before it."""
    out: list[str] = []
    for piece in filter(None, (t.strip() for t in text.split(","))):
        if "=" in piece and ":" not in piece and out:
            out[-1] += "," + piece
        else:
            out.append(piece)
    if not out:
        raise argparse.ArgumentTypeError(f"empty list: {text!r}")
    return out


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def check_writable(path: str | None, flag: str) -> None:
    """An output path is checked before any expensive work, not after it (None: not asked for)."""
    if path is None:
        return
    if not path:
        raise ValueError(f"{flag}: an empty path")
    folder = os.path.dirname(path) or "."
    if os.path.isdir(path):
        raise ValueError(f"{flag} {path}: is a directory")
    if not os.path.isdir(folder):
        raise ValueError(f"{flag} {path}: no such directory {folder}")
    if not os.access(folder, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise ValueError(f"{flag} {path}: not writable")


def check_distinct(outputs: dict[str, str | None], inputs: list[tuple[str, str]] = ()) -> None:
    """Outputs ({flag: path}) that are one file would overwrite each other, and an output that is an
    input ((flag, path) pairs) would replace it: refused before any work."""
    seen: dict[str, str] = {}
    for flag, path in outputs.items():
        if not path:
            continue
        real = os.path.realpath(path)
        for other, other_path in inputs:
            if other_path and os.path.realpath(other_path) == real:
                raise ValueError(f"{flag} {path} is the {other} file: it would be overwritten")
        if real in seen:
            raise ValueError(f"{flag} and {seen[real]} are both {path}: one would overwrite the other")
        seen[real] = flag


def check_figure_format(path: str) -> None:
    """A figure's file extension names its format: one matplotlib cannot write fails before the work."""
    from matplotlib.backend_bases import FigureCanvasBase
    formats = FigureCanvasBase.get_supported_filetypes()
    ext = os.path.splitext(path)[1].lstrip(".").lower()
    if ext not in formats:
        raise ValueError(f"--png {path}: {'no extension' if not ext else f'.{ext} is not a figure format'} "
                         f"(one of {', '.join(sorted(formats))})")


def check_dir_writable(path: str | None, flag: str) -> None:
    """An output directory (made if missing, with its parents) is checked before the work too."""
    if not path:
        return
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{flag} {path}: not a directory")
    existing = os.path.abspath(path)
    while not os.path.exists(existing):  # the nearest folder that exists: makedirs writes in it
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(f"{flag} {path}: {existing} is not a directory")
    if not os.access(existing, os.W_OK):
        raise ValueError(f"{flag} {path}: {existing} is not writable")


def gpu_memory(text: str) -> str:
    """argparse type of --gpu-memory: the syntax now, the device check once the device is known."""
    from engine.planner import parse_bytes
    try:
        if parse_bytes(text) is None:
            raise ValueError(f"{text!r} has no unit (examples: 24GiB, 16G, 40000MB)")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def cap_gpu_memory(text: str | None, device: torch.device) -> int | None:
    """--gpu-memory SIZE: cap what this process may allocate on its GPU, so a run on a large GPU
    proves what a smaller card holds (past the cap torch raises OutOfMemoryError, as the small card
    would). The cap covers torch's allocations; the CUDA context (~0.5 GiB) comes on top, which is
    why a 24 GB card is measured as a 24 GiB cap with a peak of at most 22 GiB. -> the cap in bytes."""
    if text is None:
        return None
    from engine.planner import parse_bytes
    cap = parse_bytes(text)
    if device.type != "cuda":
        raise ValueError(f"--gpu-memory caps a CUDA GPU's memory; this run is on {device}")
    device = indexed(device)
    total = torch.cuda.get_device_properties(device).total_memory
    if cap > total:
        raise ValueError(f"--gpu-memory {text}: more than the GPU's {fmt_bytes(total)}")
    torch.cuda.set_per_process_memory_fraction(cap / total, device)
    return cap


def indexed(device: torch.device) -> torch.device:
    """'cuda' -> 'cuda:N' (the current device): torch's per-process memory fraction calls refuse a
    CUDA device without an index (ValueError: Expected a torch.device with a specified index)."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def free_memory(device: torch.device) -> int:
    """Bytes that can still be allocated on `device`: CUDA's free memory (under --gpu-memory's cap
    where torch can report the cap), or on the CPU what Linux
    says can be allocated without swapping (MemAvailable; 8 GiB if it cannot be read).
    On CUDA the blocks torch's allocator holds unused count as free: it reuses them, and frees them
    before it gives up (after a hybrid's profiling pass they are GiBs that CUDA calls taken)."""
    if device.type == "cuda":
        device = indexed(device)
        allocated = torch.cuda.memory_allocated(device)
        free = torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device) - allocated
        fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)  # --gpu-memory's cap, if any
        if fraction is not None:
            total = torch.cuda.get_device_properties(device).total_memory
            free = min(free, int(fraction(device) * total) - allocated)
        return max(free, 0)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def resolve_device(name: str, dtype_name: str) -> tuple[torch.device, torch.dtype]:
    """--device and --dtype -> (device, dtype); 'auto' picks CUDA when present, bfloat16 there, float32 on CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {name!r} is not supported: cpu or cuda (cuda:N)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but no CUDA GPU is available")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: there are only {torch.cuda.device_count()} CUDA device(s)")
    device = indexed(device)
    if dtype_name == "auto":
        dtype_name = "bfloat16" if device.type == "cuda" else "float32"
    if device.type == "cpu" and dtype_name == "float16":
        # CPUs have no fast float16 matmul: measured ~50x slower than float32 on the dev machine
        warnings.warn("float16 on CPU is very slow (no native half-precision matmul); float32 or bfloat16 "
                      "run far faster", stacklevel=2)
    return device, getattr(torch, dtype_name)


def read_prompts_file(path: str, max_new_tokens: int) -> tuple[list[str], list[int]]:
    """A JSONL batch -> (prompts, max_new_tokens per prompt); blank lines are skipped."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read --prompts-file {path}: {getattr(e, 'strerror', None) or e}") from None
    prompts, news = [], []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} line {n}: not JSON ({e.msg})") from None
        if isinstance(item, str):
            item = {"prompt": item}
        if not isinstance(item, dict) or not isinstance(item.get("prompt"), str) or set(item) - {"prompt", "max_new_tokens"}:
            raise ValueError(f"{path} line {n}: expected a string or {{\"prompt\": str, \"max_new_tokens\": int}}")
        new = item.get("max_new_tokens", max_new_tokens)
        if not isinstance(new, int) or isinstance(new, bool) or new < 0:
            raise ValueError(f"{path} line {n}: max_new_tokens must be an int >= 0, got {new!r}")
        if not item["prompt"].strip():
            raise ValueError(f"{path} line {n}: empty prompt")
        prompts.append(item["prompt"])
        news.append(new)
    if not prompts:
        raise ValueError(f"--prompts-file {path} holds no prompts")
    return prompts, news
