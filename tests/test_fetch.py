"""fetch against any static HTTP server (127.0.0.1 only), checked names, no mixing of sets;
verify's new checks."""

from __future__ import annotations

import json
import logging
import shutil
import socket
import tarfile
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import fsspec
import pytest
from click.testing import CliRunner

from jigsawdata.cli import main
from jigsawdata.files import write_json_atomic
from jigsawdata.shardset.check import verify_shard_set
from jigsawdata.shardset.fetch import FetchError, fetch, fetch_file
from jigsawdata.shardset.manifest import ListedFile
from jigsawdata.shardset.shards import write_shard


class _PlainHandler(SimpleHTTPRequestHandler):
    """``python -m http.server``: no range support. Can cut a response short (``cut``: path ->
    times) or drop every request like a dead server (``dead``: True, or "files" for all but the manifest)."""

    def do_GET(self):
        self.server.requests.append((self.path, self.headers.get("Range")))
        if self.server.dead is True or (self.server.dead == "files" and not self.path.endswith("/manifest.json")):
            self.close_connection = True
            return
        if self.path in self.server.endless:  # no Content-Length, and bytes until the client hangs up
            self.send_response(200)
            self.end_headers()
            try:
                for _ in range(2000):  # 128 MB at most, so a failing test ends
                    self.wfile.write(bytes(64 << 10))
            except OSError:
                pass
            self.close_connection = True
            return
        cuts = self.server.cut.get(self.path, 0)
        if cuts:
            self.server.cut[self.path] = cuts - 1
            path = Path(self.translate_path(self.path))
            data = path.read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 3])
            self.wfile.flush()
            self.close_connection = True
            return
        super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture
def plain_server(tmp_path, built_synthetic):
    root = tmp_path / "www"
    shutil.copytree(built_synthetic, root / "set")
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(_PlainHandler, directory=str(root)))
    httpd.requests, httpd.cut, httpd.dead, httpd.endless = [], {}, False, set()
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield root / "set", f"http://127.0.0.1:{httpd.server_address[1]}/set", httpd
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _largest(src: Path) -> str:
    return str(max(src.glob("*/*.tar"), key=lambda p: p.stat().st_size).relative_to(src))


@pytest.mark.slow
def test_fetch_from_python_http_server_without_range_support(plain_server, tmp_path):
    src, url, httpd = plain_server
    result = CliRunner().invoke(main, ["fetch", url, "--out", str(tmp_path / "copy")])
    assert result.exit_code == 0, result.output
    assert _tree(tmp_path / "copy") == _tree(src) and verify_shard_set(tmp_path / "copy") == []
    assert not [r for _, r in httpd.requests if r], "a fresh file streams from byte 0 without a range request"


@pytest.mark.slow
def test_interruption_without_range_support_restarts_the_file(plain_server, tmp_path, caplog):
    src, url, httpd = plain_server
    name = _largest(src)
    httpd.cut[f"/set/{name}"] = 2
    with caplog.at_level(logging.WARNING, logger="jigsawdata.shardset.fetch"):
        fetch(url, tmp_path / "copy", workers=1, retries=3)
    assert _tree(tmp_path / "copy") == _tree(src)
    assert [r for p, r in httpd.requests if p == f"/set/{name}"][0] is None
    retries = [r.getMessage() for r in caplog.records if name in r.getMessage()]
    assert len(retries) == 2 and "transfer interrupted" in retries[0]
    assert "attempt 2 of 3" in retries[0] and "attempt 3 of 3" in retries[1]


def test_a_dead_server_is_reported_as_interrupted_not_missing(plain_server, tmp_path, caplog):
    src, url, httpd = plain_server
    httpd.dead = True
    fs, root = fsspec.core.url_to_fs(url)
    item = ListedFile("S/S-000000.tar", "0" * 64, 10)
    with caplog.at_level(logging.WARNING, logger="jigsawdata.shardset.fetch"):
        with pytest.raises(FetchError, match=r"S/S-000000.tar: transfer interrupted 3 times .*rerun fetch"):
            fetch_file(fs, root, item, tmp_path, retries=3)
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "attempt 3 of 3" in messages and "attempt 4" not in messages and "not found" not in messages
    with socket.socket() as free:  # nothing listens here at all
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    fs, root = fsspec.core.url_to_fs(f"http://127.0.0.1:{port}/set")
    with pytest.raises(FetchError, match="transfer interrupted 2 times"):
        fetch_file(fs, root, item, tmp_path, retries=2)


