"""``python -m matten <command>``: one entry point, one module per command.

Each command module defines ``add_arguments(parser)`` and ``main(args)``; only the chosen one is imported, so
``python -m matten info`` does not pay for torch.compile or diffusers pipelines it does not use.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# command -> (module, one-line help)
COMMANDS = {
    "sample": ("matten.sample", "generate a clip (embedded demo model unless --checkpoint) and write GIF/MP4"),
    "train": ("matten.train", "train a Matten model on a video folder or the synthetic dataset"),
    "info": ("matten.info", "parameter table of every preset and variant"),
    "flops": ("matten.flops", "FLOPs of every preset and variant in each convention, beside the paper's numbers"),
    "bench": ("matten.bench", "kernel and model benchmarks on the GPU (JSON + PNG under benchmarks/results/)"),
    "selfcheck": ("matten_kernels.selfcheck", "check every kernel backend against its reference on this machine"),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m matten", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    argv = sys.argv[1:] if argv is None else list(argv)
    known, rest = parser.parse_known_args(argv[:1])
    module = importlib.import_module(COMMANDS[known.command][0])
    command_parser = argparse.ArgumentParser(prog=f"python -m matten {known.command}",
                                             description=COMMANDS[known.command][1])
    module.add_arguments(command_parser)
    args = command_parser.parse_args(argv[1:])
    return int(module.main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
