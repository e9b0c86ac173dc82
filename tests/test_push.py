"""bt-push / bt-convert --push-to-hub against an intercepted hub, and model-card metadata.

huggingface_hub 2.x sends every request through one httpx2 client made by a replaceable factory:
the tests install a client whose transport is an in-process fake hub, so nothing leaves the machine.
The unreachable-hub case runs the real client against a closed local port.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx2
import huggingface_hub
import pytest
from click.testing import CliRunner
from conftest import assert_one_line_error as one_line_error
from conftest import save_source, tiny_source, tiny_tokenizer
from huggingface_hub.utils._http import default_client_factory, hf_request_event_hook

from block_transformer import export
from block_transformer.cli import convert_cmd, push_cmd
from block_transformer.convert import LayerMapping
from block_transformer.convert.convert import convert_model

TOKEN = "hf_TestToken0123456789abcdef"
REPO = "someone/tiny-bt"


class FakeHub:
    """Answers the hub API calls a push makes; records them. ``fail`` maps a path to an error status."""

    def __init__(self, role: str = "write", fail: dict[str, int] | None = None):
        self.role, self.fail, self.requests = role, fail or {}, []

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        path = request.url.path
        self.requests.append(request)
        if path in self.fail:
            return httpx2.Response(self.fail[path], json={"error": "nope"})
        if request.method == "HEAD" and path == "/":
            return httpx2.Response(200)
        if path == "/api/whoami-v2":
            return httpx2.Response(200, json={"type": "user", "name": "someone",
                                              "auth": {"accessToken": {"role": self.role}}})
        if path == "/api/repos/create":
            return httpx2.Response(200, json={"url": f"https://huggingface.co/{REPO}", "name": REPO})
        if path.startswith(f"/api/models/{REPO}/branch/"):
            return httpx2.Response(200, json={})
        if path == "/api/validate-yaml":
            return httpx2.Response(200, json={})
        if "/preupload/" in path:
            files = json.loads(request.content)["files"]
            return httpx2.Response(200, json={"files": [
                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]})
        if "/commit/" in path:
            return httpx2.Response(200, json={"commitUrl": f"https://huggingface.co/{REPO}/commit/{'a' * 40}",
                                              "commitOid": "a" * 40})
        return httpx2.Response(404, json={"error": f"not faked: {request.method} {path}"})

    def api_requests(self) -> list[httpx2.Request]:
        """The push's own calls (not the reachability probe, nor huggingface_hub's agent-registry lookup)."""
        return [r for r in self.requests if r.url.path not in ("/", "/api/agent-harnesses")]

    def paths(self) -> list[str]:
        return [r.url.path for r in self.api_requests()]

    def request(self, fragment: str) -> httpx2.Request:
        return next(r for r in self.requests if fragment in r.url.path)

    def committed(self) -> dict[str, bytes]:
        """{path in repo: content} of the commit (all files were sent inline as 'regular' uploads)."""
        import base64

        lines = [json.loads(line) for line in self.request("/commit/").content.decode().splitlines()]
        return {x["value"]["path"]: base64.b64decode(x["value"]["content"]) for x in lines if x["key"] == "file"}


@pytest.fixture
def fake_hub(monkeypatch):
    """Route huggingface_hub's HTTP client to a FakeHub; online mode, a token in HF_TOKEN."""
    fake = FakeHub()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    huggingface_hub.set_client_factory(lambda: httpx2.Client(
        transport=httpx2.MockTransport(fake), event_hooks={"request": [hf_request_event_hook]}, follow_redirects=True))
    yield fake
    huggingface_hub.set_client_factory(default_client_factory)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = convert_model(tiny_source("gpt2"), LayerMapping.partition(2, 2), 4, separator_id=0, source_info={"source": "tiny"})
    return export.save_model_folder(model, tiny_tokenizer(), tmp_path_factory.mktemp("push") / "tiny-bt")


@pytest.fixture
def folder(saved, tmp_path):
    """A private copy of the saved folder, for tests that damage it."""
    return Path(shutil.copytree(saved, tmp_path / "tiny-bt"))