def test_a_server_streaming_without_end_fills_nothing(plain_server, tmp_path, monkeypatch):
    """A shard, a DALI index, the manifest or the card sent without Content-Length and without
    end: the download stops past what the manifest allows, is not retried, and leaves nothing."""
    import jigsawdata.shardset.location

    src, url, httpd = plain_server
    shard = sorted(p.relative_to(src).as_posix() for p in src.glob("S/*.tar"))[0]
    idx = shard.replace(".tar", ".idx")
    for name, allowed in ((shard, (src / shard).stat().st_size), (idx, None)):
        httpd.endless, httpd.requests[:] = {f"/set/{name}"}, []
        target = tmp_path / name.replace("/", "-")
        with pytest.raises(
            FetchError, match=rf"{name}: the server sent more than the \d+ bytes the manifest allows"
        ) as refused:
            fetch(url, target, workers=1, retries=3)
        assert len([p for p, _ in httpd.requests if p == f"/set/{name}"]) == 1, "not retried"
        assert not [p for p in tmp_path.rglob("*.part") if p.stat().st_size], "nothing of it kept"
        if allowed:
            assert f"the {allowed} bytes" in str(refused.value)
    monkeypatch.setattr(jigsawdata.shardset.location, "MAX_MANIFEST_BYTES", 1 << 20)
    httpd.endless = {"/set/manifest.json"}
    with pytest.raises(FetchError, match=r"manifest.json is larger than 1048576 bytes"):
        fetch(url, tmp_path / "copy3", workers=1)
    monkeypatch.setattr(jigsawdata.shardset.fetch, "MAX_CARD_BYTES", 1 << 20)
    httpd.endless = {"/set/README.md"}
    with pytest.raises(FetchError, match=r"README.md is larger than 1048576 bytes"):
        fetch(url, tmp_path / "copy4", workers=1)


@pytest.mark.slow
def test_a_dead_server_fails_every_file_in_one_short_line(plain_server, tmp_path, caplog):
    src, url, httpd = plain_server
    files = len(list(src.glob("*/*.tar"))) + len(list(src.glob("*/*.idx"))) + 1
    httpd.dead = "files"  # all but the manifest
    result = CliRunner().invoke(main, ["fetch", url, "--out", str(tmp_path / "copy"), "--retries", "1"])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and lines[-1].startswith("Error: ") and len(lines[-1]) < 300, lines[-1]
    assert f"(and {files - 1} more files failed, the next 10 logged above)" in lines[-1]
    logged = [
        r.getMessage() for r in caplog.records if r.name == "jigsawdata.shardset.fetch" and r.levelno == logging.WARNING
    ]
    assert len(logged) == 10 and all("transfer interrupted once" in m for m in logged), logged


def test_a_missing_file_is_not_found_and_not_retried(plain_server, tmp_path):
    src, url, httpd = plain_server
    (src / "T" / sorted(p.name for p in (src / "T").glob("*.tar"))[0]).unlink()
    with pytest.raises(FetchError, match=r"T/T-000000.tar: not found at"):
        fetch(url, tmp_path / "copy", retries=4)
    assert len([p for p, _ in httpd.requests if p == "/set/T/T-000000.tar"]) == 1


def _edit_manifest(src: Path, edit) -> None:
    manifest = json.loads((src / "manifest.json").read_text())
    edit(manifest)
    (src / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda m: m["groups"]["S"]["shards"][0].update(name="."), r"unsafe path '\.'"),
        (lambda m: m["groups"]["S"]["shards"][0].update(name=""), r"manifest names a file ''"),
        (lambda m: m["groups"]["S"]["shards"][0].update(name="S/./x.tar"), r"unsafe path 'S/\./x.tar'"),
        (
            lambda m: m["groups"]["S"]["shards"][1].update(name=m["groups"]["S"]["shards"][0]["name"]),
            r"lists 'S/S-000000.tar' twice",
        ),
        (
            lambda m: m["groups"]["T"]["shards"][0].update(name="S/S-000000.idx"),
            r"names 'S/S-000000.idx' where a .tar file belongs",
        ),
        (lambda m: m.update(index="S/S-000000.tar"), r"names 'S/S-000000.tar' where a .parquet file belongs"),
        (lambda m: m["groups"]["W"]["shards"][0].pop("sha256"), r"no valid sha256 for 'W/W-000000.tar' \(got None\)"),
        (lambda m: m["groups"]["W"]["shards"][0].update(idx_sha256="abc"), r"no valid sha256 for 'W/W-000000.idx'"),
    ],
)
def test_manifest_names_are_checked_before_anything_is_downloaded(plain_server, tmp_path, edit, message):
    src, url, httpd = plain_server
    _edit_manifest(src, edit)
    (tmp_path / "copy.part").write_text("a user's file")
    with pytest.raises(FetchError, match=message):
        fetch(url, tmp_path / "copy")
    assert [p for p, _ in httpd.requests] == ["/set/manifest.json"]
    assert not (tmp_path / "copy").exists() and (tmp_path / "copy.part").read_text() == "a user's file"
    result = CliRunner().invoke(main, ["verify", str(src)])
    assert result.exit_code == 1 and "refusing the shard set" in result.output


