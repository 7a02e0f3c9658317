"""The one entry point: `picochat <command>`. Each command lives in its own module, which registers its
argparse subcommand with add_parser(subparsers) and sets `func` to the function that runs it."""
import argparse
import importlib
import sys

from picochat.common import UserError

# module names under picochat/, in the order their commands are listed in --help
COMMAND_MODULES = ("speedrun", "data", "tokenizer", "pretrain", "sft", "rl", "evaluate", "chat", "server", "report",
                   "export", "importer")


def build_parser():
    parser = argparse.ArgumentParser(
        prog="picochat",
        description="Train your own small ChatGPT: tokenizer -> pretrain -> SFT -> RL -> chat. "
                    "Run `picochat <command> --help` for the flags of each stage.")
    sub = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(f"picochat.{name}").add_parser(sub)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