def snapshot(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def push(*args):
    return CliRunner().invoke(push_cmd, [str(a) for a in args])


def assert_one_line_error(result, *fragments: str) -> None:
    one_line_error(result, *fragments)
    assert TOKEN not in result.output


# -- happy paths ---------------------------------------------------------------------------------------


def test_push_uploads_the_verified_folder(fake_hub, folder):
    before = snapshot(folder)
    (folder / ".cache").mkdir()
    (folder / ".cache" / "x").write_text("local state")
    result = push(folder, REPO, "--private", "--revision", "step0", "--commit-message", "conversion only")
    assert result.exit_code == 0, result.output
    assert f"pushed {folder} to {REPO}: https://huggingface.co/{REPO}/commit/" in result.output
    assert TOKEN not in result.output
    assert fake_hub.paths() == [
        "/api/whoami-v2", "/api/repos/create", f"/api/models/{REPO}/branch/step0", "/api/validate-yaml",
        f"/api/models/{REPO}/preupload/step0", f"/api/models/{REPO}/commit/step0",
    ]
    assert json.loads(fake_hub.request("/api/repos/create").content)["visibility"] == "private"
    committed = fake_hub.committed()
    assert set(committed) == set(before), "hidden files must not be uploaded; everything else must"
    assert all(hashlib.sha256(committed[name]).hexdigest() == digest for name, digest in before.items())
    header = json.loads(fake_hub.request("/commit/").content.decode().splitlines()[0])["value"]
    assert header["summary"] == "conversion only"
    assert all(r.headers["authorization"] == f"Bearer {TOKEN}" for r in fake_hub.api_requests())
    shutil.rmtree(folder / ".cache")
    assert snapshot(folder) == before


def test_convert_with_push_to_hub(fake_hub, tmp_path):
    source = save_source(tmp_path / "src", "llama")
    out = tmp_path / "bt"
    result = CliRunner().invoke(convert_cmd, [str(source), "--block-len", "4", "--split", "2/2", "-o", str(out),
                                              "--push-to-hub", REPO])
    assert result.exit_code == 0, result.output
    assert (out / "config.json").is_file() and f"pushed {out} to {REPO}" in result.output
    assert "config.json" in fake_hub.committed() and "main" in fake_hub.request("/commit/").url.path
    assert "visibility" not in json.loads(fake_hub.request("/api/repos/create").content)  # the namespace default


# -- refusals and hub errors -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fake", "fragments", "committed"),
    [
        ({"fail": {"/api/whoami-v2": 401}}, ["rejected your token (401", "hf auth login"], False),
        ({"role": "read"}, ["read-only", "write token"], False),
        ({"fail": {"/api/repos/create": 403}}, [f"may not write to {REPO} (403", "own namespace"], False),
        ({"fail": {f"/api/models/{REPO}/commit/main": 422}}, [f"refused the push to {REPO} (422"], True),
    ],
)
def test_hub_errors_are_one_line_and_keep_the_folder(fake_hub, folder, fake, fragments, committed):
    for name, value in fake.items():  # this scenario's answers
        setattr(fake_hub, name, value)
    before = snapshot(folder)
    assert_one_line_error(push(folder, REPO), *fragments)
    assert any("/commit/" in path for path in fake_hub.paths()) == committed, fake_hub.paths()
    assert snapshot(folder) == before


def test_no_token(fake_hub, folder, monkeypatch, tmp_path):
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    assert_one_line_error(push(folder, REPO), "no Hugging Face token", "HF_TOKEN", "hf auth login")
    assert fake_hub.requests == []


def test_convert_push_checks_before_converting(fake_hub, tmp_path, monkeypatch):
    """No token: bt-convert --push-to-hub fails at once, before any conversion work or output."""
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    source = save_source(tmp_path / "src", "llama")
    result = CliRunner().invoke(convert_cmd, [str(source), "--block-len", "4", "--split", "2/2",
                                              "-o", str(tmp_path / "bt"), "--push-to-hub", REPO])
    assert_one_line_error(result, "no Hugging Face token")
    assert not (tmp_path / "bt").exists()


def test_convert_push_failure_says_where_the_folder_is(fake_hub, tmp_path):
    fake_hub.fail = {"/api/repos/create": 403}
    source = save_source(tmp_path / "src", "llama")
    out = tmp_path / "bt"
    result = CliRunner().invoke(convert_cmd, [str(source), "--block-len", "4", "--split", "2/2", "-o", str(out),
                                              "--push-to-hub", REPO])
    assert_one_line_error(result, "403", f"bt-push {out} {REPO}")
    assert (out / "model.safetensors").is_file()


