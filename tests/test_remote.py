"""Checkpoints in object storage: converted from a real S3 server (moto's ``moto_server``,
started here), in a run and in a sweep of the entry point, and with faults injected by a proxy
of ours in front of it: resets and throttling are retried, a short object, a denied object and
persistent failures end in one clear error that names the object, with no output left behind.
A full training checkpoint is converted without reading a byte of its optimizer state."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import pytest
import torch

from converter import job
from converter.errors import ConversionError
from converter.sources import open_storage
from converter.sources.dcp import DcpIndex
from converter.sources.remote import (
    GENERIC_PART_BYTES,
    IN_FLIGHT,
    PART_BYTES,
    FsspecStorage,
)
from converter.sources.steps import find_step_dir
from converter.sources.storage import LocalStorage
from tests.conftest import (
    FULL_STEP,
    REPO,
    TINY,
    WEIGHTS_ONLY_STEP,
    compose,
    model_overrides,
    unavailable,
)
from tests.fault_proxy import FaultProxy
from tests.s3_server import S3_ENV, client, free_port, moto_server, upload_folder
from tests.test_layouts import expected_output

# Starts ranks, subprocesses or servers: not in the fast layer (pytest -m 'not slow').
pytestmark = pytest.mark.slow

BUCKET = "ckpt"
TINY_URL = f"s3://{BUCKET}/tiny/checkpoint"
# torchtitan 0.3.0's layout: with a separate head, so the bytes the output needs are its
# sources' alone; and with tied embeddings (in the sweep), whose check reads the head too.
FULL_CASE = ("#2937", "mha")
TIED_CASE = ("#2937", "gqa_tied")
FULL_URL = f"s3://{BUCKET}/full/checkpoint"
SHARD = f"{BUCKET}/tiny/checkpoint/step-5/__1_0.distcp"


@pytest.fixture(scope="module")
def s3(tiny_checkpoint, layout_checkpoints):
    """moto_server on a free port, holding the tiny checkpoint and a full one (a training save
    with its optimizer state at FULL_STEP, a weights-only save at WEIGHTS_ONLY_STEP)."""
    try:
        import moto.server  # noqa: F401
        import s3fs  # noqa: F401
    except ImportError as e:
        unavailable(f"the object-storage tests need moto[server] and s3fs ({e}): pip install "
                    "-e '.[test]'")  # fmt: skip
    with moto_server() as server:
        endpoint = server.endpoint
        upload_folder(endpoint, tiny_checkpoint, BUCKET, "tiny/checkpoint")
        upload_folder(endpoint, layout_checkpoints[FULL_CASE][0], BUCKET, "full/checkpoint")
        upload_folder(endpoint, layout_checkpoints[TIED_CASE][0], BUCKET, "tied/checkpoint")
        yield endpoint


@pytest.fixture(scope="module")
def proxy(s3):
    with FaultProxy(s3) as p:
        yield p


@pytest.fixture
def via_proxy(proxy, monkeypatch):
    """This process's S3 clients reach the server through the proxy, which starts clean."""
    for key, value in S3_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    proxy.clear()
    return proxy


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "HYDRA_FULL"))}
    return {**env, **S3_ENV, **extra}


def run_here(tmp_path: Path, url: str, shape, *overrides: str) -> job.JobResult:
    """A conversion in this process, as ``python convert.py`` runs it."""
    return job.run(
        compose(
            [
                "experiment=debug",
                f"experiment.checkpoint_dir={url}",
                f"experiment.output={tmp_path / 'out' / 'model.pt'}",
                *model_overrides(shape),
                *overrides,
            ]
        )
    )


def left_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def manifest_of(output: Path) -> dict:
    return json.loads(output.with_name(output.name + ".manifest.json").read_text())


# --------------------------------------------------------------------------------------------
# A full checkpoint through the entry point: only the model's bytes are downloaded
# --------------------------------------------------------------------------------------------


