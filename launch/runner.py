"""What every launcher shares: ``--help`` with the config keys, one-line errors, ``--dry_run``.

A launcher defines its absl flags (``--config`` via ml_collections ``config_flags``) and calls
``run(main, ...)``. Errors a user can fix (a mistyped key, a bad value, a malformed input file)
end the run with ONE line on stderr and a non-zero exit code; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any, Callable, Mapping

from absl import app, flags

from cosa_jax.config_tools import ConfigError, describe, flat_keys, suggestion

ROOT = Path(__file__).resolve().parents[1]
HELP_ARGS = ("-h", "--help", "--helpshort", "--helpfull", "-?")

flags.DEFINE_bool("dry_run", False, "Build and validate the config and its inputs, run nothing.")
flags.DEFINE_bool("debug", False, "Show the full traceback of an error instead of one line.")
FLAGS = flags.FLAGS

EXIT_CONFIG = 2  # a usage or config error
EXIT_INPUT = 1  # an input or runtime error


class UserError(Exception):
    """An error the user fixes by changing an input or a flag; printed as one line."""


def one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    if isinstance(err, (KeyError, AttributeError, TypeError, IndexError)) or text == type(err).__name__:
        text = f"{type(err).__name__}: {text}"
    return text


def fail(prog: str, message: str, code: int) -> None:
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def _config_arg(argv: list[str], default: str | None) -> str | None:
    for i, a in enumerate(argv):
        if a.startswith("--config="):
            return a.split("=", 1)[1]
        if a == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return default


def load_config_file(spec: str):
    """``configs/X.py`` or ``configs/X.py:ARG`` -> its ``get_config()``; errors are UserErrors."""
    path, _, arg = spec.partition(".py:")
    path = path if path.endswith(".py") else path + ".py"
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--config {spec}: no such config file (shipped ones: "
                        f"{', '.join(sorted(str(q.relative_to(ROOT)) for q in (ROOT / 'configs').glob('*.py')))})")
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    mod_spec = importlib.util.spec_from_file_location(f"_cosa_config_{p.stem}", p)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    if not hasattr(mod, "get_config"):
        raise UserError(f"--config {spec}: the file defines no get_config()")
    return mod.get_config(arg) if arg else mod.get_config()


def check_overrides(argv: list[str], cfg: Any) -> None:
    """Each ``--config.KEY=`` names a key the config has; else one line with the closest key."""
    known = flat_keys(cfg)
    for a in argv:
        if not a.startswith("--config."):
            continue
        key = a[len("--config."):].split("=", 1)[0]
        if key in known or any(k.startswith(key + ".") for k in known):
            continue
        # inside a free-form section (e.g. an endpoint's sampling params) any key may be added
        head = key.rpartition(".")[0]
        if head and head in known and isinstance(known[head], Mapping):
            continue
        raise ConfigError(f"unknown key config.{key}{suggestion(key, known, 'config.')}")


def print_help(prog: str, doc: str, cfg: Any, docs: Mapping[str, str], fallback: Mapping[str, str],
               module_flags: list[str]) -> None:
    print(f"usage: {prog} [--config FILE] [--config.KEY=VALUE ...] [--dry_run] [--debug]\n")
    print((doc or "").strip() + "\n")
    fl = [FLAGS[name] for name in module_flags + ["dry_run", "debug"] if name in FLAGS]
    if fl:
        print("flags:")
        for f in fl:
            print(f"  --{f.name:<20} {f.help} (default: {f.default_as_str or repr(f.default)})")
        print()
    print("config keys (--config.KEY=VALUE; the value shown is the config file's):")
    merged = dict(docs)
    for key in flat_keys(cfg):
        if key not in merged and key.rpartition(".")[2] in fallback:
            merged[key] = fallback[key.rpartition(".")[2]]
    print(describe(cfg, merged))


def run(main: Callable[[Any], Any], *, prog: str, doc: str, default_config: Callable[[], Any],
        validate: Callable[[Any], None] | None = None, config_default: str | None = None,
        docs: Mapping[str, str] | None = None, fallback_docs: Mapping[str, str] | None = None,
        module_flags: tuple[str, ...] = (), argv: list[str] | None = None,
        define_config: Callable[[], Any] | None = None) -> None:
    """Parse flags, check the config, then ``main(config)``; user errors end in one line.

    ``main`` reads ``FLAGS.dry_run`` itself: a dry run validates everything it would read."""
    argv = list(sys.argv if argv is None else argv)
    if config_default and _config_arg(argv[1:], None) is None:
        # given here, not as the flag's default: config_flags would parse the overrides at import
        argv.insert(1, f"--config={config_default}")
    args = argv[1:]
    debug = "--debug" in args
    from cosa_jax.config_tools import key_docs
    docs = dict(key_docs(default_config)) | dict(docs or {})
    try:
        spec = _config_arg(args, config_default)
        cfg = load_config_file(spec) if spec else default_config()
        if any(a in HELP_ARGS for a in args):
            print_help(prog, doc, cfg, docs, fallback_docs or {}, list(module_flags))
            sys.exit(0)
        check_overrides(args, cfg)
        if define_config is not None:  # config_dict flags parse the overrides when defined
            define_config()
    except SystemExit:
        raise
    except Exception as err:  # noqa: BLE001 - a CLI prints the reason, --debug the traceback
        if debug:
            raise
        fail(prog, one_line(err), EXIT_CONFIG)

    def parse(av):
        try:
            return FLAGS(av)
        except Exception as err:  # noqa: BLE001
            if debug:
                raise
            fail(prog, one_line(err) + "; see --help", EXIT_CONFIG)

    def wrapped(_argv):
        cfg = FLAGS.config if "config" in FLAGS else default_config()
        try:
            if cfg is None:
                raise UserError("--config is required (see --help)")
            if validate is not None:
                validate(cfg)
            return main(cfg)
        except (SystemExit, KeyboardInterrupt):
            raise
        except Exception as err:  # noqa: BLE001
            if FLAGS.debug:
                raise
            if isinstance(err, (ConfigError, UserError)) or type(err).__name__.endswith("ConfigError"):
                fail(prog, one_line(err), EXIT_CONFIG)  # ends in its suggestion
            fail(prog, one_line(err) + " (--debug for the traceback)", EXIT_INPUT)

    app.run(wrapped, argv=argv, flags_parser=parse)