def _other_set(tmp_path: Path, synthetic_source) -> Path:
    from jigsawdata.build.run import BuildConfig, build_shards

    other = tmp_path / "other"
    build_shards(synthetic_source, other, BuildConfig(seed=5, chunk_images=8, shard_samples=40))
    return other


@pytest.mark.parametrize("exchange", ["atomic", "two renames"])
@pytest.mark.slow
def test_fetch_into_another_set_is_refused_and_force_replaces_it_only_when_complete(
    plain_server, tmp_path, synthetic_source, monkeypatch, exchange
):
    import jigsawdata.shardset.fetch

    swaps = []
    real = jigsawdata.shardset.fetch.exchange_paths
    monkeypatch.setattr(
        jigsawdata.shardset.fetch,
        "exchange_paths",
        lambda a, b: swaps.append(exchange) or (real(a, b) if exchange == "atomic" else False),
    )
    src, url, httpd = plain_server
    out = _other_set(tmp_path, synthetic_source)
    before = _tree(out)
    with pytest.raises(FetchError, match="holds another shard set: refusing to mix the two; use --force"):
        fetch(url, out)
    assert _tree(out) == before
    victim = sorted(src.glob("W/*.tar"))[0]
    good = victim.read_bytes()
    victim.write_bytes(good[:-1024] + b"\1" * 1024)  # the published copy is damaged
    result = CliRunner().invoke(main, ["fetch", url, "--out", str(out), "--force"])
    assert result.exit_code == 1 and "does not match" in result.output
    assert _tree(out) == before and verify_shard_set(out) == [], "a failed fetch leaves the old set whole"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other", "www"], "and no temporary folder"
    victim.write_bytes(good)
    fetch(url, out, force=True)
    assert _tree(out) == _tree(src) and verify_shard_set(out) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other", "www"]
    assert swaps == [exchange]


def test_exchange_paths_swaps_two_trees_in_one_step(tmp_path):
    from jigsawdata.files import exchange_paths

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x").write_text("A")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "y").write_text("B")
    if not exchange_paths(tmp_path / "a", tmp_path / "b"):
        pytest.skip("no renameat2 RENAME_EXCHANGE on this system or file system")
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["y"]
    assert [p.name for p in (tmp_path / "b").iterdir()] == ["x"]
    with pytest.raises(FileNotFoundError):
        exchange_paths(tmp_path / "a", tmp_path / "missing")


def test_fetch_into_a_folder_without_a_set_is_refused_even_with_force(plain_server, tmp_path):
    _, url, _ = plain_server
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    for force in (False, True):
        with pytest.raises(FetchError, match="is not empty and holds no shard set"):
            fetch(url, out, force=force)
    assert _tree(out) == {"notes.txt": b"mine"}


def test_a_failed_fetch_resumes_into_the_same_folder(plain_server, tmp_path):
    src, url, httpd = plain_server
    name = _largest(src)
    httpd.cut[f"/set/{name}"] = 5
    with pytest.raises(FetchError, match="transfer interrupted 2 times"):
        fetch(url, tmp_path / "copy", retries=2)
    assert (tmp_path / "copy" / ".fetch.json").is_file() and not (tmp_path / "copy" / "manifest.json").exists()
    httpd.cut.clear()
    fetch(url, tmp_path / "copy")
    assert _tree(tmp_path / "copy") == _tree(src)


def test_cli_fetch_options_are_validated(tmp_path):
    for option in ("--workers", "--retries"):
        result = CliRunner().invoke(main, ["fetch", "http://127.0.0.1:9/x", "--out", str(tmp_path / "o"), option, "0"])
        assert result.exit_code == 2 and "0 is not in the range x>=1" in result.output, result.output


# ---------------------------------------------------------------- verify and info


def _fresh(tmp_path: Path, built_synthetic: Path) -> Path:
    out = tmp_path / "set"
    shutil.copytree(built_synthetic, out)
    return out


def test_verify_checks_manifest_totals(tmp_path, built_synthetic):
    out = _fresh(tmp_path, built_synthetic)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["groups"]["S"]["samples"] += 5
    manifest["counts"]["negatives"] += 1
    write_json_atomic(out / "manifest.json", manifest)
    problems = verify_shard_set(out)
    assert any(p.startswith("group S: manifest says") and "samples" in p for p in problems), problems
    assert any(p.startswith("counts:") for p in problems), problems