def test_full_checkpoint_downloads_the_model_and_no_optimizer_state(
    s3, proxy, layout_checkpoints, tmp_path
):
    root, shape, saved = layout_checkpoints[FULL_CASE]
    out = tmp_path / "out" / "model.pt"
    proxy.clear()
    run = subprocess.run(
        [
            sys.executable,
            "convert.py",
            "experiment=debug",
            f"experiment.checkpoint_dir={FULL_URL}",
            f"experiment.step={FULL_STEP}",
            f"experiment.output={out}",
            f"hydra.run.dir={tmp_path / 'hydra'}",
            "workers=2",
            *model_overrides(shape),
        ],
        cwd=REPO,
        env=child_env(AWS_ENDPOINT_URL=proxy.url),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    tensors = torch.load(out, mmap=True, weights_only=True)
    expected = expected_output(saved[FULL_STEP], "bfloat16", "meta", shape.tied_embeddings)
    assert sorted(tensors) == sorted(expected)
    assert all(torch.equal(tensors[k], v) for k, v in expected.items())

    manifest = manifest_of(out)
    step_dir = root / f"step-{FULL_STEP}"
    index = DcpIndex(LocalStorage(str(root)), str(step_dir))
    needed = {k for keys in manifest["converted"].values() for k in keys}
    spans: dict[str, dict[str, list[tuple[int, int]]]] = {"needed": {}, "other": {}}
    for key, entry in index.tensors.items():
        for c in entry.chunks:
            kind = "needed" if key in needed else "other"
            spans[kind].setdefault(Path(c.file).name, []).append((c.offset, c.offset + c.length))
    other_bytes = sum(b - a for s in spans["other"].values() for a, b in s)
    needed_bytes = sum(b - a for s in spans["needed"].values() for a, b in s)
    assert any(k.startswith("optimizer.") for k in index.tensors)
    assert other_bytes > needed_bytes  # AdamW's two moments per weight, at least

    gets = [r for r in proxy.requests("GET") if r.range is not None]
    assert gets and all(r.outcome == "ok" for r in gets)
    for r in gets:
        name = Path(r.key).name
        if name == ".metadata":
            continue
        a, b = r.range
        overlaps = [(x, y) for x, y in spans["other"].get(name, []) if x < b and a < y]
        assert not overlaps, f"{r} reads bytes of keys the output does not need: {overlaps}"
        assert _covered((a, b), spans["needed"].get(name, [])), f"{r} reads outside any chunk"

    storage = manifest["source"]["storage"]
    downloaded = storage["bytes_downloaded"]
    assert downloaded == sum(r.range[1] - r.range[0] for r in gets)
    checkpoint = sum(p.stat().st_size for p in step_dir.iterdir())
    chunks = sum(len(s) for s in spans["needed"].values())
    metadata = (step_dir / ".metadata").stat().st_size
    # The model's chunks, the index, and at most the ends (8 KiB) of each chunk's archive.
    assert downloaded <= needed_bytes + metadata + 8192 * chunks
    print(
        f"\nfull checkpoint, step-{FULL_STEP}: downloaded {downloaded} of {checkpoint} bytes "
        f"({100 * downloaded / checkpoint:.1f}%): the model's {chunks} chunks {needed_bytes} B, "
        f".metadata {metadata} B, archive ends {downloaded - needed_bytes - metadata} B; "
        f"optimizer and other state {other_bytes} B, none read; {storage['requests']} requests"
    )
    # Each object identified by its size and ETag as the store lists them, and said so.
    s3c = client(s3)
    for name, recorded in manifest["source"]["files"].items():
        head = s3c.head_object(Bucket=BUCKET, Key=f"full/checkpoint/step-{FULL_STEP}/{name}")
        assert recorded == {"bytes": head["ContentLength"], "etag": head["ETag"].strip('"')}
    assert "ETag" in storage["files_identified_by"]
    assert manifest["fingerprint"]["step_dir"] == f"{FULL_URL}/step-{FULL_STEP}"


def statuses_by_step(stdout: str) -> dict[int, str]:
    """step -> status, from the end-of-sweep table (experiment, status, step, ...)."""
    lines = stdout.splitlines()
    header = next(
        i for i, line in enumerate(lines) if line.split()[:3] == ["experiment", "status", "step"]
    )
    rows = []
    for line in lines[header + 2 :]:
        if not line.strip():
            break
        rows.append(line.split())
    return {int(row[2]): row[1] for row in rows}


def _covered(span: tuple[int, int], spans: list[tuple[int, int]]) -> bool:
    """Whether ``span`` lies within the union of ``spans``."""
    at = span[0]
    for a, b in sorted(spans):
        if a <= at < b:
            at = b
        if at >= span[1]:
            return True
    return at >= span[1]


# --------------------------------------------------------------------------------------------
# A sweep through the entry point: storage_options, ${resolved_step:}, skip-if-done by ETag
# --------------------------------------------------------------------------------------------


def test_sweep_over_remote_steps_with_storage_options(s3, layout_checkpoints, tmp_path):
    """The endpoint and the credentials come from experiment.storage_options alone (none in
    the environment) and stay out of the manifests; a second sweep skips both steps, unless an
    object changed (a new ETag), which is named."""
    root, shape, saved = layout_checkpoints[TIED_CASE]
    key_id, secret = "AKIDSWEEPKEYID0042", "sweep-secret-value-0042"
    env = child_env()
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        env.pop(name)
    options = f"{{endpoint_url:'{s3}',key:'{key_id}',secret:'{secret}'}}"

    def sweep() -> subprocess.CompletedProcess:
        return subprocess.run(
            [
                sys.executable,
                "convert.py",
                "-m",
                "experiment=debug",
                f"experiment.checkpoint_dir=s3://{BUCKET}/tied/checkpoint",
                f"experiment.step={FULL_STEP},{WEIGHTS_ONLY_STEP}",
                f"+experiment.storage_options={options}",
                f"experiment.output={tmp_path}/model_step${{resolved_step:}}.pt",
                f"hydra.sweep.dir={tmp_path / 'sweep'}",
                *model_overrides(shape),
            ],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )

    first = sweep()
    assert first.returncode == 0, first.stderr[-3000:]
    assert statuses_by_step(first.stdout) == {
        FULL_STEP: "converted",
        WEIGHTS_ONLY_STEP: "converted",
    }
    for step in (FULL_STEP, WEIGHTS_ONLY_STEP):
        out = tmp_path / f"model_step{step}.pt"
        tensors = torch.load(out, mmap=True, weights_only=True)
        expected = expected_output(saved[step], "bfloat16", "meta", shape.tied_embeddings)
        assert all(torch.equal(tensors[k], v) for k, v in expected.items()), step
        text = out.with_name(out.name + ".manifest.json").read_text()
        assert key_id not in text and secret not in text
        options_recorded = json.loads(text)["config"]["experiment"]["storage_options"]
        assert options_recorded == {"endpoint_url": s3, "key": "<redacted>", "secret": "<redacted>"}
        assert secret not in (tmp_path / "sweep").joinpath("0_debug", "convert.log").read_text()

    # Another object at one step's shard: same size, other bytes, so another ETag.
    s3c = client(s3)
    key = f"tied/checkpoint/step-{WEIGHTS_ONLY_STEP}/__0_0.distcp"
    data = bytearray(s3c.get_object(Bucket=BUCKET, Key=key)["Body"].read())
    data[-100] ^= 0xFF
    s3c.put_object(Bucket=BUCKET, Key=key, Body=bytes(data))
    second = sweep()
    assert second.returncode != 0
    assert statuses_by_step(second.stdout) == {FULL_STEP: "skipped", WEIGHTS_ONLY_STEP: "failed"}
    assert "the source files changed since it was converted (__0_0.distcp)" in second.stdout


# --------------------------------------------------------------------------------------------
# Faults injected between the converter and the store
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clean(s3, proxy, tmp_path_factory) -> tuple[bytes, int]:
    """The tiny checkpoint converted through the proxy without faults: the output's bytes and
    the number of requests it took."""
    env = {**S3_ENV, "AWS_ENDPOINT_URL": proxy.url}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        proxy.clear()
        tmp = tmp_path_factory.mktemp("clean")
        result = run_here(tmp, TINY_URL, TINY)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k)
            else:
                os.environ[k] = v
    assert result.status == "converted", result.error
    return Path(result.output).read_bytes(), len(proxy.requests())


