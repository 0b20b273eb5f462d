"""Speed and memory of training, generation and the dVAE, against the machine's matmul peak and the peer.

    python tools/bench.py                                   # every case -> JSON + markdown table
    python tools/bench.py --cases gen:cached,train:full:bf16
    python tools/bench.py --compare-peer --peer-python ~/.cache/dalle-peer-venv/bin/python

The workload is "bench-small" (configs/dalle/bench-small.yaml: 32 text + 16x16 image tokens, 6 layers of
d=256) with 2 threads: training steps of batch 8 through the project's own Trainer (AdamW, gradient
clipping, the loss the transformer trains on), and 4 images generated from 4 prompts, all 256 image tokens
with top-k sampling, then decoded by a 64x64 -> 16x16 dVAE of 1024 codes. Weights are random: speed does
not depend on them.

Each case runs in a fresh Python process, so its peak RSS is its own. Inside it, warm-up runs come first,
then timed runs until enough of them were "clean": other processes used under 0.15 cores meanwhile (read
from /proc/stat), as a 2-core machine's figures are worthless otherwise. `--compare-peer` also runs
benchmarks/peer/peer_dalle_pytorch.py (DALLE-pytorch 1.6.6; benchmarks/peer/setup_venv.sh builds its venv)
case by case in the same run, and prints the ratios next to the targets. The cases gen:candidates,
paper:decode, paper:train and caption:64 (many candidates for one prompt; the paper's 256 + 32x32 stream with
a narrow model, its masks against full attention; captioning a batch of renders) live in tools/bench_cases.py;
the peer has nothing to match them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # run as a script from a source checkout
    sys.path.insert(0, str(ROOT))

from dalle import cli  # noqa: E402  (importable once the path above is set)

CONFIG = ROOT / "configs/dalle/bench-small.yaml"
PEER_SCRIPT = ROOT / "benchmarks/peer/peer_dalle_pytorch.py"
GEN_BATCH, TOP_K_FRACTION, COND_SCALE = 4, 0.1, 3.0  # the peer's filter_thres=0.9 keeps the top 10%
DVAE = dict(image_size=64, downsample=4, vocab_size=1024, n_hid=64, n_blk_per_group=1, n_init=128)
CLEAN_CORES = 0.15

# case -> (what it measures, warm-up runs, timed runs)
CASES: dict[str, tuple[str, int, int]] = {
    "peak:fp32": ("matmul peak, fp32 (best of torch.mm and oneDNN, 1024/2048 square)", 2, 8),
    "peak:bf16": ("matmul peak, bf16", 2, 8),
    "train:full:fp32": ("training step, full attention, fp32", 3, 10),
    "train:full:bf16": ("training step, full attention, bf16 autocast", 3, 10),
    "train:paper:fp32": ("training step, the paper's sparse masks, fp32", 3, 10),
    "train:paper:bf16": ("training step, the paper's sparse masks, bf16 autocast", 3, 10),
    "masks:fp32": ("paper's sparse masks vs full attention, alternating steps, fp32", 3, 10),
    "masks:bf16": ("paper's sparse masks vs full attention, alternating steps, bf16 autocast", 3, 10),
    "parity:bf16": ("loss curve, bf16 autocast vs fp32 (40 steps)", 0, 1),
    "gen:uncached": ("generate 4 images, no KV cache (reference path)", 1, 3),
    "gen:cached": ("generate 4 images, KV cache", 2, 7),
    "gen:guided": ("generate 4 images, cond_scale 3, KV cache", 2, 7),
    "gen:paper:cached": ("generate 4 images, paper's sparse masks, KV cache", 2, 7),
    "gen:candidates": ("64 candidates for one prompt through generate (sample, dVAE decode, rerank)", 1, 3),
    "paper:decode": ("generate 16 images at 256 + 32x32 tokens, d=128: paper's masks vs full attention", 1, 3),
    "paper:train": ("training step at 256 + 32x32 tokens, d=128, batch 4: paper's masks (block-sparse; dense) vs "
                    "full, fp32", 2, 5),
    "caption:64": ("caption 64 shapes renders greedily (the shipped model, or its size with random weights)", 1, 5),
    "dvae:encode": ("dVAE encode, batch 64", 2, 10),
    "dvae:decode": ("dVAE decode, batch 64", 2, 10),
    "dvae:train": ("dVAE training step, batch 8", 3, 10),
    # GPU only (tools/gpu_check.sh): the paper's stream of 256 + 1024 tokens
    "gpu:attention": ("row/column/conv masks at 1280 tokens, FlexAttention vs dense SDPA, fwd+bwd, bf16", 3, 20),
    "gpu:generate": ("generate 16 images at 256 + 1024 tokens, bench-300m, bf16, KV cache", 1, 3),
}
CPU_CASES = tuple(n for n in CASES if not n.startswith("gpu:"))
PEER_CASES = ("train:full", "train:axial", "vae_train", "gen:full:nocache", "gen:full:manual_cache",
              "gen:full:cfg3_nocache", "gen:full:manual_cache:64")
# (label, our case, peer case, target speed-up or None): speed-ups are peer time / our time.
COMPARISONS = (
    ("training step, fp32", "train:full:fp32", "train:full", 1.1),
    ("training step, bf16 autocast", "train:full:bf16", "train:full", 2.0),
    ("training step, paper masks, bf16", "train:paper:bf16", "train:full", 2.0),
    ("generate 4 images vs its generate.py path (no cache)", "gen:cached", "gen:full:nocache", 25.0),
    ("generate 4 images vs its cache really used", "gen:cached", "gen:full:manual_cache", 3.0),
    ("generate 4 images, cond_scale 3, vs its guided path", "gen:guided", "gen:full:cfg3_nocache", 40.0),
    ("64 candidates for one prompt, reranked, vs its cache at batch 64 + its CLIP", "gen:candidates",
     "gen:full:manual_cache:64", 1.5),
    ("dVAE training step (different architectures)", "dvae:train", "vae_train", None),
)


# -- measurement ---------------------------------------------------------------------------------------
def _busy_seconds() -> float:
    """CPU seconds the whole machine has been busy (all cores, steal included)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")  # everything but idle and iowait


