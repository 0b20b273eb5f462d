"""The installed commands (setup.py's console_scripts, e.g. `dalle-train`): each runs one tool's `main`
under `dalle.cli.run`, so a user's mistake prints one `error:` line instead of a traceback (--debug shows it),
as `python tools/X.py` does. The tool is imported only when its command runs.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import import_module

from dalle.cli import run


def _command(tool: str) -> Callable[[], None]:
    def command() -> None:
        run(import_module(f"dalle_tools.{tool}").main)
    command.__name__ = command.__qualname__ = tool
    return command


make_shapes = _command("make_shapes")
make_shards = _command("make_shards")
train_dvae = _command("train_dvae")
eval_dvae = _command("eval_dvae")
train_bpe = _command("train_bpe")
pretokenize = _command("pretokenize")
train_dalle = _command("train_dalle")
estimate = _command("estimate")
train_reranker = _command("train_reranker")
bundle = _command("bundle")
eval_shapes = _command("eval_shapes")
eval_captions = _command("eval_captions")
eval_fid = _command("eval_fid")
export = _command("export")
bench_train = _command("bench_train")
feedback = _command("feedback")
train_feedback = _command("train_feedback")
feedback_loop = _command("feedback_loop")
eval_feedback = _command("eval_feedback")
plot_feedback = _command("plot_feedback")
train_all = _command("train_all")


if __name__ == "__main__":  # a part of another command, not one itself
    raise SystemExit("tools/console.py holds the installed dalle-* commands: run one of them, or a tool "
                     "such as python tools/train_all.py --help")