@pytest.mark.parametrize("fault", ["reset", "slowdown"])
def test_transient_faults_are_retried(clean, via_proxy, tmp_path, fault):
    """Three ranged GETs reset mid-body, or throttled with 503 SlowDown: each is retried, once,
    by the converter alone (botocore's and s3fs's own retries do not multiply it), and the
    output is the clean run's, byte for byte."""
    output, requests = clean
    via_proxy.add(fault, times=3)
    result = run_here(tmp_path, TINY_URL, TINY)
    assert result.status == "converted", result.error
    assert Path(result.output).read_bytes() == output
    injected = [r for r in via_proxy.requests() if r.outcome != "ok"]
    assert len(injected) == 3
    assert len(via_proxy.requests()) == requests + 3
    assert manifest_of(Path(result.output))["source"]["storage"]["retries"] == 3


# Persistent faults are retried this long here, not the default minute.
RETRY_S = 3.0
_FAILURES = {
    "throttled_for_good": (
        {"fault": "slowdown", "key": SHARD},
        ("kept throttling the requests (503 SlowDown)",),
    ),
    "reset_for_good": (
        {"fault": "reset", "key": SHARD},
        ("kept breaking the connection",),
    ),
    "shorter_than_listed": (
        {"fault": "truncate", "key": SHARD, "keep": 20000},
        ("is shorter than its listing says",),
    ),
    "denied": (
        {"fault": "deny", "key": SHARD},
        ("was denied", "AccessDenied", "a problem of the environment, not of the checkpoint"),
    ),
}


