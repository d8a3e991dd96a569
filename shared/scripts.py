"""sluice's Redis scripts: one `.lua` file each in shared/lua/, read once.

A script opens with a comment naming each KEYS and ARGV entry and what it returns, and binds
them to named locals. Pieces several scripts share live in shared/lua/lib/, each written once,
and a script pulls one in with a line `--! include <name>` (a piece included twice is pasted
once: pieces include what they use). `${NAME}` stands for the key name or prefix `NAME` of
shared/protocol.py, so that no key is spelled twice.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

from shared import protocol

LUA = Path(__file__).parent / "lua"
_INCLUDE = re.compile(r"^--! include (\w+)[ \t]*$", re.M)
_CONSTANT = re.compile(r"\$\{(\w+)\}")
CONSTANTS = {
    name: getattr(protocol, name)
    for name in (
        "ACTIVE_KEY",
        "BELLS_KEEP_MS",
        "BELLS_KEY",
        "DUE_KEY",
        "JOBS_PREFIX",
        "KEY_STREAMS_PREFIX",
        "KEY_TOKENS_PREFIX",
        "META_PREFIX",
        "ORPHANS_KEY",
        "STREAM_PREFIX",
        "TOKENS_KEY",
        "WORKER_BUSY_KEY",
        "WORKER_LOOPS_KEY",
        "WORKER_MODELS_KEY",
        "WORKER_SLOTS_KEY",
        "WORKERS_KEY",
    )
}
"""What `${NAME}` may stand for."""


class ScriptError(ValueError):
    """A script that names a piece or a constant that does not exist."""


@cache
def lua(name: str) -> str:
    """The script `shared/lua/<name>.lua`, its pieces pasted in and its constants filled."""
    return compose(LUA / f"{name}.lua")


def compose(path: Path) -> str:
    """The script at `path`, with the pieces of the `lib` folder beside it."""
    return _fill(_paste(path, path.parent / "lib", set()))


def _paste(path: Path, lib: Path, pasted: set[str]) -> str:
    def piece(match: re.Match[str]) -> str:
        name = match[1]
        if name in pasted:
            return ""
        pasted.add(name)
        found = lib / f"{name}.lua"
        if not found.is_file():
            raise ScriptError(f"{path.name} includes {name!r}: no {found}")
        return _paste(found, lib, pasted)

    return _INCLUDE.sub(piece, path.read_text())


def _fill(text: str) -> str:
    def constant(match: re.Match[str]) -> str:
        if match[1] not in CONSTANTS:
            raise ScriptError(f"no constant {match[1]!r} for a script")
        return str(CONSTANTS[match[1]])

    return _CONSTANT.sub(constant, text)
