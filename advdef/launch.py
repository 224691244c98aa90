"""`advdef train|evaluate --nproc N`: re-run the same command under torchrun with N processes.

Training ranks form one DistributedDataParallel group; evaluation ranks each take a shard.

The child command is rebuilt from the options the CLI parsed (those given on the command line, in
their canonical spelling), not from sys.argv, so it is the same whether the CLI was started from
a shell or called in-process; torchrun's standalone rendezvous picks a free port on this machine.
Typer's context is read through the attributes click-style contexts have (typer vendors its own
click), so nothing here imports a private module.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Collection
from typing import Any

import torch

from advdef.errors import UserError
from advdef.training.distributed import launched_world_size


def given_arguments(ctx: Any, exclude: Collection[str] = ()) -> list[str]:
    """The command line options of `ctx` (a typer.Context) that the user gave, as arguments that
    reproduce them."""
    arguments: list[str] = []
    for parameter in ctx.command.params:
        name = parameter.name
        if name is None or name in exclude or getattr(parameter, "param_type_name", None) != "option":
            continue
        source = ctx.get_parameter_source(name)
        if source is None or source.name != "COMMANDLINE":
            continue
        value = ctx.params[name]
        if getattr(parameter, "multiple", False):  # repeatable options (`--run A --run B`)
            for item in value or ():
                arguments += [parameter.opts[0], str(item)]
            continue
        if parameter.is_flag:
            if value:
                arguments.append(parameter.opts[0])
            elif parameter.secondary_opts:
                arguments.append(parameter.secondary_opts[0])
            continue
        arguments += [parameter.opts[0], str(value)]
    return arguments


def torchrun_command(nproc: int, arguments: list[str]) -> list[str]:
    """`python -m torch.distributed.run --standalone --nproc-per-node N -m advdef -- ARGS`.

    torchrun's parser still matches options after the module against its own abbreviations (an
    ambiguous `--n`, `--run`, `--nproc` stops it); `--` ends its options and is not passed on.
    """
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "advdef", "--", *arguments]


def check_nproc(nproc: int) -> None:
    """A one-line UserError for an --nproc that cannot work here."""
    if nproc < 2:
        raise UserError(f"--nproc must be at least 2 (got {nproc}); leave it out to run in one process")
    if launched_world_size() > 1:
        raise UserError("--nproc re-launches under torchrun, but this process already runs under torchrun; drop --nproc")
    if not torch.distributed.is_available():
        raise UserError("--nproc needs torch.distributed, which this torch build lacks")


def relaunch(ctx: Any, nproc: int, command: list[str]) -> int:
    """Run `command` (e.g. ["train"]) plus the user's options minus --nproc under torchrun with
    `nproc` processes; returns its exit code."""
    check_nproc(nproc)
    arguments = command + given_arguments(ctx, exclude={"nproc"})
    return subprocess.run(torchrun_command(nproc, arguments), check=False).returncode