def damage_weights(folder: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    name = next(n for n in tensors if n.startswith("embedder"))
    tensors[name] = tensors[name][:, :-1].contiguous()
    tensors.pop(next(n for n in tensors if n.startswith("prefix")))
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize(
    ("damage", "fragments"),
    [
        (lambda f: (f / "model.safetensors").unlink(), ["no weights"]),
        (damage_weights, ["weights missing prefix", "wrong shape for embedder"]),
        (lambda f: (f / "tokenizer.json").unlink(), ["no tokenizer"]),
        (lambda f: (f / "modeling_block_transformer.py").unlink(), ["modeling_block_transformer.py", "missing"]),
        (lambda f: (f / "batching_block_transformer.py").unlink(), ["batching_block_transformer.py", "missing"]),
        (lambda f: (f / "README.md").unlink(), ["no README.md"]),
        (lambda f: (f / "README.md").write_text("# no metadata\n"), ["no hub metadata"]),
        (lambda f: (f / "config.json").write_text(json.dumps({
            k: v for k, v in json.loads((f / "config.json").read_text()).items() if k != "auto_map"})),
         ["no auto_map entry for AutoModelForCausalLM"]),
        (lambda f: (f / "README.md").write_text((f / "README.md").read_text() + f"\ntoken: {TOKEN}\n"),
         ["README.md contains your Hugging Face token"]),
    ],
)
def test_incomplete_folders_are_refused_before_anything_is_sent(fake_hub, folder, damage, fragments):
    damage(folder)
    before = snapshot(folder)
    assert_one_line_error(push(folder, REPO), *fragments)
    assert fake_hub.paths() == []
    assert snapshot(folder) == before


@pytest.mark.parametrize(("args", "fragment"), [(["./missing", REPO], "no such folder"),
                                                (["FOLDER", "bad//id"], "not a valid hub repo id")])
def test_bad_arguments(fake_hub, folder, args, fragment):
    assert_one_line_error(push(*[folder if a == "FOLDER" else a for a in args]), fragment)
    assert fake_hub.paths() == []


def test_verify_accepts_sharded_folders(tmp_path):
    model = convert_model(tiny_source("qwen2"), LayerMapping.partition(2, 2), 4, separator_id=0)
    folder = export.save_model_folder(model, tiny_tokenizer(), tmp_path / "sharded", max_shard_size="20KB")
    summary = export.verify_folder(folder)
    assert "model.safetensors.index.json" in summary["files"] and summary["num_tensors"] > 0
    next(folder.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(export.ExportError, match="weight shard model-00002"):
        export.verify_folder(folder)


def test_verify_rejects_a_dangling_nested_auto_map(tmp_path):
    """Regression: a source's auto_map copied into a decoder config named modules the folder never ships."""
    model = convert_model(tiny_source("qwen2"), LayerMapping.partition(2, 2), 4, separator_id=0)
    folder = export.save_model_folder(model, tiny_tokenizer(), tmp_path / "out")
    config = json.loads((folder / "config.json").read_text())
    config["token_decoder_config"]["auto_map"] = {"AutoModel": "modeling_custom.CustomModel"}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(export.ExportError, match="token_decoder_config has an auto_map"):
        export.verify_folder(folder)


@pytest.mark.slow
def test_unreachable_hub_fails_fast_and_keeps_the_folder(saved, tmp_path):
    before = snapshot(saved)
    env = {**os.environ, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9", "HF_TOKEN": TOKEN,
           "HF_HOME": str(tmp_path / "hf")}
    started = time.perf_counter()
    result = subprocess.run([str(Path(sys.executable).parent / "bt-push"), str(saved), REPO],
                            env=env, capture_output=True, text=True, timeout=60)
    seconds = time.perf_counter() - started
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and "cannot reach the Hugging Face hub at http://127.0.0.1:9" in errors[0], result.stderr
    assert TOKEN not in result.stderr + result.stdout
    assert seconds < 20, f"took {seconds:.1f} s"
    assert snapshot(saved) == before


# -- model card ----------------------------------------------------------------------------------------


def card_for(conversion: dict) -> dict:
    model = convert_model(tiny_source("llama"), LayerMapping.partition(2, 2), 4, separator_id=0, source_info=conversion)
    text = export.model_card(model, "tiny-bt")
    assert "trust_remote_code=True" in text and "## Measured results" in text and "No figures measured yet" in text
    return export.card_metadata(text)


def test_card_metadata_for_a_hub_source():
    meta = card_for({"source": "someorg/tiny", "source_kind": "hub", "revision": "main"})
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert meta["base_model"] == "someorg/tiny" and "block-transformer" in meta["tags"]
    assert "license" not in meta  # not known offline: not in the cache


def test_card_license_from_gguf_record_and_from_a_source_folder(tmp_path):
    gguf = card_for({"source": "x.gguf", "source_kind": "gguf", "license": "Apache-2.0"})
    assert gguf["license"] == "apache-2.0" and "base_model" not in gguf
    source = tmp_path / "src"
    source.mkdir()
    (source / "README.md").write_text("---\nlicense: mit\nlanguage: en\n---\n# a model\n")
    assert card_for({"source": str(source), "source_kind": "folder"})["license"] == "mit"
    assert card_for({"source": "y.gguf", "source_kind": "gguf", "license": "My Own License 1.0"})["license"] == "other"
