"""``python -m modelkeep.run script.py [args]`` (or ``-m module [args]``): run a program with every
``torch.load`` in it read safely by modelkeep (``patch_torch_load``), without changing its code.

``--trust NAME`` (repeatable) trusts more classes; ``--on-unknown placeholder`` rescues tensors
from files that name other classes. The program sees its own ``sys.argv``.
"""

from __future__ import annotations

import argparse
import runpy
import sys

from modelkeep import patching


def main(argv: list[str] | None = None) -> None:
    """Parse the options, patch ``torch.load``, run the script or module as ``__main__``.

    Args:
        argv: the command line after ``python -m modelkeep.run`` (default ``sys.argv[1:]``).

    Raises:
        SystemExit: usage errors (exit 2), or the program's own exit.
    """
    parser = argparse.ArgumentParser(prog="python -m modelkeep.run", description=__doc__.splitlines()[0])
    parser.add_argument("--trust", action="append", default=[], metavar="NAME")
    parser.add_argument("--on-unknown", choices=["error", "placeholder"], default="error")
    parser.add_argument("-m", dest="module", metavar="MODULE", help="run a module, as python -m does")
    parser.add_argument("target", nargs=argparse.REMAINDER, help="script.py [args] (or the module's args)")
    args = parser.parse_args(argv)
    if args.module is None and not args.target:
        parser.error("name a script, or -m MODULE")
    with patching.patch_torch_load(tuple(args.trust), on_unknown=args.on_unknown):
        if args.module is not None:
            sys.argv = [args.module, *args.target]
            runpy.run_module(args.module, run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(args.target)
            runpy.run_path(args.target[0], run_name="__main__")


if __name__ == "__main__":
    main()
