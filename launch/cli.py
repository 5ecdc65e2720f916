"""``cosa-jax COMMAND [flags]``: one entry point for every launcher (``python -m launch.X`` also works).

Commands: train, synthesize, serve, evaluate, demo, taxonomy, judge-agreement.
``cosa-jax COMMAND --help`` lists that command's flags and config keys.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "train": ("launch.train", "SFT or DPO (configs/demo.py, configs/cosalign_llama31_8b_*.py)"),
    "synthesize": ("launch.synthesize", "CoSAlign preference-data synthesis (configs/synth_*.py)"),
    "serve": ("launch.serve", "OpenAI-compatible server or policy gateway (configs/serve.py)"),
    "evaluate": ("launch.evaluate", "CoSA-Score evaluation (configs/eval_*.py)"),
    "demo": ("launch.demo", "the whole pipeline offline on the embedded model (make demo)"),
    "taxonomy": ("launch.taxonomy", "derive a risk taxonomy from prompts (embed, cluster, name)"),
    "judge-agreement": ("launch.judge_agreement", "agreement of a judge with reference verdicts"),
}


def usage() -> str:
    rows = "\n".join(f"  {name:<16} {what}" for name, (_, what) in COMMANDS.items())
    return f"usage: cosa-jax COMMAND [--config FILE] [--config.KEY=VALUE ...]\n\ncommands:\n{rows}\n"


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        sys.exit(0 if argv else 2)
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        import difflib
        close = difflib.get_close_matches(name, COMMANDS, n=1)
        hint = f"; did you mean {close[0]}?" if close else f"; commands: {', '.join(COMMANDS)}"
        print(f"cosa-jax: error: unknown command {name!r}{hint}", file=sys.stderr)
        sys.exit(2)
    module_name = COMMANDS[name][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name != module_name:
            raise
        print(f"cosa-jax: error: command {name!r} is not available in this installation "
              f"({module_name} is missing)", file=sys.stderr)
        sys.exit(2)
    module.main([f"cosa-jax {name}", *rest])


if __name__ == "__main__":
    main()
