"""Batch transcription on Ray Data: the same records as the local run, on a
two-node loopback cluster (tests/local_ray.py), and on the private cluster
``--ray`` starts."""

from __future__ import annotations

import subprocess
import sys

import local_ray
import pytest
from test_batch import _corpus, _sorted_lines

from dsstream.batch import BatchConfig, Output, collect_inputs, common_root, run_local
from engine.extras import available

pytestmark = [
    pytest.mark.ray,
    pytest.mark.skipif(not available("ray"), reason="needs the ray extra"),
    pytest.mark.timeout(600),
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return _corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def local_ledger(corpus, tmp_path_factory):
    paths = collect_inputs([corpus["lj"].parent])
    out = tmp_path_factory.mktemp("local")
    with Output(out, common_root(paths)) as output:
        # What the CLI's --srt asks for: captions, punctuated.
        config = BatchConfig(options={"punctuate": True}, captions=("srt",))
        run_local(paths, output, config, jobs=1)
    return out / "transcripts.jsonl"


def _batch(corpus, out, *flags):
    cmd = [sys.executable, "-m", "dsstream.cli", "transcribe-batch", "--no-progress", "--srt",
           str(corpus["lj"].parent), "-o", str(out), *flags]  # fmt: skip
    return subprocess.run(cmd, env=local_ray.ray_env(), capture_output=True, text=True,
                          timeout=500)  # fmt: skip


def test_two_node_cluster_writes_the_local_records(corpus, local_ledger, tmp_path):
    with local_ray.two_nodes(worker_cpus=2) as cluster:
        address = cluster.address
        assert local_ray.non_loopback_listeners() == []
        run = _batch(corpus, tmp_path, "--ray-address", address, "--actors", "1")
        assert run.returncode == 1, run.stderr  # the two bad files
        assert "5 files done (2 failed)" in run.stderr
        assert local_ray.non_loopback_listeners() == []
    assert _sorted_lines(tmp_path / "transcripts.jsonl") == _sorted_lines(local_ledger)
    srt = (tmp_path / "captions" / "sub" / "david.srt").read_text()
    assert srt == (local_ledger.parent / "captions" / "sub" / "david.srt").read_text()
    # Resumed on Ray: nothing left to do.
    again = _batch(corpus, tmp_path, "--ray")
    assert again.returncode == 0 and "0 files done (0 failed), 5 done before" in again.stderr


def test_private_local_cluster(corpus, local_ledger, tmp_path):
    try:
        run = _batch(corpus, tmp_path, "--ray", "--actors", "1")
    finally:
        local_ray.stop()
    assert run.returncode == 1, run.stderr
    assert _sorted_lines(tmp_path / "transcripts.jsonl") == _sorted_lines(local_ledger)


def test_actors_must_leave_cpu_for_reading(corpus, tmp_path):
    with local_ray.two_nodes(worker_cpus=1) as cluster:
        address = cluster.address
        run = _batch(corpus, tmp_path, "--ray-address", address, "--actors", "1")
    assert run.returncode == 2
    assert "leave" in run.stderr and "reading" in run.stderr
