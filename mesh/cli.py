"""The ``mesh`` command. Flags are generated from the config dataclasses, so every flag has a ``MESH_*`` twin.

Services are imported lazily: ``mesh bootstrap`` never imports the peer, and ``mesh --help`` imports no torch.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib
import inspect
import logging
import sys
import typing
from typing import Any, Callable, Sequence

from mesh import __version__
from mesh.config import (
    ApiConfig,
    BootstrapConfig,
    DoctorConfig,
    ExportConfig,
    PeerConfig,
    StatusConfig,
    UpConfig,
    load_file,
    resolve,
)
from mesh.errors import MeshError

logger = logging.getLogger(__name__)

COMMANDS: dict[str, tuple[type, str, str]] = {
    # name: (config class, "module:function", one-line help)
    "bootstrap": (BootstrapConfig, "bootstrap.main:run", "run the bootstrap node: the first DHT peer everyone joins"),
    "peer": (PeerConfig, "peer.main:run", "join a run (or create it with --task) and train"),
    "up": (UpConfig, "mesh.up:run", "start a bootstrap node and N peers on this machine, with live progress"),
    "doctor": (DoctorConfig, "mesh.doctor:run", "preflight: daemon, address, bootstrap, reachability"),
    "api": (ApiConfig, "api.main:run", "run the coordinator: REST status API, status page, runs and membership"),
    "status": (StatusConfig, "mesh.status:run", "print the coordinator's runs and peers as tables"),
    "export": (ExportConfig, "mesh.export:run", "a run's model as safetensors (from a checkpoint, or the live mesh's newest state)"),
}


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each dataclass field, read from the source (subclasses override their parents)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass) or klass is object:
            continue
        body = ast.parse(inspect.getsource(klass)).body[0].body
        for node, following in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant)
            ):
                docs[node.target.id] = " ".join(str(following.value.value).split())
    return docs


def add_config_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else None
        shown = ",".join(default) if isinstance(default, tuple) else default
        help_text = f"{docs.get(f.name, '')} [env MESH_{f.name.upper()}; default {shown if shown not in (None, '', ()) else '-'}]"
        hint = hints[f.name]
        if hint is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif typing.get_origin(hint) is tuple:
            metavar = "KEY=VALUE" if f.name == "task_arg" else "ADDR"
            parser.add_argument(flag, dest=f.name, action="append", default=None, metavar=metavar, help=help_text + " (repeatable)")
        else:
            parser.add_argument(flag, dest=f.name, default=None, metavar=f.name.upper(), help=help_text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mesh", description="A peer-to-peer training mesh on hivemind's DHT.")
    parser.add_argument("--version", action="version", version=f"mesh {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (cls, _target, help_text) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        command.add_argument(
            "--config", dest="config_file", default=None, metavar="FILE", help="TOML or JSON settings file [env MESH_CONFIG]"
        )
        add_config_flags(command, cls)
    return parser


def load_config(command: str, args: argparse.Namespace) -> Any:
    import os
    from pathlib import Path

    cls = COMMANDS[command][0]
    config_file = args.config_file or os.environ.get("MESH_CONFIG") or None
    flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)}
    flags = {k: tuple(v) if isinstance(v, list) else v for k, v in flags.items()}
    return resolve(cls, flags, file=load_file(Path(config_file) if config_file else None, command))


def _target(command: str) -> Callable[[Any], int]:
    module, function = COMMANDS[command][1].split(":")
    return getattr(importlib.import_module(module), function)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load_config(args.command, args)
        from mesh import logs

        logs.configure(config.log_level, config.log_format, role=args.command)
        return int(_target(args.command)(config) or 0)
    except MeshError as err:
        print(f"mesh {args.command}: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
