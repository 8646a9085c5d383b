"""The model directory: damaged, hand-edited or hostile directories get one clear
ModelDirError, never a crash.

Each test copies the tiny export, damages the copy, and checks that loading (or `info`) refuses
it with an error naming the file and the fix. Paths that leave the directory (in the manifest or
in an ONNX graph's external data) must be refused before onnxruntime opens anything: the tests
replace `onnxruntime.InferenceSession` with a tripwire to prove it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    invoke,
    one_line_error,
    private_copy,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from gpt2_onnx.cli import app
from gpt2_onnx.runtime import manifest as mf
from gpt2_onnx.runtime.errors import ModelDirError
from gpt2_onnx.runtime.generator import TextGenerator, load_tokenizer, vocab_fits

PROMPT = "Paris will"
CLI = "import sys; from gpt2_onnx.cli import main; sys.argv[0] = 'gpt2-onnx'; main()"


@pytest.fixture
def model_copy(tmp_path: Path, tiny_dir: Path) -> Path:
    """A full private copy, for tests that write into model.onnx."""
    return Path(shutil.copytree(tiny_dir, tmp_path / "model"))


@pytest.fixture
def no_onnxruntime(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if anything reaches onnxruntime's session constructor."""
    import onnxruntime

    def tripwire(*args: object, **kwargs: object) -> None:
        raise AssertionError("onnxruntime.InferenceSession was reached")

    monkeypatch.setattr(onnxruntime, "InferenceSession", tripwire)


def edit_manifest(model: Path, edit) -> None:
    path = model / mf.MANIFEST_NAME
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))


def refresh(model: Path) -> None:
    """Recompute the manifest's sizes and hashes (so damage gets past the size check)."""
    def edit(doc):
        for name, entry in doc["files"].items():
            path = model / name
            if path.is_file() and not path.is_symlink():
                entry.update(size=path.stat().st_size, sha256=mf.sha256_file(path))

    edit_manifest(model, edit)


def load_error(model: Path) -> str:
    with pytest.raises(ModelDirError) as info:
        TextGenerator.load(model, device="cpu", threads=1)
    return str(info.value)


def greedy_ids(model: Path) -> list[int]:
    gen = TextGenerator.load(model, device="cpu", threads=1)
    return gen.generate(PROMPT, max_new_tokens=6, greedy=True).ids


# ------------------------------------------------------------------------- damaged files


def test_truncated_graph_is_refused_by_size(model_copy: Path, no_onnxruntime: None) -> None:
    model = model_copy
    graph = model / "model.onnx"
    with open(graph, "r+b") as f:
        f.truncate(graph.stat().st_size // 2)
    msg = load_error(model)
    assert "model.onnx" in msg and "truncated" in msg and "re-export" in msg


def test_truncated_graph_with_matching_manifest_is_refused(model_copy: Path) -> None:
    """Sizes and hashes updated to the truncated file: the graph itself must be refused."""
    model = model_copy
    graph = model / "model.onnx"
    with open(graph, "r+b") as f:
        f.truncate(graph.stat().st_size - 1000)
    refresh(model)
    msg = load_error(model)
    assert "model.onnx" in msg


def test_missing_tokenizer(model: Path, no_onnxruntime: None) -> None:
    (model / "tokenizer.json").unlink()
    msg = load_error(model)
    assert "tokenizer.json: missing" in msg and "re-export" in msg


def test_tokenizer_is_a_directory(model: Path, no_onnxruntime: None) -> None:
    (model / "tokenizer.json").unlink()
    (model / "tokenizer.json").mkdir()
    assert "tokenizer.json: not a regular file" in load_error(model)


def test_tokenizer_is_a_fifo_does_not_hang(model: Path, no_onnxruntime: None) -> None:
    (model / "tokenizer.json").unlink()
    os.mkfifo(model / "tokenizer.json")
    assert "tokenizer.json: not a regular file" in load_error(model)


@pytest.mark.parametrize("content", [
    b"{}", b"[]", b"not json at all", b"\x00\xff" * 100, b"[" * 100_000,
    json.dumps({"version": "1.0", "model": {"type": "NoSuchModel"}}).encode(),
])
def test_tokenizer_that_is_not_a_tokenizer(model: Path, content: bytes) -> None:
    (model / "tokenizer.json").write_bytes(content)
    refresh(model)
    msg = load_error(model)
    assert "tokenizer.json" in msg and "not a valid tokenizers file" in msg


def test_sha_mismatch_found_by_check_files_and_cli(model: Path) -> None:
    """Same size, one byte changed: sizes match, so only the sha256 check can see it."""
    config = model / "config.json"
    data = bytearray(config.read_bytes())
    data[10] ^= 0x01
    config.write_bytes(bytes(data))
    mf.read_manifest(model)  # sizes still match: reading is fine
    with pytest.raises(ModelDirError, match=r"sha256 mismatch for config\.json"):
        mf.check_files(model)
    result = CliRunner().invoke(app, ["info", str(model), "--check-files"])
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit)  # a clean exit, not a traceback
    assert "config.json" in result.output and "re-export" in result.output


