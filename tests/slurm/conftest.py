"""The SLURM test group: a real one-node cluster on localhost (tests/slurm/local_cluster.py).

Opt-in: ``SSL_VIT_SLURM_TESTS=1 make test`` (what .ci/run runs). Without the variable the tests
are skipped with that reason; with it, a cluster that cannot start fails them (never a skip: an
enabled check that silently did nothing would read as a pass). The daemons are stopped by PID
when the session ends, whatever the tests did.
"""
from __future__ import annotations

import shutil

import pytest

from local_cluster import LocalSlurm


@pytest.fixture(scope="session")
def slurm_cluster():
    cluster = LocalSlurm()
    try:
        cluster.start()
    except Exception as error:  # start() has stopped what it had started
        pytest.fail(f"SSL_VIT_SLURM_TESTS=1 but the local SLURM cluster did not start: {error}", pytrace=False)
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(cluster.root, ignore_errors=True)
