"""What the llama backend takes from llama-cpp-python's ctypes bindings, checked against the pinned
release. ctypes checks no argument count past `argtypes` on Linux (an extra argument is passed
on, silently) and takes any attribute set on a Structure (a renamed field is set on the Python
object, never on the C struct): a binding that changed under us would mis-bind without an error.

The tables below are what worker/backends/batcher.py and worker/backends/llama.py rely on, as the
pinned llama.h declares it. A failure here means the bindings changed: read llama.h of the new
release before changing either side.
"""

from __future__ import annotations

import ast
import ctypes
import tomllib
from ctypes import (
    POINTER,
    c_bool,
    c_char_p,
    c_float,
    c_int8,
    c_int32,
    c_size_t,
    c_uint32,
    c_void_p,
)
from pathlib import Path
from typing import Any

import llama_cpp
import pytest

ROOT = Path(__file__).parents[1]
USERS = [ROOT / "worker" / "backends" / "batcher.py", ROOT / "worker" / "backends" / "llama.py"]
"""The modules that call llama.cpp through llama_cpp."""
PINNED = "0.3.36"

# C types, spelt as llama.h spells them
SAMPLER = POINTER(llama_cpp.llama_sampler)
TOKENS = POINTER(c_int32)
MODEL = CONTEXT = VOCAB = MEMORY = c_void_p  # opaque pointers

FUNCTIONS: dict[str, tuple[tuple[Any, ...], Any]] = {
    # name: (argument types, return type)
    "llama_backend_init": ((), None),
    "llama_model_default_params": ((), llama_cpp.llama_model_params),
    "llama_model_load_from_file": ((c_char_p, llama_cpp.llama_model_params), MODEL),
    "llama_model_get_vocab": ((MODEL,), VOCAB),
    "llama_model_chat_template": ((MODEL, c_char_p), c_char_p),
    "llama_model_free": ((MODEL,), None),
    "llama_context_default_params": ((), llama_cpp.llama_context_params),
    "llama_init_from_model": ((MODEL, llama_cpp.llama_context_params), CONTEXT),
    "llama_n_ctx_seq": ((CONTEXT,), c_uint32),
    "llama_get_memory": ((CONTEXT,), MEMORY),
    "llama_free": ((CONTEXT,), None),
    "llama_memory_seq_rm": ((MEMORY, c_int32, c_int32, c_int32), c_bool),
    "llama_memory_seq_cp": ((MEMORY, c_int32, c_int32, c_int32, c_int32), None),
    "llama_get_logits_ith": ((CONTEXT, c_int32), POINTER(c_float)),
    "llama_vocab_n_tokens": ((VOCAB,), c_int32),
    "llama_vocab_is_eog": ((VOCAB, c_int32), c_bool),
    "llama_vocab_bos": ((VOCAB,), c_int32),
    "llama_vocab_eos": ((VOCAB,), c_int32),
    "llama_tokenize": ((VOCAB, c_char_p, c_int32, TOKENS, c_int32, c_bool, c_bool), c_int32),
    "llama_token_to_piece": ((VOCAB, c_int32, c_char_p, c_int32, c_int32, c_bool), c_int32),
    "llama_batch_init": ((c_int32, c_int32, c_int32), llama_cpp.llama_batch),
    "llama_batch_free": ((llama_cpp.llama_batch,), None),
    "llama_decode": ((CONTEXT, llama_cpp.llama_batch), c_int32),
    "llama_sampler_chain_default_params": ((), llama_cpp.llama_sampler_chain_params),
    "llama_sampler_chain_init": ((llama_cpp.llama_sampler_chain_params,), SAMPLER),
    "llama_sampler_chain_add": ((SAMPLER, SAMPLER), None),
    "llama_sampler_chain_remove": ((SAMPLER, c_int32), SAMPLER),
    "llama_sampler_free": ((SAMPLER,), None),
    "llama_sampler_init_logit_bias": (
        (c_int32, c_int32, POINTER(llama_cpp.llama_logit_bias)),
        SAMPLER,
    ),
    "llama_sampler_init_top_k": ((c_int32,), SAMPLER),
    "llama_sampler_init_penalties": ((c_int32, c_int32, c_float, c_float, c_float), SAMPLER),
    "llama_sampler_init_greedy": ((), SAMPLER),
    "llama_sampler_init_top_p": ((c_float, c_size_t), SAMPLER),
    "llama_sampler_init_min_p": ((c_float, c_size_t), SAMPLER),
    "llama_sampler_init_temp": ((c_float,), SAMPLER),
    "llama_sampler_init_dist": ((c_uint32,), SAMPLER),
    "llama_sampler_sample": ((SAMPLER, CONTEXT, c_int32), c_int32),
}