def test_check_files_passes_on_intact_copy(model: Path) -> None:
    mf.check_files(model)
    result = CliRunner().invoke(app, ["info", str(model), "--check-files"])
    assert result.exit_code == 0, result.output
    assert "match their sha256" in result.output


def test_flipped_weight_byte_loads_but_check_files_names_it(model_copy: Path) -> None:
    model = model_copy
    graph = model / "model.onnx"
    with open(graph, "r+b") as f:
        f.seek(graph.stat().st_size // 2)  # inside the weights
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x40]))
    assert len(greedy_ids(model)) == 6  # loading does not hash (it would cost a full read)
    with pytest.raises(ModelDirError, match=r"sha256 mismatch for model\.onnx"):
        mf.check_files(model)


# ------------------------------------------------------------------------- manifest edited by hand


@pytest.mark.parametrize("edit, expected", [
    (lambda d: d.update(format_version=2), "format_version 2 is not supported"),
    (lambda d: d.update(format_version=True), "format_version True is not supported"),
    (lambda d: d.update(format_version="1"), "format_version '1' is not supported"),
    (lambda d: d.update(format="onnx"), "format is 'onnx'"),
    (lambda d: d["dims"].update(n_layer="2"), "dims.n_layer: expected int, got str"),
    (lambda d: d["dims"].update(n_head=4.0), "dims.n_head: expected int, got float"),
    (lambda d: d["dims"].update(n_positions=10**30), "dims.n_positions: must be in"),
    (lambda d: d["dims"].update(eos_token_id=50257), "eos_token_id: 50257 is not below"),
    (lambda d: d["dims"].update(n_layer=-1), "dims.n_layer: must be in"),
    (lambda d: d.update(variants=[]), "variants: expected dict, got list"),
    (lambda d: d.update(variants={}), "variants: empty"),
    (lambda d: d["variants"]["fp32"].update(data="model.onnx_data"), "data: expected list"),
    (lambda d: d["variants"]["fp32"].update(dtype="int3"), "'int3' is not float32"),
    (lambda d: d["variants"]["fp32"].update(precision="int8"), "differs from its key"),
    (lambda d: d["variants"]["fp32"]["io"].update(kv_layout="ring"), "kv_layout: 'ring'"),
    (lambda d: d["variants"]["fp32"]["io"].update(past_key="{x}"), "io.past_key: '{x}'"),
    (lambda d: d["variants"]["fp32"]["io"].update(present_key="present"), "io.present_key"),
    (lambda d: d["variants"]["fp32"]["io"].update(bogus="x"), "unknown keys ['bogus']"),
    (lambda d: d["variants"]["fp32"]["io"].update(extra_inputs=[1]), "extra_inputs"),
    (lambda d: d["variants"]["fp32"].update(thresholds={"x": "big"}), "finite numbers"),
    (lambda d: d["files"]["config.json"].update(size=-5), "size: must be >= 0"),
    (lambda d: d["files"]["config.json"].update(sha256="abc"), "not 64 lowercase hex"),
    (lambda d: d.update(verify=[1, 2]), "verify: expected null or an object"),
    (lambda d: d.update(versions="torch"), "versions: expected an object"),
    (lambda d: d.pop("dims"), "dims: missing"),
    (lambda d: d.update(tokenizer=None), "tokenizer: expected str, got NoneType"),
])
def test_hand_edited_manifest(model: Path, no_onnxruntime: None, edit, expected: str) -> None:
    edit_manifest(model, edit)
    msg = load_error(model)
    assert expected in msg and "gpt2-onnx.json" in msg
    assert "\n" not in msg