def _own_seconds() -> float:
    t = os.times()
    return t.user + t.system


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _wait_quiet() -> None:
    deadline = time.monotonic() + float(os.environ.get("BENCH_MAX_WAIT", "30"))
    while time.monotonic() < deadline:
        b, o = _busy_seconds(), _own_seconds()
        time.sleep(0.5)
        if (_busy_seconds() - b - (_own_seconds() - o)) / 0.5 < CLEAN_CORES:
            return


def timed(fn: Callable[[], Any], warmup: int, runs: int) -> dict[str, Any]:
    """Warm-up, then timed calls of fn until `runs` were clean (at most 2 * runs + 2 calls)."""
    for _ in range(warmup):
        fn()
    walls, foreign = [], []
    while sum(f < CLEAN_CORES for f in foreign) < runs and len(walls) < 2 * runs + 2:
        _wait_quiet()
        b, o, t = _busy_seconds(), _own_seconds(), time.perf_counter()
        fn()
        wall = time.perf_counter() - t
        walls.append(wall)
        foreign.append(max(0.0, _busy_seconds() - b - (_own_seconds() - o)) / wall)
    clean = [w for w, f in zip(walls, foreign) if f < CLEAN_CORES]
    return {"median_s": statistics.median(clean or walls), "min_s": min(clean or walls), "clean": bool(clean),
            "runs_s": [round(w, 4) for w in walls], "foreign_cores": [round(f, 2) for f in foreign]}


# -- the cases (each in its own process) -----------------------------------------------------------------
def _setup(threads: int) -> Any:
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    return torch