def test_verify_checks_every_label_against_the_class_list(tmp_path, built_synthetic):
    out = _fresh(tmp_path, built_synthetic)
    manifest = json.loads((out / "manifest.json").read_text())
    n_classes = len(manifest["classes"])
    victim = sorted(out.glob("T/*.tar"))[0]
    with tarfile.open(victim) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar]
    samples = {}
    for m, data in members:
        stem, ext = m.name.split(".", 1)
        samples.setdefault(stem, []).append((ext, str(n_classes + 3).encode() if ext == "cls" else data))
    n, nbytes, digest = write_shard(victim, list(samples.items()))
    for shard in manifest["groups"]["T"]["shards"]:
        if shard["name"] == f"T/{victim.name}":
            shard.update(bytes=nbytes, sha256=digest)
            shard.pop("idx_sha256")
    write_json_atomic(out / "manifest.json", manifest)
    problems = verify_shard_set(out)
    assert problems and all(f"label '{n_classes + 3}'" in p and f"outside 0..{n_classes}" in p for p in problems)
    assert len(problems) == n


def test_verify_refuses_names_outside_the_set(tmp_path, built_synthetic):
    out = _fresh(tmp_path, built_synthetic)
    (tmp_path / "outside.tar").write_bytes(b"")
    _edit_manifest(out, lambda m: m["groups"]["S"]["shards"][0].update(name="../outside.tar"))
    assert verify_shard_set(out) == ["manifest names an unsafe path '../outside.tar': refusing the shard set"]


def test_info_says_it_does_not_verify(built_synthetic):
    result = CliRunner().invoke(main, ["info", str(built_synthetic)])
    assert result.exit_code == 0 and "not checked: run `jigsawdata verify" in result.output


def test_fetch_benchmark_measures_both_sides_in_one_run():
    from jigsawdata.benchmarks.fetch_throughput import format_table, run

    result = run(megabytes=2, shards=2, workers=2, repeats=1)
    assert result["bytes"] > 2_000_000 and len(result["fetch_seconds"]["runs"]) == 1
    assert len(result["urllib_seconds"]["runs"]) == 1 and result["ratio"] > 0
    assert "fetch / urllib throughput" in format_table(result)


def test_a_url_is_read_where_commands_read_and_refused_where_they_write(plain_server, tmp_path, monkeypatch):
    src, url, httpd = plain_server
    monkeypatch.chdir(tmp_path)
    info = CliRunner().invoke(main, ["info", url, "--json"])
    assert info.exit_code == 0, info.output
    assert json.loads(info.output) == json.loads(CliRunner().invoke(main, ["info", str(src), "--json"]).output)
    checked = CliRunner().invoke(main, ["verify", url, "--cache-dir", str(tmp_path / "cache")])
    assert checked.exit_code == 0 and checked.output.startswith("OK: "), checked.output
    preview = CliRunner().invoke(
        main,
        [
            "preview",
            url,
            "--pipeline",
            "reference",
            "--count",
            "2",
            "--out",
            str(tmp_path / "p.png"),
            "--cache-dir",
            str(tmp_path / "cache"),
        ],
    )
    assert preview.exit_code == 0 and (tmp_path / "p.png").is_file(), preview.output
    for args in (
        ["build-shards", str(src), "--out", "s3://bucket/shards"],
        ["pretrain", "--shards", url, "--out", "s3://bucket/run", "--device", "cpu", "--arch", "resnet18"],
        ["fetch", url, "--out", "gs://bucket/copy"],
        ["export", str(src), "--out", "s3://b/x.pth"],
    ):
        refused = CliRunner().invoke(main, args)
        assert refused.exit_code == 1 and "is a URL" in refused.output and refused.output.count("\n") == 1, (
            args,
            refused.output,
        )
    assert not any(p.name in ("s3:", "gs:") for p in tmp_path.iterdir()), "no local s3:/ tree"
    local = CliRunner().invoke(main, ["fetch", url, "--out", f"file://{tmp_path / 'ff'}"])
    assert local.exit_code == 0 and (tmp_path / "ff" / "manifest.json").is_file(), local.output
    assert not (tmp_path / "file:").exists()
    nowhere = CliRunner().invoke(main, ["export", str(src), "--out", str(tmp_path / "no such" / "x.pth")])
    assert nowhere.exit_code == 1 and nowhere.output.count("\n") == 1 and "does not exist" in nowhere.output
    with socket.socket() as free:  # nothing listens here: not "no manifest", but the server is unreachable
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    unreachable = CliRunner().invoke(main, ["fetch", f"http://127.0.0.1:{port}/set", "--out", str(tmp_path / "u")])
    assert unreachable.exit_code == 1 and "cannot reach the server" in unreachable.output, unreachable.output