def test_every_problem_listed_at_once(model: Path) -> None:
    def edit(d):
        d["dims"]["n_layer"] = "two"
        d["variants"]["fp32"]["dtype"] = "int3"
        d["files"]["config.json"]["sha256"] = 7

    edit_manifest(model, edit)
    msg = str(pytest.raises(ModelDirError, mf.read_manifest, model).value)
    assert "3 problems" in msg and "n_layer" in msg and "int3" in msg and "sha256" in msg


@pytest.mark.parametrize("text", [
    "[1, 2, 3]", "null", "{", "", "1" * 5000, "[" * 100_000 + "]" * 100_000,
    '{"format": "gpt2-onnx", "format_version": NaN}',
])
def test_manifest_not_an_object(model: Path, text: str) -> None:
    (model / mf.MANIFEST_NAME).write_text(text)
    msg = str(pytest.raises(ModelDirError, mf.read_manifest, model).value)
    assert "gpt2-onnx.json" in msg and "\n" not in msg


def test_manifest_not_utf8_or_unreadable(model: Path) -> None:
    (model / mf.MANIFEST_NAME).write_bytes(b"\xff\xfe{}")
    assert "not valid JSON" in str(pytest.raises(ModelDirError, mf.read_manifest, model).value)


def test_missing_manifest_and_missing_dir(tmp_path: Path) -> None:
    with pytest.raises(ModelDirError, match="not a gpt2-onnx model directory"):
        mf.read_manifest(tmp_path)
    with pytest.raises(ModelDirError, match="no such directory"):
        mf.read_manifest(tmp_path / "nope")


# ------------------------------------------------------------------------- paths leaving the dir


@pytest.mark.parametrize("field, value", [
    ("tokenizer", "../tokenizer.json"),
    ("tokenizer", "/etc/hostname"),
    ("tokenizer", "sub/../../tokenizer.json"),
    ("tokenizer", "tok\x00enizer.json"),
    ("graph", "../model.onnx"),
    ("graph", "/dev/zero"),
    ("data", "../outside.bin"),
    ("files", "../outside.bin"),
])
def test_manifest_paths_outside_refused(model: Path, no_onnxruntime: None, field: str,
                                        value: str) -> None:
    shutil.copy(model / "tokenizer.json", model.parent / "tokenizer.json")
    shutil.copy(model / "model.onnx", model.parent / "model.onnx")
    (model.parent / "outside.bin").write_bytes(b"x" * 16)

    def edit(d):
        if field == "tokenizer":
            d["tokenizer"] = value
        elif field == "graph":
            d["variants"]["fp32"]["graph"] = value
        elif field == "data":
            d["variants"]["fp32"]["data"] = [value]
        else:
            d["files"][value] = {"size": 16, "sha256": "0" * 64}

    edit_manifest(model, edit)
    msg = load_error(model)
    assert "points outside the model directory" in msg and "re-export" in msg


@pytest.mark.parametrize("name", ["tokenizer.json", "model.onnx", "config.json"])
def test_symlink_leaving_the_dir_refused(model: Path, no_onnxruntime: None, name: str) -> None:
    outside = model.parent / f"outside-{name}"
    shutil.move(model / name, outside)
    (model / name).symlink_to(outside)
    assert f"'{name}' points outside the model directory" in load_error(model)