def _model_cfg(schedule: str) -> Any:
    from dalle.config import from_dict
    from dalle.train.config import load_yaml
    from dalle.transformer.model import DALLEConfig

    return from_dict(DALLEConfig, {**load_yaml(CONFIG)["model"], "attn_schedule": schedule}, "model")


def case_peak(dtype_name: str, warmup: int, runs: int) -> dict[str, Any]:
    """The best square product (1024 or 2048) of two libraries: torch.mm (MKL for fp32 on a CPU) and, where
    this torch has it, oneDNN's packed product (the kernel of the decoding steps). On an AMD CPU with AVX-512
    MKL's fp32 product reached less than half of oneDNN's (docs/performance.md), so a peak from torch.mm
    alone overstates every share of it."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    best: dict[str, Any] = {}
    by_library: dict[str, float] = {}
    for n in (1024, 2048):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        fns = {"torch.mm": lambda a=a, b=b: torch.mm(a, b)}
        packed = _onednn_packed(b.t().contiguous(), n)
        if packed is not None:
            fns["onednn"] = lambda a=a, w=packed: torch.ops.mkldnn._linear_pointwise(a, w, None, "none", [], "")
        for library, fn in fns.items():
            with torch.inference_mode():
                r = timed(fn, warmup, runs)
            r["gflops"] = 2 * n**3 / r["median_s"] / 1e9
            by_library[library] = max(by_library.get(library, 0.0), r["gflops"])
            if r["gflops"] > best.get("gflops", 0):
                best = {**r, "n": n, "library": library}
    return {**best, **{f"{k}_gflops": v for k, v in by_library.items()}}


def _onednn_packed(weight: Any, rows: int) -> Any:
    """`weight` (out, in) packed for oneDNN's product of `rows` rows, or None where this torch build has no
    such private op or it fails (then the peak is torch.mm's alone)."""
    import torch

    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight, rows)
    except RuntimeError:
        return None


def _trainer(schedule: str, precision: str, run_dir: str) -> tuple[Any, Any]:
    from dalle.config import from_dict
    from dalle.train.config import TrainConfig, load_yaml
    from dalle.train.engine import Trainer
    from dalle.train.tasks.transformer import DALLEObjective
    from dalle.transformer.model import DALLE
    from tools.bench_train import SyntheticTask

    cfg = _model_cfg(schedule)
    train = from_dict(TrainConfig, {**load_yaml(CONFIG)["train"], "precision": precision}, "train")
    trainer = Trainer(SyntheticTask(DALLE(cfg), DALLEObjective()), train, run_dir, resume="never", progress=False)
    return trainer, cfg


def _batch(cfg: Any, size: int, start: int = 0) -> dict[str, Any]:
    """Samples start .. start + size - 1 of tools/bench_train.py's random tokens, as one batch."""
    from torch.utils.data import default_collate

    from tools.bench_train import RandomTokens

    data = RandomTokens(cfg)
    return default_collate([data[i] for i in range(start, start + size)])


def case_train(schedule: str, precision: str, warmup: int, runs: int) -> dict[str, Any]:
    from dalle.transformer.model import training_flops_per_token

    with tempfile.TemporaryDirectory() as tmp:
        trainer, cfg = _trainer(schedule, precision, tmp)
        batch = _batch(cfg, trainer.cfg.batch_size)
        fixed = iter(lambda: dict(batch), None)  # the same batch each step, as the peer's benchmark does
        losses: list[float] = []
        r = timed(lambda: losses.append(trainer.train_step(fixed)[0]["loss"]), warmup, runs)
        trainer.close()
    tokens = trainer.cfg.batch_size * cfg.seq_len
    flops = sum(training_flops_per_token(cfg)) * tokens
    return {**r, "tokens_per_s": tokens / r["median_s"], "model_gflops": flops / r["median_s"] / 1e9,
            "first_loss": losses[0], "last_loss": losses[-1]}


