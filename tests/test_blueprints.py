"""Blueprint IR, symbolic dims and the builder: every builtin builds on the hosts it claims, and bad
blueprints are refused with located messages before anything is allocated."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from esper_core.blueprints.builder import ResolveError, build, resolve
from esper_core.blueprints.dims import DimError, evaluate
from esper_core.blueprints.host import HostSpec
from esper_core.blueprints.library import BUILTIN_DIR, BlueprintLibrary, load_blueprint
from esper_core.errors import ConfigError

LIBRARY = BlueprintLibrary.discover()
HOSTS = {
    "linear": [nn.Linear(10, 20), nn.Linear(64, 3)],
    "conv1d": [nn.Conv1d(3, 8, 5, padding=2), nn.Conv1d(8, 16, 3, stride=2), nn.Conv1d(4, 4, 4, padding="same"),
               nn.Conv1d(4, 6, 3, padding=2, dilation=2, padding_mode="circular")],
    "conv2d": [nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.Conv2d(4, 6, 1),
               nn.Conv2d(4, 4, 5, stride=2, padding=2), nn.Conv2d(6, 6, 3, padding=2, dilation=2),
               nn.Conv2d(3, 5, 3, padding="same", padding_mode="reflect"), nn.Conv2d(4, 4, (2, 4), padding="same")],
}
INPUTS = {"linear": (), "conv1d": (13,), "conv2d": (11, 9)}


def test_builtin_library_has_the_five_blueprints():
    assert set(LIBRARY.names()) >= {"lowrank_adapter", "wide_mlp", "residual_conv", "dwsep_conv", "se_gate"}


@pytest.mark.parametrize("name", sorted(p.stem for p in BUILTIN_DIR.glob("*.yaml")))
def test_builtin_blueprints_match_every_host_shape_they_can_serve(name):
    blueprint = LIBRARY.get(name).blueprint
    for host in HOSTS[blueprint.host]:
        spec = HostSpec.of(host)
        try:
            resolved = resolve(blueprint, spec, rank=4)
        except ResolveError as exc:  # avg_pool cannot mirror dilation or uneven 'same' padding
            assert name == "se_gate" and (spec.dilation != (1, 1) or spec.kernel == (2, 4)), exc
            continue
        seed = build(resolved)
        x = torch.randn(3, spec.in_features, *INPUTS[spec.kind])
        assert seed(x).shape == host(x).shape
        assert sum(p.numel() for p in seed.parameters()) == resolved.params


def test_dim_expressions_are_arithmetic_only():
    env = {"in": 12, "out": 8, "rank": 4}
    assert evaluate("max(rank, out // 2) * 2 + in - 1", env) == 19
    for bad, why in [("__import__('os')", "unsupported"), ("width", "unknown dimension"), ("out // 0", "division"),
                     ("out ** 2", "unsupported"), ("in.real", "unsupported"), ("(", "cannot parse")]:
        with pytest.raises(DimError, match=why):
            evaluate(bad, env)


def _write(tmp_path, text: str):
    path = tmp_path / "bp.yaml"
    path.write_text(text)
    return path


def test_unknown_op_is_reported_with_file_line_and_field(tmp_path):
    path = _write(tmp_path, "name: x\nhost: linear\nops:\n  - {op: linear, in: in, out: out}\n  - {op: warp}\n")
    with pytest.raises(ConfigError) as info:
        load_blueprint(path)
    message = str(info.value)
    assert message.startswith(f"{path}:5: ops.1") and "warp" in message


def test_huge_width_is_refused_before_allocation(tmp_path):
    path = _write(tmp_path, "name: huge\nhost: linear\nops:\n  - {op: linear, in: in, out: 1099511627776}\n"
                            "  - {op: linear, in: 1099511627776, out: out}\n")
    loaded = load_blueprint(path)
    started = time.perf_counter()
    with pytest.raises(ResolveError) as info:
        resolve(loaded.blueprint, HostSpec.of(nn.Linear(4, 4)), rank=2)
    assert time.perf_counter() - started < 1.0
    assert str(loaded.problem(info.value)) == f"{path}:4: ops.0.out: resolves to 1099511627776, outside 1..1048576"


def test_unresolvable_dim_names_its_line(tmp_path):
    path = _write(tmp_path, "name: x\nhost: linear\ndims:\n  hidden: depth * 2\nops:\n"
                            "  - {op: linear, in: in, out: out}\n")
    with pytest.raises(ConfigError) as info:  # no host could resolve it: refused when the file is loaded
        load_blueprint(path)
    assert str(info.value.problems[0]).startswith(f"{path}:4: dims.hidden: unknown dimension 'depth'")


def test_channel_chain_and_output_size_are_checked(tmp_path):
    path = _write(tmp_path, "name: x\nhost: linear\nops:\n  - {op: linear, in: in, out: rank}\n"
                            "  - {op: linear, in: out, out: out}\n")
    loaded = load_blueprint(path)
    with pytest.raises(ResolveError) as info:
        resolve(loaded.blueprint, HostSpec.of(nn.Linear(4, 6)), rank=2)
    assert str(loaded.problem(info.value)) == f"{path}:5: ops.1.in: expects 6 but receives 2"


def test_conv_branch_must_land_on_the_host_grid(tmp_path):
    path = _write(tmp_path, "name: x\nhost: conv2d\nops:\n  - {op: conv2d, in: in, out: out, kernel: 1}\n")
    loaded = load_blueprint(path)
    with pytest.raises(ResolveError, match="output grid"):
        resolve(loaded.blueprint, HostSpec.of(nn.Conv2d(3, 3, 3, stride=2, padding=1)), rank=2)


def test_blueprint_for_the_wrong_host_kind_is_refused():
    with pytest.raises(ResolveError, match="grows on linear layers"):
        resolve(LIBRARY.get("lowrank_adapter").blueprint, HostSpec.of(nn.Conv2d(3, 3, 3)), rank=2)


def test_canonical_ir_ignores_formatting(tmp_path):
    a = _write(tmp_path, "name: x\nhost: linear\nops:\n  - {op: linear, in: in, out: out}\n")
    b = tmp_path / "b.yaml"
    b.write_text("# comment\nops:\n  - op: linear\n    out: out\n    in: in\n    bias: true\nhost: linear\nname: x\n")
    assert load_blueprint(a).blueprint.digest() == load_blueprint(b).blueprint.digest()


@pytest.mark.parametrize("written, shown", [("true", "true, a boolean"), ("8.0", "8.0, a number with a fraction"),
                                            ("[8]", "[8], a list")])
def test_a_size_that_is_not_an_integer_or_expression_is_one_located_error(tmp_path, written, shown):
    """`out: true` once resolved to a 1-wide layer (pydantic's lax int), and `8.5` gave two lines, one
    per member of the int-or-expression union."""
    path = _write(tmp_path, f"name: x\nhost: linear\ndims:\n  h: {written}\nops:\n"
                            f"  - {{op: linear, in: in, out: {written}}}\n")
    with pytest.raises(ConfigError) as info:
        load_blueprint(path)
    expected = f"must be an integer or an expression such as `rank * 2` (got {shown})"
    assert [str(p) for p in info.value.problems] == [f"{path}:4: dims.h: {expected}",
                                                     f"{path}:6: ops.0.out: {expected}"]


def test_blueprint_types_are_strict(tmp_path):
    """As in recipes: YAML decides a type by its spelling, so `bias: "no"` is an error, not `True`."""
    path = _write(tmp_path, 'name: x\nversion: true\nhost: linear\nops:\n'
                            '  - {op: linear, in: in, out: out, bias: "no"}\n')
    with pytest.raises(ConfigError) as info:
        load_blueprint(path)
    assert [str(p) for p in info.value.problems] == [
        f"{path}:2: version: must be an integer (got true, a boolean)",
        f"{path}:5: ops.0.bias: must be true or false (got 'no', a string)"]


def test_a_dim_may_not_redefine_in_out_or_rank_or_be_unusable(tmp_path):
    """`dims: {rank: 3}` once silently replaced seeds.rank (and `in: 5` the host's width, reported later as a
    chain mismatch); a dim named `my-dim` or `2x` could never be referred to."""
    path = _write(tmp_path, "name: x\nhost: linear\ndims:\n  rank: 3\n  my-dim: 4\n  lambda: 2\n  h: rank * 2\n"
                            "ops:\n  - {op: linear, in: in, out: h}\n  - {op: linear, in: h, out: out}\n")
    with pytest.raises(ConfigError) as info:
        load_blueprint(path)
    lines = [str(p) for p in info.value.problems]
    assert len(lines) == 3
    assert lines[0] == (f"{path}:4: dims.rank: 'rank' is set by the host and the recipe (in, out, rank); "
                        "give this dim another name")
    assert lines[1].startswith(f"{path}:5: dims.my-dim: 'my-dim' is not a name an expression can use")
    assert lines[2].startswith(f"{path}:6: dims.lambda: 'lambda' is not a name an expression can use")


def test_two_user_blueprints_of_one_name_are_an_error_naming_both(tmp_path):
    """Which of two files named `samename` a recipe got once depended on file order, silently."""
    first, second = tmp_path / "one", tmp_path / "two"
    for directory in (first, second):
        directory.mkdir()
    text = "name: samename\nhost: linear\nops:\n  - {op: linear, in: in, out: out, init: zeros}\n"
    (first / "a.yaml").write_text(text)
    (first / "b.yaml").write_text(text)
    (second / "c.yaml").write_text(text)
    with pytest.raises(ConfigError) as info:
        BlueprintLibrary.discover([first, second])
    assert [str(p) for p in info.value.problems] == [
        f"{first / 'b.yaml'}:1: name: blueprint 'samename' is also defined in {first / 'a.yaml'}; "
        "give one of them another name",
        f"{second / 'c.yaml'}:1: name: blueprint 'samename' is also defined in {first / 'b.yaml'}; "
        "give one of them another name"]
    # one directory named twice is not a duplicate, and a user file may still replace a builtin
    assert BlueprintLibrary.discover([second, second]).get("samename").path == (second / "c.yaml").resolve()
    (second / "c.yaml").write_text(text.replace("samename", "lowrank_adapter"))
    assert BlueprintLibrary.discover([second]).get("lowrank_adapter").path == (second / "c.yaml").resolve()


def test_a_missing_key_or_an_empty_file_has_a_line(tmp_path):
    """A missing top-level key was reported as `bp.yaml: name: Field required`, with no line; an empty file
    as one such line per required key."""
    path = _write(tmp_path, "# my adapter\n\nhost: linear\nops:\n  - {op: linear, in: in, out: out}\n")
    with pytest.raises(ConfigError) as info:
        load_blueprint(path)
    assert [str(p) for p in info.value.problems] == [f"{path}:3: name: Field required"]
    empty = _write(tmp_path, "# nothing yet\n")
    with pytest.raises(ConfigError) as info:
        load_blueprint(empty)
    assert [str(p) for p in info.value.problems] == [
        f"{empty}:1: the file is empty: a blueprint needs at least name, host and ops"]


def test_a_misspelt_or_missing_op_names_the_op_key_and_the_closest_op(tmp_path):
    """These were pydantic's "Input tag 'linaer' found using 'op' does not match any of the expected tags"
    and "Unable to extract tag using discriminator 'op'", at `ops.N` rather than its `op` key."""
    path = _write(tmp_path, "name: x\nhost: linear\nops:\n  - {op: linaer, in: in, out: rank}\n"
                            "  - {in: rank, out: out}\n")
    with pytest.raises(ConfigError) as info:
        load_blueprint(path)
    known = "avg_pool, conv1d, conv2d, dropout, gelu, linear, relu, se_gate, sigmoid, silu, tanh"
    assert [str(p) for p in info.value.problems] == [
        f"{path}:4: ops.0.op: unknown op 'linaer', did you mean 'linear'? (known: {known})",
        f"{path}:5: ops.1.op: missing: every entry needs `op` (one of: {known})"]


def test_a_blueprint_directory_yields_yml_files_too(tmp_path):
    """`esper compile mine.yml` accepted the file, yet a recipe's seeds.blueprint_dirs ignored it and called
    the blueprint unknown: only `*.yaml` was read."""
    (tmp_path / "mine.yml").write_text("name: mine\nhost: linear\nops:\n"
                                       "  - {op: linear, in: in, out: out, init: zeros}\n")
    assert BlueprintLibrary.discover([tmp_path]).get("mine").path == (tmp_path / "mine.yml").resolve()


def test_an_unknown_key_of_an_op_lists_that_ops_keys(tmp_path):
    """Unknown keys of a recipe list the allowed ones with a did-you-mean; those of a blueprint op said
    only "unknown key", and a bad `init` was pydantic's own wording."""
    path = _write(tmp_path, "name: x\nhost: linear\nops:\n"
                            "  - {op: linear, in: in, out: out, init: zero, bais: false}\n"
                            "  - {op: relu, inplace: true}\n")
    with pytest.raises(ConfigError) as info:
        load_blueprint(path)
    assert [str(p) for p in info.value.problems] == [
        f"{path}:4: ops.0.init: must be one of 'default', 'zeros', 'small' (got 'zero')",
        f"{path}:4: ops.0.bais: unknown key, did you mean 'bias'? (allowed: op, in, out, bias, init)",
        f"{path}:5: ops.1.inplace: unknown key (allowed: op)"]


def test_every_broken_file_of_a_blueprint_directory_is_reported(tmp_path):
    """Discovery stopped at the first file that did not load, so a directory was fixed one error per run."""
    (tmp_path / "a.yaml").write_text("name: a\nhost: linear\nops:\n  - {op: linaer}\n")
    (tmp_path / "b.yaml").write_text("name: b\nhost: linera\nops:\n  - {op: relu}\n")
    with pytest.raises(ConfigError) as info:
        BlueprintLibrary.discover([tmp_path])
    assert [(p.source, p.line, p.field) for p in info.value.problems] == [
        (str(tmp_path / "a.yaml"), 4, "ops.0.op"), (str(tmp_path / "b.yaml"), 2, "host")]


def test_blueprints_list_shows_a_blueprint_the_example_host_cannot_resolve_with_the_reason(tmp_path) -> None:
    """`h: rank - 10` is valid at seeds.rank 16 but not at the listing's example rank 8: the list used to
    stop at exit 2 and list nothing; it now lists every blueprint, that one with why, and exits 0."""
    import json

    from run_helpers import esper

    (tmp_path / "narrow.yaml").write_text("name: narrow\nhost: linear\ndims:\n  h: rank - 10\nops:\n"
                                          "  - {op: linear, in: in, out: h}\n"
                                          "  - {op: linear, in: h, out: out, init: zeros}\n", encoding="utf-8")
    listed = esper("blueprints", "list", "--dir", tmp_path, "--json")
    assert listed.exit_code == 0, listed.output
    rows = {row["name"]: row for row in json.loads(listed.stdout)}
    assert set(BlueprintLibrary.discover([]).names()) < set(rows)
    assert rows["narrow"]["example_params"] is None
    assert rows["narrow"]["example_error"] == \
        f"{tmp_path / 'narrow.yaml'}:4: dims.h: resolves to -2, outside 1..1048576"
    assert all(row["example_error"] is None and row["example_params"] > 0
               for name, row in rows.items() if name != "narrow")
    shown = esper("blueprints", "show", "narrow", "--dir", tmp_path, "--rank", "16", "--json")
    assert shown.exit_code == 0 and json.loads(shown.stdout)["example"]["dims"]["h"] == 6
