"""``python -m recipes <command>`` and the ``layerwise`` console command: one table maps each command to its function.

``fit``/``validate``/``test`` run through the LightningCLI (:mod:`recipes.cli`), ``list`` prints the packaged
recipes, and the other commands are in :mod:`recipes.commands`. Every ``--config NAME`` is first resolved to a file
(a packaged recipe's name works from any directory).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import partial

from recipes.checkpoints import CheckpointError
from recipes.cli import print_recipes, quiet_third_party_warnings, resolve_config_args, run_lightning
from recipes.commands import demo, diversity, export, restore
from recipes.commands.checks import CommandError

# command name -> its function, which takes the arguments after the name
COMMANDS: dict[str, Callable[[list[str]], object]] = {
    "fit": partial(run_lightning, "fit"),
    "validate": partial(run_lightning, "validate"),
    "test": partial(run_lightning, "test"),
    "list": print_recipes,
    "demo": demo.run_demo,
    "export": export.main,
    "restore": restore.main,
    "diversity": diversity.main,
}
LIGHTNING_COMMANDS = ("fit", "validate", "test", "demo")


def main(argv: list[str] | None = None) -> None:
    """Run the command ``argv[0]`` with the rest of ``argv``; ``argv`` defaults to the process's command line."""
    quiet_third_party_warnings()
    args = resolve_config_args(sys.argv[1:] if argv is None else argv)
    if argv is None:  # DDP workers start again from the process's command line: resolved like this one
        sys.argv[1:] = args
    if args and args[0] in COMMANDS and args[0] not in LIGHTNING_COMMANDS:
        try:
            COMMANDS[args[0]](args[1:])
        except (CommandError, CheckpointError) as err:
            print(f"python -m recipes {args[0]}: error: {err}", file=sys.stderr)
            raise SystemExit(2) from None
    elif args and args[0] in COMMANDS:
        COMMANDS[args[0]](args[1:])
    else:  # no command, --help, or a misspelled one: LightningCLI's own help or error
        run_lightning(None, args)


if __name__ == "__main__":
    main()