def test_symlink_inside_the_dir_and_symlinked_dir_are_fine(model: Path, tmp_path: Path) -> None:
    """Links that stay inside (or a link to the whole directory) are ordinary deployments."""
    expected = greedy_ids(model)
    shutil.move(model / "tokenizer.json", model / "tok-real.json")
    (model / "tokenizer.json").symlink_to("tok-real.json")
    link = tmp_path / "linked-model"
    link.symlink_to(model, target_is_directory=True)
    assert greedy_ids(link) == expected


def test_symlink_loop_refused(model: Path, no_onnxruntime: None) -> None:
    (model / "tokenizer.json").unlink()
    (model / "tokenizer.json").symlink_to("tokenizer.json")
    assert "tokenizer.json" in load_error(model)


# ------------------------------------------------------------------------- ONNX external data


def to_external_data(model: Path) -> Path:
    """Rewrite the copy's graph with its weights in `model.onnx_data`, manifest updated."""
    import onnx

    proto = onnx.load(str(model / "model.onnx"))
    onnx.save_model(proto, str(model / "model.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="model.onnx_data",
                    size_threshold=1024)

    def edit(doc):
        doc["variants"]["fp32"]["data"] = ["model.onnx_data"]
        doc["files"]["model.onnx_data"] = {"size": 0, "sha256": "0" * 64}

    edit_manifest(model, edit)
    refresh(model)
    return model


def set_locations(graph: Path, location: str) -> None:
    import onnx

    proto = onnx.load(str(graph), load_external_data=False)
    for init in proto.graph.initializer:
        for entry in init.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save_model(proto, str(graph))


def test_external_data_graph_loads_and_matches(model_copy: Path, tiny_dir: Path) -> None:
    model = model_copy
    expected = greedy_ids(tiny_dir)
    to_external_data(model)
    assert mf.graph_external_data(model / "model.onnx") == ["model.onnx_data"]
    assert greedy_ids(model) == expected


@pytest.mark.parametrize("where", ["dotdot", "absolute", "unlisted", "other-file", "empty"])
def test_external_data_location_refused_before_onnxruntime(
        model_copy: Path, no_onnxruntime: None, where: str) -> None:
    model = model_copy
    to_external_data(model)
    outside = model.parent / "stolen.bin"
    shutil.copy(model / "model.onnx_data", outside)
    location = {
        "dotdot": "../stolen.bin",
        "absolute": str(outside),
        "unlisted": "stray.bin",  # inside the directory, but not a listed data file
        "other-file": "tokenizer.json",  # listed in files, but not this variant's data
        "empty": "",
    }[where]
    shutil.copy(model / "model.onnx_data", model / "stray.bin")
    set_locations(model / "model.onnx", location)
    refresh(model)  # hashes agree with the edited graph: only the location check can catch it
    msg = load_error(model)
    assert "model.onnx: external data" in msg and "Refusing to load it" in msg


def test_external_data_symlink_leaving_dir_refused(model_copy: Path, no_onnxruntime: None) -> None:
    model = model_copy
    to_external_data(model)
    outside = model.parent / "stolen.bin"
    shutil.move(model / "model.onnx_data", outside)
    (model / "model.onnx_data").symlink_to(outside)
    assert "'model.onnx_data' points outside the model directory" in load_error(model)


def test_onnxruntime_itself_refuses_escaping_locations(model_copy: Path) -> None:
    """Documents onnxruntime 1.32's own second line of defence (our check runs first)."""
    model = model_copy
    import onnxruntime as ort

    to_external_data(model)
    outside = model.parent / "stolen.bin"
    shutil.copy(model / "model.onnx_data", outside)
    for location in ("../stolen.bin", str(outside)):
        set_locations(model / "model.onnx", location)
        with pytest.raises(Exception, match="External data path validation failed"):
            ort.InferenceSession(str(model / "model.onnx"), providers=["CPUExecutionProvider"])
    set_locations(model / "model.onnx", "model.onnx_data")
    (model / "model.onnx_data").unlink()
    (model / "model.onnx_data").symlink_to(outside)
    with pytest.raises(Exception, match="escapes model directory"):
        ort.InferenceSession(str(model / "model.onnx"), providers=["CPUExecutionProvider"])


def test_scanner_agrees_with_onnx_on_nested_tensors(tmp_path: Path) -> None:
    """Locations in initializers, Constant attributes and If-branch subgraphs, read with the
    wire-format scanner, equal what onnx's own tensor walk finds."""
    from onnx import TensorProto, helper, numpy_helper
    from onnx.external_data_helper import _get_all_tensors

    def ext(name: str, location: str) -> TensorProto:
        tensor = numpy_helper.from_array(np.ones(4, np.float32), name)
        tensor.ClearField("raw_data")
        tensor.data_location = TensorProto.EXTERNAL
        for k, v in (("location", location), ("offset", "0"), ("length", "16")):
            entry = tensor.external_data.add()
            entry.key, entry.value = k, v
        return tensor

    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])
    then_g = helper.make_graph([helper.make_node("Identity", ["t"], ["y"])], "then", [], [out],
                               [ext("t", "then.bin")])
    else_g = helper.make_graph([helper.make_node("Constant", [], ["y"],
                                                 value=ext("c", "else.bin"))], "else", [], [out])
    cond = helper.make_tensor_value_info("cond", TensorProto.BOOL, [])
    graph = helper.make_graph(
        [helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g)],
        "g", [cond], [out], [ext("w", "w.bin")])
    proto = helper.make_model(graph)
    path = tmp_path / "nested.onnx"
    path.write_bytes(proto.SerializeToString())
    reference = {e.value for t in _get_all_tensors(proto) for e in t.external_data
                 if e.key == "location"}
    assert reference == {"w.bin", "then.bin", "else.bin"}
    assert set(mf.graph_external_data(path)) == reference