def case_masks(precision: str, warmup: int, runs: int) -> dict[str, Any]:
    """Both schedules in one process, one step of each in turn: the machine's drift hits both alike."""
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {s: _trainer(s, precision, f"{tmp}/{s}")[0] for s in ("full", "paper")}
        cfg = trainers["full"].task.model.config
        batch = _batch(cfg, trainers["full"].cfg.batch_size)
        walls: dict[str, list[float]] = {"full": [], "paper": []}
        for i in range(warmup + runs):
            for name, trainer in trainers.items():
                _wait_quiet()
                t = time.perf_counter()
                trainer.train_step(iter([dict(batch)]))
                if i >= warmup:
                    walls[name].append(time.perf_counter() - t)
        for trainer in trainers.values():
            trainer.close()
    full, paper = statistics.median(walls["full"]), statistics.median(walls["paper"])
    return {"median_s": paper, "full_s": full, "paper_s": paper, "paper_over_full": paper / full,
            "runs_s": {k: [round(w, 4) for w in v] for k, v in walls.items()}}


def case_parity(warmup: int, runs: int, steps: int = 40) -> dict[str, Any]:
    import torch

    curves = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)  # both precisions start from the same weights
        with tempfile.TemporaryDirectory() as tmp:
            trainer, cfg = _trainer("full", precision, tmp)
            n = trainer.cfg.batch_size
            batches = [_batch(cfg, n, k * n) for k in range(4)]  # a tiny set the model can start to memorise
            stream = (dict(batches[i % 4]) for i in range(steps))
            curves[precision] = [trainer.train_step(stream)[0]["loss"] for _ in range(steps)]
            trainer.close()
    rel = [abs(a - b) / a for a, b in zip(curves["fp32"], curves["bf16"])]
    return {"steps": steps, "fp32": curves["fp32"], "bf16": curves["bf16"], "max_rel_diff": max(rel),
            "final_rel_diff": rel[-1]}


def case_gen(schedule: str, cached: bool, cond_scale: float, warmup: int, runs: int) -> dict[str, Any]:
    import torch

    from dalle.transformer.model import DALLE
    from dalle.transformer.sampling import sample
    from dvae.model import DiscreteVAE, DVAEConfig

    cfg = _model_cfg(schedule)
    model, dvae = DALLE(cfg).eval(), DiscreteVAE(DVAEConfig(**DVAE)).eval()
    text = torch.randint(cfg.text_vocab_size, (GEN_BATCH, cfg.text_seq_len))
    top_k = max(1, int(TOP_K_FRACTION * cfg.image_vocab_size))

    def generate() -> None:
        codes = sample(model, text, top_k=top_k, cond_scale=cond_scale, use_cache=cached,
                       generator=torch.Generator().manual_seed(0))
        dvae.decode(codes.view(GEN_BATCH, cfg.image_grid_size, cfg.image_grid_size))

    r = timed(generate, warmup, runs)
    return {**r, "image_tokens_per_s": GEN_BATCH * cfg.image_seq_len / r["median_s"],
            "ms_per_token_step": 1000 * r["median_s"] / cfg.image_seq_len}


def case_dvae(what: str, warmup: int, runs: int) -> dict[str, Any]:
    import torch

    from dvae.losses import mse_loss
    from dvae.model import DiscreteVAE, DVAEConfig

    model = DiscreteVAE(DVAEConfig(**DVAE))
    images = torch.rand(64 if what != "train" else 8, 3, 64, 64)
    if what == "train":
        opt = torch.optim.AdamW(model.parameters(), lr=3e-4)

        def step() -> None:
            _, stats = model(images, 1.0)
            mse_loss(images, stats).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        r = timed(step, warmup, runs)
    else:
        model.eval()
        codes = model.encode(images)
        r = timed((lambda: model.encode(images)) if what == "encode" else (lambda: model.decode(codes)), warmup, runs)
    return {**r, "images_per_s": len(images) / r["median_s"]}