STRUCTS: dict[str, tuple[str, dict[str, Any]]] = {
    # struct: (the variable the backends name it by, {field: type} of the fields they write)
    "llama_context_params": (
        "params",
        {
            "n_ctx": c_uint32,
            "n_batch": c_uint32,
            "n_ubatch": c_uint32,
            "n_seq_max": c_uint32,
            "n_threads": c_int32,
            "n_threads_batch": c_int32,
            "no_perf": c_bool,
        },
    ),
    "llama_batch": (
        "batch",
        {
            "n_tokens": c_int32,
            "token": TOKENS,
            "pos": POINTER(c_int32),
            "n_seq_id": POINTER(c_int32),
            "seq_id": POINTER(POINTER(c_int32)),
            "logits": POINTER(c_int8),
        },
    ),
    # built positionally: llama_logit_bias(token, bias)
    "llama_logit_bias": ("", {"token": c_int32, "bias": c_float}),
}

OTHERS: dict[str, Any] = {
    "llama_token": c_int32,
    "LLAMA_DEFAULT_SEED": 0xFFFFFFFF,
    # type hints only (typing.NewType)
    "llama_context_p": None,
    "llama_vocab_p": None,
}


def trees() -> list[ast.Module]:
    return [ast.parse(path.read_text(), str(path)) for path in USERS]


def is_llama_cpp(node: ast.AST) -> bool:
    return isinstance(node, ast.Name) and node.id == "llama_cpp"


def used_names() -> set[str]:
    """Every `llama_cpp.<name>` the backends read."""
    return {
        node.attr
        for tree in trees()
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and is_llama_cpp(node.value)
    }


def calls() -> list[tuple[str, ast.Call]]:
    """Every call of `llama_cpp.<name>(...)` in the backends."""
    return [
        (node.func.attr, node)
        for tree in trees()
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and is_llama_cpp(node.func.value)
    ]


def where(call: ast.Call) -> str:
    return f"line {call.lineno}: {ast.unparse(call)}"


def test_installed_llama_cpp_python_is_the_pinned_release() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert f"llama-cpp-python=={PINNED}" in pyproject["project"]["dependencies"]
    assert llama_cpp.__version__ == PINNED


def test_every_name_the_backends_use_is_in_this_contract_and_no_other() -> None:
    # a struct may come only from a function's result, never named
    assert used_names() - set(STRUCTS) == set(FUNCTIONS) | set(OTHERS)


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_c_function_binding_has_the_signature_the_backends_rely_on(name: str) -> None:
    function = getattr(llama_cpp, name)
    argtypes, restype = FUNCTIONS[name]
    assert isinstance(function, ctypes._CFuncPtr), f"{name} is not a C function of the library"
    assert tuple(function.argtypes) == argtypes
    assert function.restype == restype


def test_every_call_passes_as_many_arguments_as_the_c_function_takes() -> None:
    found = calls()
    assert found
    wrong = [
        where(call)
        for name, call in found
        if name in FUNCTIONS
        and (
            call.keywords
            or any(isinstance(a, ast.Starred) for a in call.args)
            or len(call.args) != len(FUNCTIONS[name][0])
        )
    ]
    assert wrong == []


@pytest.mark.parametrize("name", sorted(STRUCTS))
def test_struct_fields_the_backends_use_have_their_c_types(name: str) -> None:
    declared = dict(getattr(llama_cpp, name)._fields_)
    _, fields = STRUCTS[name]
    assert {field: declared.get(field) for field in fields} == fields


def test_llama_logit_bias_is_built_with_its_fields_in_order() -> None:
    _, fields = STRUCTS["llama_logit_bias"]
    assert llama_cpp.llama_logit_bias._fields_ == list(fields.items())
    built = [call for name, call in calls() if name == "llama_logit_bias"]
    assert built
    assert [where(c) for c in built if c.keywords or len(c.args) != len(fields)] == []


def test_the_backends_write_only_the_struct_fields_in_this_contract() -> None:
    """`params.n_seq_max = ...` on a field llama.h renamed would set a Python attribute."""
    written: dict[str, set[str]] = {variable: set() for variable, _ in STRUCTS.values()}
    for tree in trees():
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute | ast.Subscript):
                continue
            target = node.value if isinstance(node, ast.Subscript) else node
            stored = isinstance(node.ctx, ast.Store)
            if (
                stored
                and isinstance(target, ast.Attribute)
                and isinstance(target.value, ast.Name)
                and target.value.id in written
            ):
                written[target.value.id].add(target.attr)
    for variable, fields in STRUCTS.values():
        if variable:
            assert written[variable], f"no field of `{variable}` is written: is it renamed?"
            assert written[variable] <= set(fields), variable


@pytest.mark.parametrize("name", sorted(OTHERS))
def test_other_names_the_backends_read(name: str) -> None:
    value = getattr(llama_cpp, name)
    if OTHERS[name] is not None:
        assert value == OTHERS[name]
