"""A real Dask cluster for the tests of `prepare --engine dask`: a scheduler and 2 single-threaded
worker processes on this machine (`distributed.LocalCluster`), shared by the tests of a module."""

from __future__ import annotations

import logging

import pytest
from distributed import Client, LocalCluster


@pytest.fixture(scope="module")
def dask_client():
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
            silence_logs=logging.ERROR,
        ) as cluster,
        Client(cluster) as client,
    ):  # fmt: skip
        client.wait_for_workers(2)
        yield client