@pytest.mark.parametrize("case", list(_FAILURES))
def test_persistent_faults_end_in_one_clear_error(clean, via_proxy, tmp_path, case):
    fault, fragments = _FAILURES[case]
    via_proxy.add(**fault)
    result = run_here(tmp_path, TINY_URL, TINY, f"experiment.storage_retry_s={RETRY_S}")
    assert result.status == "failed"
    assert f"s3://{SHARD} (bytes " in result.error, result.error
    for fragment in fragments:
        assert fragment in result.error, result.error
    assert left_in(tmp_path / "out") == []  # no output, no partial file, no lock
    if fault["fault"] in ("slowdown", "reset"):
        # Retried for storage_retry_s, and the range named was asked for as many times as the
        # error says, no more: retries do not multiply.
        said = re.search(r"after (\d+) attempts over ([\d.]+) s", result.error)
        assert said, result.error
        attempts, seconds = int(said[1]), float(said[2])
        # The budget holds the backoffs (jittered) and the failing requests but the last.
        assert attempts > 3 and RETRY_S / 3 <= seconds <= RETRY_S + 2, result.error
        first, last = map(int, re.search(r"\(bytes (\d+)-(\d+)\)", result.error).groups())
        asked = [r for r in via_proxy.requests("GET") if r.key == SHARD and r.range]
        # A reset request resumes at its last good byte, so count the requests ending there.
        assert sum(r.range[1] == last + 1 for r in asked) == attempts
        assert all(first <= r.range[0] for r in asked if r.range[1] == last + 1)


def test_a_fault_that_outlasts_a_few_attempts_is_retried_through(clean, via_proxy, tmp_path):
    """Eight throttled answers in a row to one object (several seconds of backing off) do not
    end the run: retries go on for storage_retry_s, not for a number of attempts."""
    output, _ = clean
    via_proxy.add("slowdown", key=SHARD, times=8)
    result = run_here(tmp_path, TINY_URL, TINY)
    assert result.status == "converted", result.error
    assert Path(result.output).read_bytes() == output
    assert manifest_of(Path(result.output))["source"]["storage"]["retries"] == 8


def test_a_store_that_ignores_range_is_named_not_the_data(clean, via_proxy, tmp_path):
    via_proxy.add("whole", key=SHARD)
    result = run_here(tmp_path, TINY_URL, TINY)
    assert result.status == "failed"
    assert f"sent more bytes than asked for s3://{SHARD} (bytes " in result.error
    assert "ignores HTTP Range requests" in result.error
    assert "a problem of the environment, not of the checkpoint" in result.error
    assert left_in(tmp_path / "out") == []