@pytest.mark.parametrize("content", [b"", b"\x0a\xff\xff\xff\xff\x0f", b'{"not": "onnx"}',
                                     bytes(range(256)) * 8])
def test_graph_that_is_not_protobuf(model_copy: Path, no_onnxruntime: None, content: bytes) -> None:
    model = model_copy
    (model / "model.onnx").write_bytes(content)
    refresh(model)
    msg = load_error(model)
    assert "model.onnx" in msg and ("not a valid ONNX graph" in msg or "empty file" in msg)


def test_corrupted_graph_bytes_never_crash_the_process(model_copy: Path) -> None:
    """Flip bytes across the graph's node section (size unchanged); every load must either work
    or raise ModelDirError. Run in a child process so a segfault would show as its exit code."""
    model = model_copy
    script = textwrap.dedent(f"""
        import os, sys
        from gpt2_onnx.runtime.errors import ModelDirError
        from gpt2_onnx.runtime.generator import TextGenerator
        path = {str(model / "model.onnx")!r}
        original = open(path, "rb").read()
        outcomes = []
        for i in range(12):
            data = bytearray(original)
            at = 2 + i * 1999 % 60000
            data[at] ^= 0xFF
            open(path, "wb").write(bytes(data))
            try:
                gen = TextGenerator.load({str(model)!r}, device="cpu", threads=1)
                gen.generate("Paris", max_new_tokens=2, greedy=True)
                outcomes.append("ok")
            except ModelDirError as exc:
                outcomes.append("refused")
            except Exception as exc:
                outcomes.append("other:" + type(exc).__name__ + ":" + str(exc)[:200])
        open(path, "wb").write(original)
        print(outcomes)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    outcomes = eval(proc.stdout.strip().splitlines()[-1])  # noqa: S307 - our own repr output
    assert len(outcomes) == 12
    assert "refused" in outcomes
    others = [o for o in outcomes if o.startswith("other")]
    assert not others, others


# ------------------------------------------------------------------------- the CLI says one line


@pytest.mark.parametrize("argv", [["info"], ["generate", "--max-new-tokens", "2", "--greedy"],
                                  ["tokenize"]])
def test_cli_one_line_on_damaged_dir(model: Path, argv: list[str]) -> None:
    edit_manifest(model, lambda d: d.update(tokenizer="../../etc/passwd"))
    args = [argv[0], str(model), *(["hello"] if argv[0] != "info" else []), *argv[1:]]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit)
    assert "points outside the model directory" in result.output
    assert "Traceback" not in result.output


def test_cli_subprocess_no_traceback(model: Path) -> None:
    (model / "tokenizer.json").write_text("garbage")
    refresh(model)
    proc = subprocess.run([sys.executable, "-c", CLI, "generate", str(model), "hi",
                           "--max-new-tokens", "2"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert "tokenizer.json" in proc.stderr and "not a valid tokenizers file" in proc.stderr


# ------------------------------------------------ from the hostile pass of issue 19


VOCAB = 50257


_DIM_FIELDS = ("n_layer", "n_head", "head_dim", "n_embd", "n_positions", "vocab_size")


def replace_tokenizer(model: Path, size: int) -> None:
    """A word-level tokenizer of `size` tokens in place of GPT-2's; the manifest's file table
    updated so only the vocabulary rule can object."""
    from tokenizers import Tokenizer, models

    vocab = {f"w{i}": i for i in range(size - 1)} | {"[UNK]": size - 1}
    Tokenizer(models.WordLevel(vocab, unk_token="[UNK]")).save(str(model / "tokenizer.json"))
    entry = mf.file_entries(model, ["tokenizer.json"])["tokenizer.json"]
    edit_manifest(model, lambda d: d["files"].update(
        {"tokenizer.json": {"size": entry.size, "sha256": entry.sha256}}))


@pytest.mark.parametrize("edit, expected", [
    (lambda d: d["dims"].update(n_layer=3), "past_key_values.2.key"),
    (lambda d: d["dims"].update(n_layer=1), "past_key_values.1.key"),
    (lambda d: d["dims"].update(n_head=8, head_dim=8), "n_head 8, head_dim 8"),
    (lambda d: d["dims"].update(n_head=2, head_dim=32), "n_head 2, head_dim 32"),
    (lambda d: d["dims"].update(vocab_size=50304), "vocab_size 50304"),
    (lambda d: d["variants"]["fp32"]["io"].update(input_ids="ids"), "ids"),
    (lambda d: d["variants"]["fp32"]["io"].update(logits="scores"), "scores"),
    (lambda d: d["variants"]["fp32"]["io"].update(past_key="past.{i}.key"), "past.0.key"),
    (lambda d: d["variants"]["fp32"]["io"].update(attention_mask="mask"), "mask"),
    (lambda d: d["variants"]["fp32"].update(dtype="float16"), "float16"),
])
def test_manifest_that_disagrees_with_its_graph(runner: CliRunner, model: Path, edit,
                                                expected: str) -> None:
    edit_manifest(model, edit)
    mf.read_manifest(model)  # the manifest alone is consistent: only the graph disproves it
    with pytest.raises(ModelDirError, match="graph and manifest disagree") as exc:
        TextGenerator.load(model, device="cpu", threads=1)
    assert expected in str(exc.value)
    result = invoke(runner, "generate", model, "Hi", "--max-new-tokens", "2")
    assert result.exit_code == 1
    assert expected in one_line_error(result.stderr, result.stdout)


@pytest.mark.parametrize("n_positions, n_embd, n_head", [(512, 64, 4), (128, 64, 4),
                                                      (256, 128, 8)])
def test_position_table_disagreeing_with_the_manifest(runner: CliRunner, model: Path,
                                                      n_positions: int, n_embd: int,
                                                      n_head: int) -> None:
    """n_positions 512 over a 256-row table used to load and fail only past position 255."""
    edit_manifest(model, lambda d: d["dims"].update(n_positions=n_positions, n_embd=n_embd,
                                                    n_head=n_head))
    with pytest.raises(ModelDirError, match="position table is 256 x 64"):
        mf.read_manifest(model)
    result = invoke(runner, "info", model)
    assert result.exit_code == 1 and "position table" in one_line_error(result.stderr)


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(changes=st.dictionaries(st.sampled_from(_DIM_FIELDS),
                               st.one_of(st.integers(-2, 600), st.integers(50000, 50400),
                                         st.sampled_from([2**24, 2**24 + 1, 2**63, -(2**63)])),
                               min_size=1, max_size=3),
       io_field=st.one_of(st.none(), st.sampled_from(["input_ids", "attention_mask",
                                                      "position_ids", "logits", "past_key",
                                                      "present_value"])),
       io_name=st.text(min_size=1, max_size=12))
def test_model_directory_mutations(tmp_path_factory: pytest.TempPathFactory, pristine: Path,
                                   tiny_gen: TextGenerator, changes: dict, io_field: str | None,
                                   io_name: str) -> None:
    """Random edits of the manifest's dims and tensor names: the directory is refused with a
    ModelDirError at load, or the edit changed nothing and it generates the same greedy tokens.
    Never another exception, never a failure at the first forward pass."""
    model = private_copy(pristine, tmp_path_factory.mktemp("mut") / "model")
    original = json.loads((model / mf.MANIFEST_NAME).read_text())
    dims = original["dims"]
    io = original["variants"]["fp32"]["io"]

    def edit(doc):
        doc["dims"].update(changes)
        if io_field is not None:
            value = io_name + ("{i}" if io_field in ("past_key", "present_value") else "")
            doc["variants"]["fp32"]["io"][io_field] = value

    edit_manifest(model, edit)
    structural = any(changes[f] != dims[f] for f in changes)
    renamed = io_field is not None and (
        io_name + ("{i}" if io_field in ("past_key", "present_value") else "")) != io[io_field]
    try:
        loaded = TextGenerator.load(model, device="cpu", threads=1)
    except ModelDirError:
        return
    assert not structural and not renamed, "a manifest that differs from its graph was loaded"
    reference = tiny_gen.generate("Paris will", max_new_tokens=2, greedy=True).ids
    assert loaded.generate("Paris will", max_new_tokens=2, greedy=True).ids == reference


def test_unreadable_tokenizer_is_named_as_such(model: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    tok = model / "tokenizer.json"
    if os.geteuid() == 0:  # root reads anything: make the read itself fail as it would
        real = Path.read_bytes

        def denied(self: Path) -> bytes:
            if self == tok:
                raise PermissionError(13, "Permission denied", str(self))
            return real(self)

        monkeypatch.setattr(Path, "read_bytes", denied)
    else:
        tok.chmod(0)
    with pytest.raises(ModelDirError, match="cannot be read \\(Permission denied\\)"):
        load_tokenizer(tok, VOCAB)


def test_missing_directory_and_file_are_named_apart(tmp_path: Path) -> None:
    with pytest.raises(ModelDirError, match="no such directory"):
        mf.read_manifest(tmp_path / "nonexistent")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ModelDirError, match="not a directory"):
        mf.read_manifest(tmp_path / "file")


@pytest.mark.parametrize("size", [3, 1000, VOCAB - 200, VOCAB + 1])
def test_tokenizer_of_another_vocabulary_is_refused(runner: CliRunner, model: Path,
                                                    size: int) -> None:
    replace_tokenizer(model, size)
    with pytest.raises(ModelDirError, match=f"{size} tokens but the model has {VOCAB} logits"):
        TextGenerator.load(model, device="cpu", threads=1)
    result = invoke(runner, "generate", model, "w1", "--max-new-tokens", "2", "--json")
    assert result.exit_code == 1 and result.stdout == ""
    assert "belongs to another model" in one_line_error(result.stderr)


def test_vocabulary_padding_rule_hand_values() -> None:
    assert vocab_fits(50257, 50257)
    assert vocab_fits(50257, 50304)  # padded to a multiple of 128 (nanoGPT's 50304)
    assert not vocab_fits(50257, 50305)
    assert not vocab_fits(50257, 50256)
    assert not vocab_fits(1000, 50257)
    assert vocab_fits(128, 128) and not vocab_fits(128, 129)