def _cuda_timed(fn: Callable[[], Any], warmup: int, runs: int) -> dict[str, Any]:
    import torch

    for _ in range(warmup):
        fn()
    walls = []
    for _ in range(runs):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        walls.append(time.perf_counter() - t)
    return {"median_s": statistics.median(walls), "min_s": min(walls), "runs_s": [round(w, 5) for w in walls]}


def case_gpu_attention(warmup: int, runs: int) -> dict[str, Any]:
    import torch

    from dalle.transformer.attention import attend, block_sparsity

    b, h, d, text_len, grid = 8, 16, 64, 256, 32
    out: dict[str, Any] = {"shape": f"B={b} H={h} L={text_len + grid * grid} D={d}"}
    for kind in ("row", "column", "conv"):
        qkv = [torch.randn(b, h, text_len + grid * grid, d, device="cuda", dtype=torch.bfloat16,
                           requires_grad=True) for _ in range(3)]
        for backend in ("flex", "sdpa"):
            def step(qkv: list = qkv, kind: str = kind, backend: str = backend) -> None:
                attend(*qkv, kind=kind, text_len=text_len, grid=grid, backend=backend).sum().backward()

            out[f"{kind}:{backend}_ms"] = 1000 * _cuda_timed(step, warmup, runs)["median_s"]
        out[f"{kind}:speedup"] = out[f"{kind}:sdpa_ms"] / out[f"{kind}:flex_ms"]
        out[f"{kind}:tiles_skipped"] = block_sparsity(kind, text_len, grid)
    return out


def case_gpu_generate(warmup: int, runs: int, batch: int = 16) -> dict[str, Any]:
    import torch

    from dalle.config import from_dict
    from dalle.train.config import load_yaml
    from dalle.transformer.model import DALLE, DALLEConfig
    from dalle.transformer.sampling import sample

    cfg = from_dict(DALLEConfig, load_yaml(ROOT / "configs/dalle/bench-300m.yaml")["model"], "model")
    model = DALLE(cfg).to("cuda", torch.bfloat16).eval()
    text = torch.randint(cfg.text_vocab_size, (batch, cfg.text_seq_len), device="cuda")
    r = _cuda_timed(lambda: sample(model, text, top_k=256), warmup, runs)
    return {**r, "params_m": sum(p.numel() for p in model.parameters()) / 1e6, "batch": batch,
            "image_tokens_per_s": batch * cfg.image_seq_len / r["median_s"],
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30, "card": torch.cuda.get_device_name()}


def run_case(name: str, threads: int) -> dict[str, Any]:
    _, warmup, runs = CASES[name]
    torch = _setup(threads)
    kind, *rest = name.split(":")
    if name in ("gen:candidates", "paper:decode", "paper:train", "caption:64"):  # tools/bench_cases.py
        from tools import bench_cases

        fn = {"gen:candidates": bench_cases.case_candidates, "paper:decode": bench_cases.case_paper_decode,
              "paper:train": bench_cases.case_paper_train, "caption:64": bench_cases.case_caption}[name]
        return {**fn(warmup, runs), "peak_rss_mib": peak_rss_mib(), "threads": torch.get_num_threads()}
    if kind == "gpu":
        return case_gpu_attention(warmup, runs) if rest[0] == "attention" else case_gpu_generate(warmup, runs)
    if kind == "peak":
        out = case_peak(rest[0], warmup, runs)
    elif kind == "train":
        out = case_train(rest[0], rest[1], warmup, runs)
    elif kind == "masks":
        out = case_masks(rest[0], warmup, runs)
    elif kind == "parity":
        out = case_parity(warmup, runs)
    elif kind == "gen":
        schedule = "paper" if rest[0] == "paper" else "full"
        out = case_gen(schedule, rest[-1] != "uncached", COND_SCALE if rest[0] == "guided" else 1.0, warmup, runs)
    else:
        out = case_dvae(rest[0], warmup, runs)
    return {**out, "peak_rss_mib": peak_rss_mib(), "threads": torch.get_num_threads()}


