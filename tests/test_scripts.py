"""sluice's Redis scripts as files (shared/lua/): each compiles in a real Redis, pieces are pasted
once and placeholders filled, and every script is one some module runs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import redis

from shared.scripts import LUA, ScriptError, compose, lua
from tests.procs import RedisServer

ROOT = Path(__file__).parents[1]
SCRIPTS = sorted(path.stem for path in LUA.glob("*.lua"))
PIECES = sorted(path.stem for path in (LUA / "lib").glob("*.lua"))


@pytest.fixture(scope="module")
def r(redis_server: RedisServer) -> redis.Redis:
    return redis_server.client()


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_script_compiles_in_redis(r: redis.Redis, name: str) -> None:
    sha = r.script_load(lua(name))
    assert r.script_exists(sha) == [True]


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_piece_is_pasted_once_and_every_placeholder_filled(name: str) -> None:
    text = lua(name)
    assert "--! include" not in text
    assert "${" not in text
    defined = re.findall(r"^local function (\w+)", text, re.M)
    assert len(defined) == len(set(defined)), defined


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_script_opens_with_what_it_takes(name: str) -> None:
    """The house style (STYLE.md, BullMQ): a comment naming its KEYS and ARGV, bound to named
    locals, before any code."""
    source = (LUA / f"{name}.lua").read_text()
    header = "".join(line for line in source.splitlines(keepends=True) if line.startswith("--"))
    if "KEYS[" in source:
        assert "KEYS:" in header, name
    if "ARGV[" in source:
        assert "ARGV:" in header, name


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_script_that_appends_rings_the_bells_before_it_returns(name: str) -> None:
    """A hub learns of new entries from the bells (api/hub.py): an append no bell names would
    reach a reader only once something else made the hub read its stream."""
    body = (LUA / f"{name}.lua").read_text()
    if "fenced_append(" not in body:
        return
    last_append = body.rindex("fenced_append(")
    last_return = max(m.start() for m in re.finditer(r"^return\b", body, re.M))
    assert last_append < body.find("ring_bells()", last_append) < last_return, name


def test_every_script_and_piece_is_used() -> None:
    code = "\n".join(
        path.read_text()
        for folder in ("api", "worker", "shared")
        for path in (ROOT / folder).rglob("*.py")
    )
    sources = "\n".join(path.read_text() for path in LUA.rglob("*.lua"))
    unused = [name for name in SCRIPTS if f'lua("{name}")' not in code]
    never_included = [name for name in PIECES if f"--! include {name}\n" not in sources]
    assert (unused, never_included) == ([], [])


def test_a_missing_piece_or_constant_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "lib").mkdir()
    (tmp_path / "broken.lua").write_text("--! include nothing_here\nreturn 1\n")
    (tmp_path / "unknown.lua").write_text("return '${NO_SUCH_KEY}'\n")

    with pytest.raises(ScriptError, match="nothing_here"):
        compose(tmp_path / "broken.lua")
    with pytest.raises(ScriptError, match="NO_SUCH_KEY"):
        compose(tmp_path / "unknown.lua")