def test_an_archived_object_says_to_restore_it(s3, via_proxy, tiny_checkpoint, tmp_path):
    upload_folder(s3, tiny_checkpoint, BUCKET, "cold/checkpoint")
    key = "cold/checkpoint/step-5/__1_0.distcp"
    s3c = client(s3)
    data = s3c.get_object(Bucket=BUCKET, Key=key)["Body"].read()
    s3c.put_object(Bucket=BUCKET, Key=key, Body=data, StorageClass="GLACIER")
    result = run_here(tmp_path, f"s3://{BUCKET}/cold/checkpoint", TINY)
    assert result.status == "failed"
    assert f"s3://{BUCKET}/{key} (bytes " in result.error
    assert "is archived (InvalidObjectState" in result.error, result.error
    assert "Restore the step folder's objects" in result.error
    assert "credentials" not in result.error
    assert left_in(tmp_path / "out") == []


def test_an_interrupted_run_does_not_wait_out_its_retries(s3, proxy, tmp_path):
    """Ctrl-C (or SLURM's SIGTERM) while a store throttles every read: the run stops at once,
    not after storage_retry_s, and leaves nothing behind."""
    proxy.clear()
    proxy.add("slowdown", key=SHARD)
    out = tmp_path / "out" / "model.pt"
    child = subprocess.Popen(
        [
            sys.executable,
            "convert.py",
            "experiment=debug",
            f"experiment.checkpoint_dir={TINY_URL}",
            f"experiment.output={out}",
            f"hydra.run.dir={tmp_path / 'hydra'}",
            *model_overrides(TINY),
        ],
        cwd=REPO,
        env=child_env(AWS_ENDPOINT_URL=proxy.url),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not [r for r in proxy.requests("GET") if r.outcome == "slowdown"]:
            assert child.poll() is None and time.monotonic() < deadline, "no read was throttled"
            time.sleep(0.1)
        child.send_signal(signal.SIGINT)
        start = time.monotonic()
        _, err = child.communicate(timeout=60)
        assert time.monotonic() - start < 10, err[-2000:]
    finally:
        child.kill()
        proxy.clear()
    assert child.returncode != 0
    assert left_in(tmp_path / "out") == []


def test_an_object_shorter_than_the_index_says_is_named(s3, via_proxy, tiny_checkpoint, tmp_path):
    """The store lists the short object as it is: the index's check of every shard against
    the listing names it before anything is read."""
    upload_folder(s3, tiny_checkpoint, BUCKET, "short/checkpoint")
    key = "short/checkpoint/step-5/__1_0.distcp"
    s3c = client(s3)
    data = s3c.get_object(Bucket=BUCKET, Key=key)["Body"].read()
    s3c.put_object(Bucket=BUCKET, Key=key, Body=data[: len(data) // 2])
    result = run_here(tmp_path, f"s3://{BUCKET}/short/checkpoint", TINY)
    assert result.status == "failed"
    assert f"Shard file s3://{BUCKET}/{key} is truncated: {len(data) // 2} bytes" in result.error
    assert left_in(tmp_path / "out") == []
    assert not [r for r in via_proxy.requests("GET") if r.key.endswith(".distcp")]


# --------------------------------------------------------------------------------------------
# Step discovery and the index's checks, from one listing
# --------------------------------------------------------------------------------------------


def test_step_discovery_in_a_bucket(s3, via_proxy, tiny_checkpoint, caplog):
    s3c = client(s3)
    upload_folder(s3, tiny_checkpoint, BUCKET, "steps/checkpoint")
    # An unfinished newer save: a shard, no .metadata.
    s3c.put_object(Bucket=BUCKET, Key="steps/checkpoint/step-9/__0_0.distcp", Body=b"x" * 10)
    with open_storage(f"s3://{BUCKET}/steps/checkpoint") as storage:
        assert find_step_dir(storage, "latest") == (5, f"{BUCKET}/steps/checkpoint/step-5")
        with pytest.raises(ConversionError, match="step-9 has no .metadata file"):
            find_step_dir(storage, 9)
    assert f"step-9 in s3://{BUCKET}/steps/checkpoint has no .metadata" in caplog.text

    step_folder = open_storage(f"s3://{BUCKET}/steps/checkpoint/step-5")
    with step_folder as storage, pytest.raises(ConversionError) as e:
        find_step_dir(storage, "latest")
    assert (
        f"set experiment.checkpoint_dir=s3://{BUCKET}/steps/checkpoint and experiment.step=5"
        in str(e.value)
    )
    missing = pytest.raises(
        ConversionError, match=f"s3://{BUCKET}/no/such/run does not exist at {via_proxy.url}"
    )
    with open_storage(f"s3://{BUCKET}/no/such/run") as storage, missing:
        find_step_dir(storage, "latest")
    typo = pytest.raises(
        ConversionError,
        match=f"Bucket s3://{BUCKET}x of experiment.checkpoint_dir .* does not exist at "
        f"{via_proxy.url}. Check its name; check the endpoint too",
    )
    with open_storage(f"s3://{BUCKET}x/steps/checkpoint") as storage, typo:
        find_step_dir(storage, "latest")

    s3c.delete_object(Bucket=BUCKET, Key="steps/checkpoint/step-5/__1_0.distcp")
    shard_missing = pytest.raises(ConversionError, match=r"__1_0.distcp named by .* is missing")
    with open_storage(f"s3://{BUCKET}/steps/checkpoint") as storage, shard_missing:
        DcpIndex(storage, f"{BUCKET}/steps/checkpoint/step-5")


# --------------------------------------------------------------------------------------------
# Ranged reads: exact, parallel within a bound, streamed into the caller's buffer, pinned
# --------------------------------------------------------------------------------------------


@pytest.fixture
def big_object(s3, via_proxy) -> bytes:
    data = os.urandom(5 * PART_BYTES + 12345)
    s3c = client(s3)
    s3c.create_bucket(Bucket="reads")
    s3c.put_object(Bucket="reads", Key="blob", Body=data)
    return data


def test_reads_are_exact_parallel_and_bounded(big_object, via_proxy):
    data = big_object
    with open_storage("s3://reads") as storage:
        assert storage.info("reads/blob").size == len(data)
        via_proxy.clear()
        assert storage.read_into("reads/blob", 100, memoryview(bytearray(0))) == 0
        assert storage.read_into("reads/blob", len(data), memoryview(bytearray(10))) == 0
        assert via_proxy.requests() == []  # an empty range costs no request (S3 would send all)
        tail = bytearray(100)
        assert storage.read_into("reads/blob", len(data) - 40, memoryview(tail)) == 40
        assert tail[:40] == data[-40:]

        # One read of the whole object: PART_BYTES parts, side by side.
        via_proxy.clear()
        via_proxy.delay_s = 0.2
        whole = bytearray(len(data))
        try:
            assert storage.read_into("reads/blob", 0, memoryview(whole)) == len(data)
        finally:
            via_proxy.delay_s = 0.0
        assert whole == data
        assert len(via_proxy.requests("GET")) == 6
        assert via_proxy.max_in_flight == 6

        # Many reads from many threads: never more than IN_FLIGHT requests at once.
        via_proxy.clear()
        via_proxy.delay_s = 0.05
        buffers = [bytearray(4096) for _ in range(4 * IN_FLIGHT)]

        def read(i: int) -> None:
            at = [(i * 7 + j) * 65536 for j in range(4)]
            storage.read_batch(
                [("reads/blob", a, memoryview(buffers[i * 4 + j])) for j, a in enumerate(at)]
            )

        try:
            threads = [threading.Thread(target=read, args=(i,)) for i in range(IN_FLIGHT)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        finally:
            via_proxy.delay_s = 0.0
        assert via_proxy.max_in_flight == IN_FLIGHT
        for i in range(IN_FLIGHT):
            for j in range(4):
                at = (i * 7 + j) * 65536
                assert buffers[i * 4 + j] == data[at : at + 4096]


def test_reads_stream_into_the_callers_buffer(big_object):
    """Six parts of 8 MiB in flight, and less than one part's size allocated on the way (the
    network library's buffers): no part is held as a copy of its own, so memory stays what
    batch_mb allows, whatever is in flight (s3fs's cat_file would hold every part whole)."""
    with open_storage("s3://reads") as storage:
        storage.info("reads/blob")
        whole = bytearray(len(big_object))
        tracemalloc.start()
        try:
            storage.read_into("reads/blob", 0, memoryview(whole))
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert whole == big_object
    assert peak < PART_BYTES, f"{peak / 2**20:.1f} MiB allocated while reading"


def test_an_object_replaced_while_read_is_an_error(big_object, s3):
    with open_storage("s3://reads") as storage:
        storage.listdir("reads")  # the ETag, as a conversion lists it at its start
        client(s3).put_object(Bucket="reads", Key="blob", Body=big_object[::-1])
        with pytest.raises(ConversionError, match=r"s3://reads/blob \(bytes 0-99\) changed"):
            storage.read_into("reads/blob", 0, memoryview(bytearray(100)))


def test_other_backends_read_through_fsspec(clean, tiny_checkpoint, tmp_path):
    """A backend other than S3 (fsspec's in-memory one, a real fsspec filesystem) is read
    through fsspec's own ranged reads, in parts of GENERIC_PART_BYTES: the output is the one
    converted from S3, byte for byte, and reads across parts and objects are exact."""
    import fsspec

    memory = fsspec.filesystem("memory")
    for path in tiny_checkpoint.rglob("*"):
        if path.is_file():
            memory.pipe(f"/tiny/checkpoint/{path.relative_to(tiny_checkpoint)}", path.read_bytes())
    result = run_here(tmp_path, "memory://tiny/checkpoint", TINY)
    assert result.status == "converted", result.error
    assert Path(result.output).read_bytes() == clean[0]
    # A store without ETags: files are versioned by their modification time, so an unchanged
    # source is up to date and a rewritten one (same size) is not.
    files = manifest_of(Path(result.output))["source"]["files"]
    assert all(seen["etag"].startswith("created=") for seen in files.values()), files
    assert run_here(tmp_path, "memory://tiny/checkpoint", TINY).status == "skipped"
    shard = next(p for p in tiny_checkpoint.rglob("*.distcp"))
    memory.pipe(f"/tiny/checkpoint/{shard.relative_to(tiny_checkpoint)}", shard.read_bytes())
    changed = run_here(tmp_path, "memory://tiny/checkpoint", TINY)
    assert changed.status == "failed" and "the source files changed" in changed.error

    data = os.urandom(2 * GENERIC_PART_BYTES + 999)
    memory.pipe("/blob/data", data)
    with open_storage("memory://blob") as storage:
        assert isinstance(storage, FsspecStorage)
        buffers = [bytearray(GENERIC_PART_BYTES + 7), bytearray(5), bytearray(GENERIC_PART_BYTES)]
        at = [0, GENERIC_PART_BYTES + 7, GENERIC_PART_BYTES + 12]  # three reads end to end
        got = storage.read_batch(
            [("/blob/data", a, memoryview(b)) for a, b in zip(at, buffers, strict=True)]
        )
        assert got == [len(b) for b in buffers]
        assert b"".join(buffers) == data[: at[-1] + GENERIC_PART_BYTES]
        assert storage.read_into("/blob/data", len(data) - 9, memoryview(bytearray(20))) == 9


def test_an_object_replaced_after_it_was_read_fails_the_conversion(
    s3, via_proxy, tiny_checkpoint, tmp_path, monkeypatch
):
    """Once every tensor is read, the step folder is listed again, past fsspec's listings
    cache: an object replaced meanwhile (after its bytes were read, so no pinned read sees
    it) fails the conversion, and nothing is kept."""
    from converter import conversion

    upload_folder(s3, tiny_checkpoint, BUCKET, "replaced/checkpoint")
    shard = sorted(tiny_checkpoint.glob("step-5/*.distcp"))[0]
    key = f"replaced/checkpoint/step-5/{shard.name}"
    fill = conversion.convert_tensors

    def replaced_meanwhile(*args, **kwargs):
        filled = fill(*args, **kwargs)
        body = bytearray(shard.read_bytes())
        body[-1] ^= 0xFF  # the same size, other bytes: a new ETag
        client(s3).put_object(Bucket=BUCKET, Key=key, Body=bytes(body))
        return filled

    monkeypatch.setattr(conversion, "convert_tensors", replaced_meanwhile)
    result = run_here(tmp_path, f"s3://{BUCKET}/replaced/checkpoint", TINY)
    assert result.status == "failed"
    assert f"s3://{BUCKET}/{key} changed while it was being converted" in result.error
    assert left_in(tmp_path / "out") == []


def test_a_store_without_versions_never_calls_the_output_up_to_date(
    tiny_checkpoint, tmp_path, caplog
):
    """fsspec's reference file system lists sizes and no version of any kind (no ETag, no
    modification time): a changed source could not be told from the one converted, so the
    output is converted again, saying why, rather than skipped."""
    refs = {
        f"checkpoint/{p.relative_to(tiny_checkpoint)}": [str(p), 0, p.stat().st_size]
        for p in tiny_checkpoint.rglob("*")
        if p.is_file()
    }
    (tmp_path / "refs.json").write_text(json.dumps({"version": 1, "refs": refs}))
    fo = f"+experiment.storage_options.fo={tmp_path / 'refs.json'}"
    caplog.set_level(logging.INFO)
    first = run_here(tmp_path, "reference://checkpoint", TINY, fo)
    assert first.status == "converted", first.error
    again = run_here(tmp_path, "reference://checkpoint", TINY, fo)
    assert again.status == "converted", again.error
    assert "the store lists no version (ETag, modification time) of .metadata" in caplog.text


# --------------------------------------------------------------------------------------------
# The environment's problems, named as such
# --------------------------------------------------------------------------------------------


def test_a_missing_backend_names_the_extra():
    code = (
        "import sys; sys.modules['s3fs'] = None\n"
        "from converter.sources import open_storage\n"
        "from converter.errors import ConversionError\n"
        "try:\n"
        "    open_storage('s3://bucket/run').__enter__()\n"
        "except ConversionError as e:\n"
        "    print(e)\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert "pip install -e '.[s3]'" in run.stdout, run.stdout + run.stderr
    assert "a problem of the environment, not of the checkpoint" in run.stdout


def test_an_unreachable_endpoint_is_named(monkeypatch):
    for key, value in S3_ENV.items():
        monkeypatch.setenv(key, value)
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    start = time.monotonic()
    unreachable = open_storage("s3://bucket/run", {"endpoint_url": endpoint}, RETRY_S)
    with unreachable as storage, pytest.raises(ConversionError) as e:
        find_step_dir(storage, "latest")
    assert "Cannot reach the object store for s3://bucket/run after " in str(e.value)
    assert f"Check the endpoint {endpoint}" in str(e.value)
    assert RETRY_S / 3 <= time.monotonic() - start < RETRY_S + 10


@pytest.mark.parametrize(
    "setting, value, said",
    [
        ("AWS_PROFILE", "no-such-profile", "ProfileNotFound"),
        ("AWS_ENDPOINT_URL", "127.0.0.1:9", "Invalid endpoint: 127.0.0.1:9"),
    ],
)
def test_a_client_setting_that_fails_before_any_request_is_named(
    s3, monkeypatch, setting, value, said
):
    for key, env_value in S3_ENV.items():
        monkeypatch.setenv(key, env_value)
    monkeypatch.setenv(setting, value)
    with open_storage(TINY_URL) as storage, pytest.raises(ConversionError) as e:
        find_step_dir(storage, "latest")
    assert f"Cannot set up the s3:// client to read {TINY_URL} (" in str(e.value)
    assert said in str(e.value) and "no request was sent" in str(e.value)
    assert "a problem of the environment, not of the checkpoint" in str(e.value)


def test_missing_credentials_are_named(s3, monkeypatch):
    for key, value in S3_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with open_storage(TINY_URL, {"endpoint_url": s3}) as storage:
        assert isinstance(storage, FsspecStorage)
        with pytest.raises(ConversionError, match="no credentials were found for s3://"):
            find_step_dir(storage, "latest")