# -- the driver ----------------------------------------------------------------------------------------
def _subprocess_json(cmd: list[str], env: dict[str, str], marker: str) -> dict[str, Any]:
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    line = next((x for x in p.stdout.splitlines() if x.startswith(marker)), None)
    if p.returncode or line is None:
        return {"error": f"exit code {p.returncode}", "stderr_tail": p.stderr[-2000:]}
    return json.loads(line[len(marker):])


def run_ours(name: str, threads: int, max_wait: float) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "BENCH_MAX_WAIT": str(max_wait)}
    return _subprocess_json([sys.executable, __file__, "--case", name, "--threads", str(threads)], env, "@@BENCH@@")


def run_peer(name: str, python: str, threads: int) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    r = _subprocess_json([python, str(PEER_SCRIPT), "--case", name], env, "@@JSON@@")
    if "time_s" in r:  # the peer script's own layout -> ours
        r = {"median_s": r["time_s"]["median"], "min_s": r["time_s"]["min"], "clean": r["time_s_is_clean"],
             "runs_s": r["runs_s"], "foreign_cores": r["foreign_cores_per_run"], "peak_rss_mib": r["peak_rss_mib"]}
    return r


def machine() -> dict[str, Any]:
    import torch

    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M")}


def _figure(r: dict[str, Any]) -> str:
    if "error" in r:
        return "error: " + r["error"]
    if "gflops" in r:
        libraries = [f"{k.removesuffix('_gflops')} {v:.0f}" for k, v in r.items() if k.endswith("_gflops")]
        return f"{r['gflops']:.0f} GFLOP/s" + (f" ({', '.join(libraries)})" if len(libraries) > 1 else "")
    from tools.bench_cases import figure

    if (text := figure(r)) is not None:
        return text + ("" if r.get("clean", True) else " (contended)")
    if "row:speedup" in r:
        return ", ".join(f"{k}: flex {r[f'{k}:flex_ms']:.2f} ms vs sdpa {r[f'{k}:sdpa_ms']:.2f} ms "
                         f"({r[f'{k}:speedup']:.1f}x, {r[f'{k}:tiles_skipped']:.0%} tiles skipped)"
                         for k in ("row", "column", "conv"))
    if "paper_over_full" in r:
        return (f"paper {r['paper_s']:.3f} s vs full {r['full_s']:.3f} s: "
                f"{100 * (r['paper_over_full'] - 1):+.1f}% {'(no slower)' if r['paper_over_full'] <= 1 else ''}")
    if "max_rel_diff" in r:
        return f"max rel. loss diff {r['max_rel_diff']:.4f} over {r['steps']} steps"
    extra = ""
    for key, unit in (("tokens_per_s", "tokens/s"), ("image_tokens_per_s", "image tokens/s"),
                      ("images_per_s", "images/s")):
        if key in r:
            extra = f", {r[key]:,.0f} {unit}"
    if "model_gflops" in r:
        extra += f", {r['model_gflops']:.0f} GFLOP/s"
    return f"{r['median_s']:.3f} s{extra}" + ("" if r.get("clean", True) else " (contended)")


def markdown(results: dict[str, Any]) -> str:
    ours, peer = results["ours"], results.get("peer", {})
    peak = {k: ours.get(f"peak:{k}", {}).get("gflops") for k in ("fp32", "bf16")}
    lines = ["| case | median (ours) | peak RSS MiB |", "|---|---|---|"]
    for name, r in ours.items():
        share = ""
        if "model_gflops" in r and peak["fp32"]:
            ref = peak["bf16" if name.endswith("bf16") else "fp32"]
            share = f" ({100 * r['model_gflops'] / ref:.0f}% of the {'bf16' if name.endswith('bf16') else 'fp32'} peak)"
        lines.append(f"| {name}: {CASES[name][0]} | {_figure(r)}{share} | {r.get('peak_rss_mib', 0):.0f} |")
    if peer:
        lines += ["", "| comparison | ours s | peer s | speed-up | target | RSS ours / peer MiB |",
                  "|---|---|---|---|---|---|"]
        for label, mine, theirs, target in COMPARISONS:
            a, b = ours.get(mine, {}), peer.get(theirs, {})
            if "median_s" not in a or "median_s" not in b:
                continue
            ratio = b["median_s"] / a["median_s"]
            verdict = "" if target is None else f">= {target:g}x {'met' if ratio >= target else 'NOT met'}"
            lines.append(f"| {label} | {a['median_s']:.3f} | {b['median_s']:.3f} | {ratio:.1f}x | {verdict} "
                         f"| {a['peak_rss_mib']:.0f} / {b['peak_rss_mib']:.0f} |")
    return "\n".join(lines)


def run_order(names: list[str], peer_names: list[str]) -> list[tuple[str, str]]:
    """Each peer case runs right before the first of ours that is compared with it: the machine's speed
    drifts by 10-20% over minutes, and adjacent runs see the same machine. The rest of the peer's last."""
    order: list[tuple[str, str]] = []
    for name in names:
        for theirs in [c[2] for c in COMPARISONS if c[1] == name]:
            if theirs in peer_names and ("peer", theirs) not in order:
                order.append(("peer", theirs))
        order.append(("ours", name))
    return order + [("peer", n) for n in peer_names if ("peer", n) not in order]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=cli.HelpFormatter)
    p.add_argument("--cases", default=",".join(CPU_CASES),
                   help="comma-separated cases of ours to run: " + ", ".join(CASES))
    p.add_argument("--threads", type=cli.positive_int, default=2,
                   help="torch threads in every case, >= 1 (the peer's figures use 2)")
    p.add_argument("--max-wait", type=cli.non_negative_float, default=30.0,
                   help="seconds to wait for other processes to go quiet before each timed run (0: never)")
    p.add_argument("--compare-peer", action="store_true",
                   help="also run the peer's cases, each right before the case of ours it is compared with")
    p.add_argument("--peer-python", default=os.path.expanduser("~/.cache/dalle-peer-venv/bin/python"),
                   help="python of the peer's venv (benchmarks/peer/setup_venv.sh builds it)")
    p.add_argument("--peer-cases", default=",".join(PEER_CASES), help="peer cases to run with --compare-peer")
    p.add_argument("--json", default="runs/bench/results.json", help="write every figure here (after each case)")
    p.add_argument("--markdown", default="", help="also write the tables to this file")
    cli.add_overwrite_flag(p, "existing --json and --markdown files")
    p.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case in this process
    cli.add_debug_flag(p)
    args = p.parse_args(argv)
    if args.case:
        print("@@BENCH@@" + json.dumps(run_case(args.case, args.threads)), flush=True)
        return 0
    names = [n for n in args.cases.split(",") if n]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        p.error(f"unknown case(s) {unknown}; choose from {list(CASES)}")
    for flag, path in (("--json", args.json), ("--markdown", args.markdown)):
        if path:  # an earlier run's figures are kept unless replaced on purpose
            cli.refuse_existing(flag, path, overwrite=args.overwrite)
    peer_names = [n for n in args.peer_cases.split(",") if n] if args.compare_peer else []
    if peer_names and not Path(args.peer_python).exists():
        p.error(f"--peer-python {args.peer_python} does not exist; build the peer's venv with "
                "`bash benchmarks/peer/setup_venv.sh` or pass its python")
    results: dict[str, Any] = {"machine": machine(), "ours": {}, "peer": {}}
    order = run_order(names, peer_names)
    from tqdm import tqdm

    for side, name in (bar := tqdm(order, desc="bench", unit="case")):
        bar.set_postfix_str(f"{side} {name}")
        if side == "ours":
            r = run_ours(name, args.threads, args.max_wait)
        else:
            r = run_peer(name, args.peer_python, args.threads)
        results[side][name] = r
        tqdm.write(f"{side:>4} {name:<22} {_figure(r)}")
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    table = markdown(results)
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    cli.run(main)
